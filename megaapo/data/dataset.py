"""Reading datasets: JSONL/Parquet readers, converters from the papers' published layouts, row validation.

Called by `megaapo data check`, the training loop and evaluation. Formats (`data.format`, auto-detected by default):
  megaapo  {"id", "images": [path, ...], "question", "answer", "solution"?, "key_steps"?, "choices"?, ...}
  view_r1  {"message": "<stringified chat: [{role, content: [{type: image, image: path}, {type: text, ...}]}]>",
            "answer"}                                       (View-R1 / APO)
  r1vl     {"image_path": path or [paths], "problem", "solution", "key_steps"?, "answer"?}   (R1-VL / StepGRPO)
  mathvista, mathverse   the benchmarks' published testmini layouts (`megaapo.data.benchmarks`, docs/eval_formats.md)
Image paths are URL-free; relative ones are resolved against `data.image_root`, else the data file's directory.
Bad rows are skipped and counted per reason (`SkipReport`); a file where every row is bad raises `DataError`.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from PIL import Image, UnidentifiedImageError

from megaapo.data.benchmarks import from_mathverse, from_mathvista
from megaapo.data.conversation import from_conversation
from megaapo.data.schema import DataError, Example, RowError, SkipReport, path_list, text_field
from megaapo.rewards.answers import FINAL_ANSWER, extract_answer, gold_is_parsable

log = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")


# ------------------------------------------------------------------------------------------------- readers
def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, dict) for every record; a record that cannot be decoded yields a RowError instead."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open("r", encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, RowError("malformed_row", f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                yield i, rec if isinstance(rec, dict) else RowError("malformed_row", "a JSON line is not an object")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001  (pyarrow's errors are many; the message is what matters)
            raise DataError(f"{path}: cannot read Parquet: {e}") from None
        for i, rec in enumerate(table.to_pylist(), 1):
            yield i, rec
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl or .parquet")


def detect_format(rec: dict) -> str:
    if "pid" in rec and "question_type" in rec:
        return "mathvista"
    if "problem_version" in rec:
        return "mathverse"
    if "messages" in rec or "conversations" in rec:
        return "conversation"
    if "message" in rec:
        return "view_r1"
    if "image_path" in rec or "problem" in rec:
        return "r1vl"
    return "megaapo"


# ---------------------------------------------------------------------------------------------- converters
def _key_steps(value: Any) -> Optional[list[list[str]]]:
    """Groups of equivalent surface forms, kept as written (a bare string is a one-form group). R1-VL's own layout
    `{"Steps": [...]}` is read too. Empty forms and groups stay: StepRAR's paper mode skips them, its code mode counts
    them as the authors' script does (an empty form matches everything there)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise RowError("malformed_row", "key_steps is not a list of lists of strings") from None
    if isinstance(value, dict):
        value = value.get("Steps", [])
    if not isinstance(value, (list, tuple)):
        raise RowError("malformed_row", "key_steps is not a list (or R1-VL's {\"Steps\": [...]})")
    groups = []
    for g in value:
        forms = [g] if isinstance(g, str) else g
        if not isinstance(forms, (list, tuple)) or not all(isinstance(f, str) for f in forms):
            raise RowError("malformed_row", "key_steps is not a list of lists of strings")
        groups.append(list(forms))
    return groups or None


def from_megaapo(rec: dict) -> Example:
    return Example(id=text_field(rec.get("id"), "id"), images=path_list(rec.get("images", rec.get("image"))),
                   question=text_field(rec.get("question"), "question"),
                   answer=text_field(rec.get("answer"), "answer"),
                   solution=text_field(rec.get("solution"), "solution") or None,
                   key_steps=_key_steps(rec.get("key_steps")), choices=rec.get("choices") or None,
                   meta={k: rec[k] for k in ("task", "level", "category") if k in rec})


