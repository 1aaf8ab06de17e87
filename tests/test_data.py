"""Data: the synthetic generator, readers/converters for the papers' layouts, prompt lengths, and bad rows."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megaapo.data import DataError, Example, PromptBuilder, load_examples
from megaapo.data.synth import generate
from megaapo.rewards import step_rar, step_rvr
from megaapo.rewards.answers import gold_is_parsable


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_synth_is_deterministic_and_self_consistent(tmp_path, synth_dir):
    generate(tmp_path, n_train=24, n_eval=6, seed=3, progress=False)
    a, b = _rows(synth_dir / "train.jsonl"), _rows(tmp_path / "train.jsonl")
    assert a == b
    for row in a[:5]:
        assert (synth_dir / row["images"][0]).read_bytes() == (tmp_path / row["images"][0]).read_bytes()
    other = tmp_path / "other"
    generate(other, n_train=24, n_eval=6, seed=4, progress=False)
    assert _rows(other / "train.jsonl") != a
    for row in a + _rows(synth_dir / "eval.jsonl"):
        assert gold_is_parsable(row["answer"])
        # the reference solution is a perfect R1-VL response: valid, correct, every key step matched
        assert step_rvr(row["solution"]) == 1.0
        assert step_rar(row["solution"], row["key_steps"], row["answer"]) == pytest.approx(1.1)
        assert step_rvr(row["solution"], faithful_to="code") == 1.0   # and so by the authors' rules
        assert step_rar(row["solution"], row["key_steps"], row["answer"], faithful_to="code",
                        solution=row["solution"]) == pytest.approx(1.1)
        img = Image.open(synth_dir / row["images"][0])
        assert img.size == (112, 112) and img.getpixel((0, 0)) == (122, 116, 104)


def test_synth_covers_tasks_and_levels(tmp_path):
    generate(tmp_path, n_train=200, n_eval=0, seed=0, progress=False)
    seen = {(r["task"], r["level"]) for r in _rows(tmp_path / "train.jsonl")}
    assert len(seen) == 12   # 4 task families x 3 levels


def test_readers_and_converters(tmp_path, synth_dir):
    img = str(synth_dir / "images" / "train_000000.png")
    view_r1 = {"message": json.dumps([{"role": "user", "content": [
        {"type": "image", "image": img}, {"type": "text", "text": "<image>How many squares?"}]}]), "answer": "3"}
    r1vl = {"image_path": img, "problem": "<image>\nWhat is 2+1?",
            "solution": "### Step 1: 2 + 1 = 3 ### The final answer is: 3", "key_steps": [["2 + 1 = 3"]]}
    native = {"images": ["images/train_000000.png"], "question": "Q?", "answer": "B", "choices": ["1", "2"]}
    (tmp_path / "v.jsonl").write_text(json.dumps(view_r1) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps(r1vl) + "\n")
    pq.write_table(pa.Table.from_pylist([native]), tmp_path / "n.parquet")
    [v], _ = load_examples(tmp_path / "v.jsonl")
    assert (v.question, v.answer, v.images) == ("How many squares?", "3", [img])
    [r], _ = load_examples(tmp_path / "r.jsonl")
    assert (r.question, r.answer, r.key_steps) == ("What is 2+1?", "3", [["2 + 1 = 3"]])  # answer from solution
    [n], _ = load_examples(tmp_path / "n.parquet", image_root=str(synth_dir))
    assert n.images == [img] and n.choices == ["1", "2"]


def test_key_steps_layouts_are_kept_as_written():
    """Groups as lists or bare strings, and R1-VL's {"Steps": [...]}; empty forms and groups stay for the reward
    (the code mode counts them as the authors' script does)."""
    from megaapo.data.dataset import from_r1vl
    from megaapo.data.schema import RowError

    base = {"image_path": "a.png", "problem": "q", "solution": "### The final answer is: 3"}
    assert from_r1vl({**base, "key_steps": [["a", "b"], "c"]}).key_steps == [["a", "b"], ["c"]]
    assert from_r1vl({**base, "key_steps": {"Steps": [["2 + 1 = 3"], "three"]}}).key_steps == [["2 + 1 = 3"],
                                                                                               ["three"]]
    assert from_r1vl({**base, "key_steps": json.dumps([[""], []])}).key_steps == [[""], []]
    assert from_r1vl({**base, "key_steps": {"Steps": []}}).key_steps is None
    with pytest.raises(RowError, match="Steps"):
        from_r1vl({**base, "key_steps": 3})


def _planted(tmp_path, synth_dir) -> Path:
    good = _rows(synth_dir / "train.jsonl")[0]
    good["images"] = [str(synth_dir / good["images"][0])]
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    png = (synth_dir / good["images"][0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    rows = [good, good,
            {**good, "images": [str(tmp_path / "nope.png")]},
            {**good, "images": [str(tmp_path / "garbage.png")]},
            {**good, "images": [str(tmp_path / "truncated.png")]},
            {**good, "question": "  "},
            {**good, "answer": "\\frac{1}{"},
            {**good, "answer": ""},
            {**good, "images": []},
            {**good, "question": "count " * 600}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_skipped_and_counted(tmp_path, synth_dir, tiny_model):
    from transformers import AutoTokenizer

    path = _planted(tmp_path, synth_dir)
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_model), "r1", 3136, 12544)
    examples, report = load_examples(path, prompt_tokens=builder.num_tokens, max_prompt_tokens=512)
    assert len(examples) == 2
    assert dict(report.skipped) == {"missing_image": 1, "corrupt_image": 2, "empty_question": 1,
                                    "unparsable_answer": 1, "missing_answer": 1, "no_image": 1,
                                    "prompt_too_long": 1, "malformed_row": 1}
    assert report.samples["malformed_row"][0][0] == 11 and "nope.png" in report.samples["missing_image"][0][1]


def test_all_bad_file_is_an_error_naming_reasons(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"images": ["x.png"], "question": "q", "answer": "1"}) + "\n{oops\n")
    with pytest.raises(DataError, match="no usable rows.*(missing_image|malformed_row)"):
        load_examples(path)


