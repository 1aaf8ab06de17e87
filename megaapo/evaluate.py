"""Evaluation: generate on the rollout engines, score with the training reward code, report per benchmark/category.

    megaapo eval [CONFIG] --checkpoint PATH [--bench NAME=FILE ...] [section.key=value ...]
    torchrun --nproc_per_node N -m megaapo.cli eval CONFIG --checkpoint PATH ...   (a sharded training checkpoint)

`evaluate` is what `megaapo train` and `megaapo sft` call every `trainer.eval_every` steps (the held-out accuracy),
and `run_eval` is `megaapo eval`: the same function over every benchmark file, so a number printed during training
and the number `megaapo eval` reports for that checkpoint come from the same code. Greedy by default; k samples per
prompt (`eval.k`, sampled) also give pass@k. Correctness is the `accuracy` reward that scores training rollouts
(answer extraction for `<answer>` tags and `### The final answer is:`, choice letters and choice texts, math-verify,
units and MathVista's precision), so train and eval can never disagree about what "correct" means.

Benchmark files are read by `megaapo.data.load_examples` (JSONL/Parquet, the formats of `docs/eval_formats.md`):
bad rows are skipped and counted per reason, and the report says so. `--responses FILE` re-scores saved responses
(`responses.jsonl` of an earlier run, or any `{"id", "response"}` lines) without generating.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from megaapo.experience import reward_inputs

log = logging.getLogger("megaapo.eval")

# The format component reported next to accuracy, per prompt style (r1vl: StepRVR's validity of the step format).
FORMAT_REWARD = {"r1": "format", "r1vl": "step_rvr", "direct": None, "plain": None}


def eval_rewards(style: str) -> dict[str, float]:
    fmt = FORMAT_REWARD.get(style)
    return {"accuracy": 1.0, **({fmt: 1.0} if fmt else {})}


@dataclass
class EvalResult:
    n: int                          # prompts scored
    accuracy: float                 # mean over all samples (greedy: over prompts)
    format: float | None            # share of responses in the prompt style's format; None: the style has none
    answered: float = 0.0           # share of responses with an answer to compare (any style; `direct` has no format)
    pass_at_k: float | None = None
    k: int = 1
    by_category: dict = field(default_factory=dict)   # category -> accuracy
    counts: dict = field(default_factory=dict)        # category -> prompts
    rows: list = field(default_factory=list)          # per response: id, category, response, answer, correct, ...
    seconds: float = 0.0
    skipped: dict = field(default_factory=dict)       # reason -> rows left out of the file
    scoring_failures: int = 0                         # responses whose scoring timed out or crashed (scored 0)

    def metrics(self, prefix: str = "eval") -> dict:
        m = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/answered": self.answered}
        if self.format is not None:   # a 0% format for `direct`/`plain`, which ask for none, would read as a failure
            m[f"{prefix}/format"] = self.format
        if self.pass_at_k is not None:
            m[f"{prefix}/pass@{self.k}"] = self.pass_at_k
        for cat, acc in self.by_category.items():
            m[f"{prefix}/accuracy/{cat}"] = acc
        return m

    @property
    def responses(self) -> list:
        """(example id, response text, correct) for inspection."""
        return [(r["id"], r["response"], r["correct"]) for r in self.rows]


def category(example) -> str:
    meta = example.meta or {}
    if meta.get("category"):
        return str(meta["category"])
    if "task" in meta:
        return f"{meta['task']}-l{meta['level']}" if "level" in meta else str(meta["task"])
    return "all"


@dataclass
class _Response:
    """What the reward code reads of a response (a Rollout has the same two fields)."""
    text: str
    group: int


def score_responses(examples, responses: list[tuple[int, str]], scorer, reward_cfg, style: str,
                    k: int = 1) -> EvalResult:
    """Score (example index, response text) pairs, k per example, with the reward code; aggregate."""
    from megaapo.rewards.answers import extract_answer

    fmt = FORMAT_REWARD.get(style)
    names = ["accuracy"] + ([fmt] if fmt else [])
    items = [_Response(text, i) for i, text in responses]
    scores = scorer.score(reward_inputs(items, examples, reward_cfg), names=names)
    acc = [a >= 1.0 for a in scores.components["accuracy"]]
    fmt_ok = [f > 0 for f in scores.components[fmt]] if fmt else [None] * len(items)
    per_prompt, cats = defaultdict(list), defaultdict(list)
    rows = []
    for r, a, f in zip(items, acc, fmt_ok):
        ex = examples[r.group]
        per_prompt[r.group].append(a)
        cats[category(ex)].append(a)
        rows.append({"id": ex.id, "category": category(ex), "response": r.text, "answer": extract_answer(r.text),
                     "gold": ex.answer, "correct": a, "format": f})
    res = EvalResult(n=len(per_prompt), accuracy=sum(acc) / max(1, len(acc)),
                     format=sum(fmt_ok) / max(1, len(items)) if fmt else None,
                     answered=sum(r["answer"] is not None for r in rows) / max(1, len(rows)),
                     k=k, by_category={c: sum(v) / len(v) for c, v in sorted(cats.items())},
                     counts={c: len(v) // k for c, v in sorted(cats.items())}, rows=rows,
                     scoring_failures=len(scores.failed))
    if k > 1:
        res.pass_at_k = sum(any(h) for h in per_prompt.values()) / max(1, len(per_prompt))
    return res


def evaluate(engines, examples, builder, scorer, reward_cfg, *, max_new_tokens: int, k: int = 1,
             temperature: float = 0.0, seed: int = 0) -> EvalResult:
    """Generate k responses per example on the engines (greedy for k=1 at temperature 0) and score them."""
    from megaapo.rollout import SamplingSpec

    t0 = time.perf_counter()
    prompts = [builder.build(e) for e in examples]
    sampling = SamplingSpec(n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    rollouts = engines.generate(prompts, sampling)
    res = score_responses(examples, [(r.group, r.text) for r in rollouts], scorer, reward_cfg, builder.style, k)
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------- `megaapo eval`
def resolve_checkpoint(path, groups, out_dir: Path) -> Path:
    """An HF directory the engines load: PATH itself, a run directory's `hf_final`, or a sharded training checkpoint
    (`step_N`, or a checkpoint root: its newest complete one) exported through the learner on every rank."""
    from megaapo import checkpoint as ckpt

    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "hf_final" / "config.json").is_file():
        return p / "hf_final"
    step_dir = None
    if (p / ckpt.MARKER).is_file():
        step_dir = p
    elif p.is_dir():   # a run directory or a checkpoint root: its newest complete checkpoint
        step_dir = ckpt.find_latest(p / "checkpoints") or ckpt.find_latest(p)
    if step_dir is None:
        raise FileNotFoundError(f"--checkpoint {path}: neither an HF model directory (config.json), a run directory "
                                "(hf_final/ or checkpoints/), nor a complete step_N checkpoint")
    return _export_training_checkpoint(step_dir, groups, out_dir)


def _export_training_checkpoint(step_dir: Path, groups, out_dir: Path) -> Path:
    """Load the policy of a `step_N` checkpoint at this process's layout (any layout: the checkpoint is resharded as
    it is read; one written by megaapo before dist_checkpointing needs the layout that wrote it) and write it as an
    HF directory under out_dir (reused when already there)."""
    from megaapo import dist_checkpoint as dckpt
    from megaapo.config import load_config

    out = out_dir / f"hf_{step_dir.name}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    run_dir = step_dir.parent.parent
    run_cfg = load_config(str(run_dir / "config.yaml")) if (run_dir / "config.yaml").is_file() else None
    if dckpt.format_of(step_dir) >= 2:
        from megaapo.config import ModelConfig, ParallelConfig

        model_cfg = run_cfg.model if run_cfg is not None else ModelConfig()
        learner = dckpt.load_policy(step_dir, groups, model_cfg, ParallelConfig(tp=groups.tp_size, pp=groups.pp_size))
    else:
        learner = _load_format1(step_dir, groups, run_dir, run_cfg)
    log.info("exporting %s as an HF directory for the engines: %s", step_dir, out)
    return learner.export_hf(out)


def _load_format1(step_dir: Path, groups, run_dir: Path, run_cfg):
    import torch.distributed as dist

    from megaapo import checkpoint as ckpt
    from megaapo.assets import ensure_model
    from megaapo.learner import Learner

    if run_cfg is None:
        raise FileNotFoundError(f"{step_dir}: no config.yaml in its run directory {run_dir}, so the model it was "
                                "trained from is unknown; export it with the run's own config")
    world = ckpt.read_manifest(step_dir)["world_size"]
    if world != dist.get_world_size() or (run_cfg.parallel.tp, run_cfg.parallel.pp) != (groups.tp_size,
                                                                                          groups.pp_size):
        raise ValueError(f"{step_dir} was written by {world} ranks at tp={run_cfg.parallel.tp} "
                         f"pp={run_cfg.parallel.pp} (megaapo's format 1); run eval with the same layout (torchrun "
                         f"--nproc_per_node {world} ... parallel.tp={run_cfg.parallel.tp} "
                         f"parallel.pp={run_cfg.parallel.pp})")
    learner = Learner(ensure_model(run_cfg.model, run_dir), groups, run_cfg.model, run_cfg.parallel, None)
    learner.load_model_tensors(ckpt.load(step_dir, rank=dist.get_rank(), weights_only=False).shards["model"])
    return learner


def benchmark_files(cfg, run_dir: Path) -> dict[str, Path]:
    if cfg.eval.benchmarks:
        return {str(k): Path(v) for k, v in cfg.eval.benchmarks.items()}
    if cfg.data.eval_path:
        return {Path(cfg.data.eval_path).stem: Path(cfg.data.eval_path)}
    from megaapo.assets import ensure_data

    _, eval_path = ensure_data(cfg.data, run_dir)   # the synthetic held-out split
    return {"synthetic_heldout": eval_path}


def load_benchmark(path: Path, cfg, builder, limit: int = 0):
    from megaapo.data import load_examples

    d = cfg.data
    examples, report = load_examples(path, fmt=cfg.eval.format, image_root=cfg.eval.image_root,
                                     prompt_tokens=builder.num_tokens, max_prompt_tokens=d.max_prompt_tokens)
    return (examples[:limit] if limit else examples), report


def read_responses(path: Path, examples, k: int) -> list[tuple[int, str]]:
    """Saved responses (`{"id", "response"}` per line, k per id) matched to the benchmark's examples by id."""
    index = {ex.id: i for i, ex in enumerate(examples)}
    found: dict[int, list[str]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if str(rec["id"]) in index:
                found[index[str(rec["id"])]].append(rec["response"])
    missing = [examples[i].id for i in range(len(examples)) if len(found[i]) < k]
    if missing:
        raise ValueError(f"{path}: no response (or fewer than eval.k={k}) for ids {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return [(i, text) for i in range(len(examples)) for text in found[i][:k]]


def markdown_table(results: dict[str, EvalResult], k: int) -> str:
    """One line per benchmark and per category: prompts, accuracy (, pass@k), format, skipped rows."""
    head = ["benchmark", "category", "prompts", "accuracy" if k == 1 else f"mean acc@{k}"]
    head += [f"pass@{k}"] if k > 1 else []
    head += ["format", "skipped rows"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(r.skipped.items())) or "0"
        cells = [name, "**all**", str(r.n), f"{100 * r.accuracy:.1f}"]
        cells += [f"{100 * r.pass_at_k:.1f}"] if k > 1 else []
        cells += ["-" if r.format is None else f"{100 * r.format:.1f}", skipped]
        lines.append("| " + " | ".join(cells) + " |")
        for cat, acc in r.by_category.items():
            cells = [name, cat, str(r.counts[cat]), f"{100 * acc:.1f}"] + ([""] if k > 1 else []) + ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_eval(cfg, checkpoint: str, responses: str | None = None) -> dict[str, EvalResult]:
    """`megaapo eval`: every benchmark of cfg scored for one checkpoint; results under eval.output_dir."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from megaapo.config import to_dict
    from megaapo.data.prompts import PromptBuilder
    from megaapo.distributed import init_distributed
    from megaapo.metrics import Metrics
    from megaapo.rewards.pool import RewardScorer

    groups = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.backend)
    run_dir = Path(cfg.trainer.output_dir)
    out_dir = Path(cfg.eval.output_dir) if cfg.eval.output_dir else run_dir / "eval"
    model_path = resolve_checkpoint(checkpoint, groups, out_dir)
    if dist.get_rank() != 0:   # the other ranks only helped export a sharded checkpoint
        dist.barrier()
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    d, e = cfg.data, cfg.eval
    builder = PromptBuilder(AutoTokenizer.from_pretrained(model_path), d.prompt_style, d.min_pixels, d.max_pixels,
                            system_prompt=d.system_prompt)
    max_new = e.max_new_tokens or cfg.rollout.max_new_tokens
    results: dict[str, EvalResult] = {}
    engines = None
    scorer = RewardScorer(eval_rewards(d.prompt_style), num_workers=cfg.reward.num_workers,
                          timeout_s=cfg.reward.timeout_s, alpha=cfg.reward.step_alpha,
                          faithful_to=cfg.reward.faithful_to)
    # one row of results: W&B and JSONL only (the table below is the console view)
    metrics = Metrics(replace(cfg.logging, plot=False), out_dir, to_dict(cfg) | {"checkpoint": str(checkpoint)},
                      console_lines=False)
    try:
        # Every file is read and checked before an engine starts: a bad path or an all-bad file fails in seconds.
        loaded = {name: (path, *load_benchmark(path, cfg, builder, e.limit))
                  for name, path in benchmark_files(cfg, run_dir).items()}
        for name, (path, examples, report) in loaded.items():
            if responses:
                res = score_responses(examples, read_responses(Path(responses), examples, e.k), scorer, cfg.reward,
                                      d.prompt_style, e.k)
            else:
                if engines is None:
                    from megaapo.rollout import make_rollout

                    engines = make_rollout(cfg.rollout, model_path, cfg.model.dtype, min_pixels=d.min_pixels,
                                           max_pixels=d.max_pixels, log_dir=out_dir / "engines")
                res = evaluate(engines, examples, builder, scorer, cfg.reward, max_new_tokens=max_new, k=e.k,
                               temperature=e.temperature, seed=e.seed)
            res.skipped = dict(report.skipped)
            results[name] = res
            _write_benchmark(out_dir / name, name, path, res, report, checkpoint, e.k)
            log.info("%s: accuracy %.1f%% over %d prompts (%d rows skipped)", name, 100 * res.accuracy, res.n,
                     sum(report.skipped.values()))
        table = markdown_table(results, e.k)
        (out_dir / "results.md").write_text(f"# eval of {checkpoint}\n\n{table}")
        (out_dir / "results.json").write_text(json.dumps(
            {"checkpoint": str(checkpoint), "k": e.k, "temperature": e.temperature, "max_new_tokens": max_new,
             "benchmarks": {n: _summary(r) for n, r in results.items()}}, indent=2))
        row = {}
        for n, r in results.items():
            row |= r.metrics(prefix=f"eval/{n}") | {f"eval/{n}/skipped": sum(r.skipped.values())}
        metrics.log(0, row)
        sys.stdout.write(table)
        print(f"results: {out_dir / 'results.md'}, {out_dir / 'results.json'}")
    finally:
        metrics.finish(summary=False)
        scorer.close()
        if engines is not None:
            engines.shutdown()
        if dist.get_world_size() > 1:
            dist.barrier()
    return results


def _summary(r: EvalResult) -> dict:
    return {"prompts": r.n, "accuracy": r.accuracy, "format": r.format, "pass_at_k": r.pass_at_k,
            "by_category": r.by_category, "category_prompts": r.counts, "skipped_rows": r.skipped,
            "scoring_failures": r.scoring_failures, "seconds": r.seconds}


def _write_benchmark(out: Path, name: str, path: Path, res: EvalResult, report, checkpoint, k: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"benchmark": name, "file": str(path), "checkpoint": str(checkpoint),
                                                  "k": k, **_summary(res), "skip_report": report.summary()},
                                                 indent=2))
    with (out / "responses.jsonl").open("w") as f:
        for row in res.rows:
            f.write(json.dumps(row) + "\n")