def from_view_r1(rec: dict) -> Example:
    raw = rec.get("message")
    if isinstance(raw, str):
        try:
            msgs = json.loads(raw)
        except json.JSONDecodeError:
            try:
                msgs = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                raise RowError("malformed_row", "'message' is not a stringified chat") from None
    else:
        msgs = raw
    if isinstance(msgs, dict):
        msgs = [msgs]
    if not isinstance(msgs, list):
        raise RowError("malformed_row", "'message' is not a list of chat turns")
    images, texts = [], []
    for turn in msgs:
        if not isinstance(turn, dict) or turn.get("role", "user") != "user":
            continue
        content = turn.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
        for item in items:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "image" or "image" in item:
                images.extend(path_list(item.get("image") or item.get("path")))
            elif "text" in item:
                texts.append(text_field(item["text"], "text"))
    question = IMAGE_PLACEHOLDER.sub("", "\n".join(t for t in texts if t)).strip()
    return Example(id=text_field(rec.get("id"), "id"), images=images, question=question,
                   answer=text_field(rec.get("answer"), "answer"))


def from_r1vl(rec: dict) -> Example:
    solution = text_field(rec.get("solution"), "solution") or None
    answer = text_field(rec.get("answer"), "answer")
    if not answer and solution and FINAL_ANSWER.search(solution):
        answer = extract_answer(solution) or ""
    question = IMAGE_PLACEHOLDER.sub("", text_field(rec.get("problem"), "problem")).strip()
    return Example(id=text_field(rec.get("id"), "id"), images=path_list(rec.get("image_path", rec.get("images"))),
                   question=question, answer=answer, solution=solution, key_steps=_key_steps(rec.get("key_steps")))


CONVERTERS: dict[str, Callable[[dict], Example]] = {"megaapo": from_megaapo, "view_r1": from_view_r1,
                                                    "r1vl": from_r1vl, "mathvista": from_mathvista,
                                                    "mathverse": from_mathverse, "conversation": from_conversation}


# ---------------------------------------------------------------------------------------------- validation
def check_image(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise RowError("missing_image", f"{path} not found")
    try:
        with Image.open(p) as im:
            im.load()  # decode the pixels: verify() alone misses truncated data
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RowError("corrupt_image", f"{p.name}: {e}") from None


def validate_example(ex: Example, check_images: bool = True, require_answer: bool = True) -> None:
    if not ex.question:
        raise RowError("empty_question")
    if not ex.images:
        raise RowError("no_image")
    if check_images:
        for path in ex.images:
            check_image(path)
    if not require_answer and not (ex.answer and gold_is_parsable(ex.answer)):
        ex.answer = ""   # supervised data: the target is the solution; no gold answer to check
        return
    if not ex.answer:
        raise RowError("missing_answer")
    if not gold_is_parsable(ex.answer):
        raise RowError("unparsable_answer", f"answer {ex.answer[:60]!r}")


def load_examples(path: str | Path, fmt: str = "auto", image_root: str = "", check_images: bool = True,
                  prompt_tokens: Optional[Callable[[Example], int]] = None, max_prompt_tokens: int = 0,
                  progress: bool = False, require_answer: bool = True) -> tuple[list[Example], SkipReport]:
    """Read, convert and validate a data file -> (good examples, report). Raises DataError if none is good.

    prompt_tokens(example) -> the prompt's length with image tokens (from `PromptBuilder`); examples longer than
    max_prompt_tokens are skipped, never truncated. require_answer=False (supervised data) keeps rows without a
    checkable gold answer, with `answer` empty.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    report = SkipReport(source=str(path))
    examples: list[Example] = []
    records = read_records(path)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"checking {path.name}", unit="row")
    for row, rec in records:
        try:
            if isinstance(rec, RowError):
                raise rec
            ex = CONVERTERS[detect_format(rec) if fmt == "auto" else fmt](rec)
            ex.id = ex.id or f"{path.stem}-{row}"
            ex.images = [str(p if Path(p).is_absolute() else (root / p)) for p in ex.images]
            ex.meta["row"] = row
            validate_example(ex, check_images, require_answer)
            if prompt_tokens is not None and max_prompt_tokens:
                n = prompt_tokens(ex)
                if n > max_prompt_tokens:
                    raise RowError("prompt_too_long", f"{n} tokens > {max_prompt_tokens}")
        except RowError as e:
            report.add(row, e)
            continue
        examples.append(ex)
    report.kept = len(examples)
    if report.skipped:
        log.warning("%s", report.summary())
    if not examples:
        reasons = ", ".join(f"{r} x{n}" for r, n in report.skipped.most_common(3)) or "the file has no rows"
        raise DataError(f"{path}: no usable rows ({reasons})\n{report.summary()}")
    return examples, report