def test_prompt_length_counts_image_tokens_exactly(synth_dir, tiny_model):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_model)
    for style, max_pixels in (("r1", 12544), ("r1vl", 1003520), ("direct", 3136)):
        builder = PromptBuilder(proc.tokenizer, style, 3136, max_pixels)
        row = _rows(synth_dir / "train.jsonl")[1]
        ex = Example(id="x", images=[str(synth_dir / row["images"][0])] * 2, question=row["question"], answer="1")
        prompt = builder.build(ex)
        images = [Image.open(p) for p in prompt.images]
        proc.image_processor.min_pixels, proc.image_processor.max_pixels = 3136, max_pixels
        proc.image_processor.size = {"shortest_edge": 3136, "longest_edge": max_pixels}
        ids = proc(text=[prompt.text], images=images, return_tensors="pt")["input_ids"]
        assert prompt.num_tokens == ids.shape[1], style


def test_cli_synth_and_check(tmp_path, synth_dir):
    out = tmp_path / "cli_synth"
    run = subprocess.run([sys.executable, "-m", "megaapo.cli", "data", "synth", "--out", str(out), "--n", "5",
                          "--n-eval", "2", "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert len(_rows(out / "train.jsonl")) == 5 and len(_rows(out / "eval.jsonl")) == 2
    check = subprocess.run([sys.executable, "-m", "megaapo.cli", "data", "check", str(_planted(tmp_path, synth_dir))],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    for reason in ("missing_image", "corrupt_image", "empty_question", "unparsable_answer", "no_image",
                   "malformed_row"):
        assert reason in check.stdout
    assert "3 of 11 rows usable" in check.stdout  # without --model, the over-long prompt is not measured
    bad = tmp_path / "allbad.jsonl"
    bad.write_text("{oops\n")
    fail = subprocess.run([sys.executable, "-m", "megaapo.cli", "data", "check", str(bad)], capture_output=True,
                          text=True, timeout=300)
    assert fail.returncode == 1 and "malformed_row" in fail.stderr
