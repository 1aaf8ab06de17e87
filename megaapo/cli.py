"""The `megaapo` command: train, config, data (synth, check), model (tiny), and the subcommands of later stages.

    megaapo train [CONFIG] [section.key=value ...]      the RL job (default CONFIG: configs/demo.yaml)
    megaapo sft CONFIG [section.key=value ...]          supervised fine-tuning (R1-VL's warm-up; configs/sft_demo.yaml)
    megaapo eval [CONFIG] --checkpoint PATH [--bench NAME=FILE ...] [--responses FILE] [section.key=value ...]
                                                        score a checkpoint on benchmark files
    megaapo config PRESET [section.key=value ...]       print the resolved config as YAML
    megaapo plan CONFIG [--gpus N] [section.key=value ...]
                                                        a step's GPU memory per rank, traced on CPU, and the verdict
    megaapo data synth --out DIR --n N --seed S         render the synthetic multimodal reasoning dataset
    megaapo data check PATH [--model DIR]               validate a data file and print counts per skip reason
    megaapo model tiny --out DIR [--vocab small|real]   write a tiny random-weight Qwen2.5-VL checkpoint
    megaapo convert hf-to-mcore SRC DST --tp T --pp P   shard an HF checkpoint for the learner
    megaapo convert mcore-to-hf SRC DST                 gather a sharded (or training) checkpoint back to HF (bit-exact)
    megaapo convert reshard SRC DST --tp T --pp P       re-lay out a sharded or training checkpoint
    megaapo check parity --hf DIR --tp T --pp P         learner vs transformers: logits, log-probs, gradients
    megaapo check parity --hf DIR --packed              the same with the batch packed into one row

User mistakes (bad config keys, missing files, unusable data, a run directory another run holds) end with one clear
message and exit code 2; faults (an engine that died, a disk that filled up, a read-only or forbidden output
directory, a policy that went NaN) with one `error:` line naming the thing and the cause, and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from megaapo import __version__, rundir
from megaapo.errors import report_errors

log = logging.getLogger("megaapo")


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


# ---------------------------------------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    from megaapo.config import load_config, to_yaml

    cfg = load_config(args.preset, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from megaapo.config import load_config
    from megaapo.memory import plan_memory, render

    cfg = load_config(args.config, args.overrides)
    plan = plan_memory(cfg, world_size=args.gpus, gpu=args.gpu, target=args.target)
    print(render(plan, title=args.config))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=1, default=str))
    return 0 if plan.fits else 1


# ------------------------------------------------------------------------------------------------ data
def cmd_data_synth(args: argparse.Namespace) -> int:
    from megaapo.data.synth import generate

    t0 = time.perf_counter()
    paths = generate(args.out, args.n, args.n_eval, seed=args.seed, tasks=args.tasks, levels=args.levels,
                     image_size=args.size)
    n = args.n + args.n_eval
    print(f"wrote {args.n} train + {args.n_eval} held-out rows ({n / (time.perf_counter() - t0):.0f} rows/s): "
          f"{paths['train']}, {paths['eval']}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from rich.table import Table

    from megaapo.data import SKIP_REASONS, load_examples
    from megaapo.data.schema import DataError

    prompt_tokens = None
    if args.model:
        from transformers import AutoTokenizer

        from megaapo.data import PromptBuilder

        builder = PromptBuilder(AutoTokenizer.from_pretrained(args.model), args.style, args.min_pixels,
                                args.max_pixels)
        prompt_tokens = builder.num_tokens
    try:
        examples, report = load_examples(args.path, fmt=args.format, image_root=args.image_root,
                                         prompt_tokens=prompt_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                         progress=sys.stderr.isatty())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.path}: {report.kept} of {report.total} rows usable")
    table = Table()
    table.add_column("reason")
    table.add_column("rows", justify="right")
    table.add_column("first rows")
    table.add_row("ok", str(report.kept), "")
    for reason in SKIP_REASONS:
        if report.skipped.get(reason):
            first = "; ".join(f"{r}: {d}" if d else str(r) for r, d in report.samples[reason])
            table.add_row(f"skipped: {reason}", str(report.skipped[reason]), first)
    _console().print(table)
    tasks: dict = {}
    for ex in examples:
        key = (ex.meta.get("task", "-"), ex.meta.get("level", "-"))
        tasks[key] = tasks.get(key, 0) + 1
    if len(tasks) > 1:
        print("by task/level: " + ", ".join(f"{t}/{lv}={n}" for (t, lv), n in sorted(tasks.items(), key=str)))
    return 0


# ----------------------------------------------------------------------------------------------- model
def cmd_model_tiny(args: argparse.Namespace) -> int:
    from megaapo.models.tiny import build_tiny

    t0 = time.perf_counter()
    path = build_tiny(args.out, vocab=args.vocab, tie_embeddings=args.tie_embeddings, hidden_size=args.hidden,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      intermediate_size=args.intermediate, vision_depth=args.vision_depth,
                      vision_hidden_size=args.vision_hidden, seed=args.seed, dtype=args.dtype)
    print(f"wrote a tiny Qwen2.5-VL ({args.vocab} vocabulary) to {path} in {time.perf_counter() - t0:.1f}s")
    return 0


# ------------------------------------------------------------------------------------- convert, check
def cmd_convert(args: argparse.Namespace) -> int:
    from megaapo.convert import hf_to_mcore, mcore_to_hf, reshard

    t0 = time.perf_counter()
    if args.convert_command == "hf-to-mcore":
        out = hf_to_mcore(args.src, args.dst, tp=args.tp, pp=args.pp)
    elif args.convert_command == "reshard":
        out = reshard(args.src, args.dst, tp=args.tp, pp=args.pp, dp=args.dp)
    else:
        out = mcore_to_hf(args.src, args.dst)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_check_parity(args: argparse.Namespace) -> int:
    from rich.table import Table

    from megaapo.parity import check

    res = check(args.hf, tp=args.tp, pp=args.pp, packed=args.packed)
    layout = "one packed row" if args.packed else "one sample per micro-batch"
    table = Table(title=f"megatron-core learner vs transformers, tp={args.tp} pp={args.pp}, {layout} (fp32)")
    for col in ("quantity", "max relative error", f"within {args.tol:g}"):
        table.add_column(col)
    ok = True
    for q in ("logits", "logp", "grads"):
        good = res[q] <= args.tol
        ok &= good
        label = f"grads ({res['n_grads']} tensors; worst {res['worst_grad']})" if q == "grads" else q
        table.add_row(label, f"{res[q]:.2e}", "yes" if good else "NO")
    _console().print(table)
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from megaapo.assets import prepare_inputs
    from megaapo.config import DEFAULT_PRESET, load_config, to_yaml

    if args.config and "=" in args.config:   # `megaapo train key=value ...`: overrides of the default preset
        args.overrides, args.config = [args.config, *args.overrides], None
    cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
    run_dir = Path(cfg.trainer.output_dir)
    rundir.acquire(run_dir)   # one writer per run directory, before anything is written there
    with rundir.writing(run_dir):
        rundir.write_text(run_dir / "config.yaml", to_yaml(cfg))
        inputs = prepare_inputs(cfg.model, cfg.data, run_dir)
    for r in inputs.reports:
        print(r.summary())
    print(f"model: {inputs.model_path}\ntrain rows: {len(inputs.train)}, held-out rows: {len(inputs.eval)}\n"
          f"algorithm: {cfg.algo.name}, rewards: {dict(cfg.reward.functions)}, "
          f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.n_samples} samples per step")
    if cfg.trainer.dry_run:
        from megaapo.models.qwen2_5_vl.config import check_layout, lm_shape, load_hf_config

        from megaapo.run import plan_run

        check_layout(lm_shape(load_hf_config(inputs.model_path)), cfg.parallel.tp, cfg.parallel.pp)
        print(f"placement: {plan_run(cfg).describe()}")
        print(f"dry run: config, model, data and the tp={cfg.parallel.tp} x pp={cfg.parallel.pp} layout are valid; "
              "nothing trained")
        return 0
    from megaapo.train import main as train_main

    return train_main(cfg)


def cmd_sft(args: argparse.Namespace) -> int:
    from megaapo.assets import prepare_inputs
    from megaapo.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.trainer.output_dir)
    rundir.acquire(run_dir)   # one writer per run directory, before anything is written there
    if cfg.trainer.dry_run:
        with rundir.writing(run_dir):
            inputs = prepare_inputs(cfg.model, cfg.data, run_dir, supervised=True)
        print(f"dry run: {len(inputs.train)} training conversations, {len(inputs.eval)} held-out; nothing trained")
        return 0
    from megaapo.sft import main as sft_main

    return sft_main(cfg)


def run_config_of(checkpoint: str) -> str | None:
    """The config.yaml of the run a checkpoint came from (a run dir, its hf_final/, or checkpoints/step_N)."""
    p = Path(checkpoint)
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.yaml").is_file() and ((d / "checkpoints").is_dir() or (d / "hf_final").is_dir()):
            return str(d / "config.yaml")
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from megaapo.config import DEFAULT_PRESET, load_config

    if args.config and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    preset = args.config or run_config_of(args.checkpoint) or DEFAULT_PRESET
    overrides = list(args.overrides)
    if args.bench:
        bad = [b for b in args.bench if "=" not in b]
        if bad:
            raise ValueError(f"--bench {bad[0]!r}: expected NAME=FILE")
        overrides.append("eval.benchmarks={" + ", ".join(f"{b.split('=', 1)[0]}: '{b.split('=', 1)[1]}'"
                                                         for b in args.bench) + "}")
    cfg = load_config(preset, overrides)
    print(f"config: {preset}")
    from megaapo.evaluate import run_eval

    run_eval(cfg, args.checkpoint, responses=args.responses)
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaapo", description="RL for Qwen2.5-VL reasoning models (APO, StepGRPO, "
                                                            "GRPO-family baselines) on megatron-core + vLLM")
    p.add_argument("--version", action="version", version=f"megaapo {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="run RL training (default: configs/demo.yaml, the CPU demo)")
    t.add_argument("config", nargs="?", help="preset name or YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.kl_coef=0.04")
    t.set_defaults(fn=cmd_train)

    sf = sub.add_parser("sft", help="supervised fine-tuning on conversations with images (R1-VL's warm-up)")
    sf.add_argument("config", help="preset name or YAML file (configs/sft_demo.yaml: the CPU demo)")
    sf.add_argument("overrides", nargs="*")
    sf.set_defaults(fn=cmd_sft)

    ev = sub.add_parser("eval", help="score a checkpoint on benchmark files (greedy or pass@k) with the reward code")
    ev.add_argument("config", nargs="?", help="preset or YAML (default: the checkpoint's run config, else demo)")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--checkpoint", required=True, help="HF directory, run directory, or checkpoints/step_N")
    ev.add_argument("--bench", action="append", default=[], metavar="NAME=FILE",
                    help="a benchmark file (repeatable); default: eval.benchmarks, else data.eval_path, else the "
                         "synthetic held-out split")
    ev.add_argument("--responses", default=None, help="re-score saved responses ({id, response} JSONL) instead "
                                                      "of generating")
    ev.set_defaults(fn=cmd_eval)

    c = sub.add_parser("config", help="print a resolved config as YAML")
    c.add_argument("preset", help="preset name (demo, apo_view_r1_3b, ...) or YAML file")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=cmd_config)

    pl = sub.add_parser("plan", help="a training step's GPU memory per rank, traced on CPU with fake tensors, "
                                     "and whether the layout fits the GPU (exit 1 when it does not)")
    pl.add_argument("config", help="preset name or YAML file")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, default=None, help="trainer GPUs (world size; default parallel.tp x pp)")
    pl.add_argument("--gpu", default=None, help="GPU name or size (default trainer.gpu; auto: this GPU, else "
                                                "h100-80gb)")
    pl.add_argument("--target", default="cuda", choices=["cuda", "cpu"],
                    help="cuda: the GPU code paths (default); cpu: this machine's, as the CPU cross-check uses")
    pl.add_argument("--json", default="", help="also write the plan as JSON here")
    pl.set_defaults(fn=cmd_plan)

    d = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="render the synthetic multimodal reasoning dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, required=True, help="training rows")
    s.add_argument("--n-eval", type=int, default=200, help="held-out rows")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tasks", nargs="+", default=None, help="task families (default: all)")
    s.add_argument("--levels", nargs="+", type=int, default=None, help="difficulty levels 1-3 (default: all)")
    s.add_argument("--size", type=int, default=112, help="image side in pixels")
    s.set_defaults(fn=cmd_data_synth)
    k = d.add_parser("check", help="validate a data file (JSONL or Parquet) and print counts")
    k.add_argument("path")
    k.add_argument("--format", default="auto", choices=["auto", "megaapo", "view_r1", "r1vl", "conversation",
                                                         "mathvista", "mathverse"])
    k.add_argument("--image-root", default="")
    k.add_argument("--model", default="", help="checkpoint whose tokenizer measures prompt lengths")
    k.add_argument("--style", default="r1", choices=["r1", "r1vl", "direct", "plain"])
    k.add_argument("--max-prompt-tokens", type=int, default=4096)
    k.add_argument("--min-pixels", type=int, default=3136)
    k.add_argument("--max-pixels", type=int, default=1003520)
    k.set_defaults(fn=cmd_data_check)

    m = sub.add_parser("model", help="model tools").add_subparsers(dest="model_command", required=True)
    tiny = m.add_parser("tiny", help="write a tiny random-weight Qwen2.5-VL checkpoint (HF layout)")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--vocab", default="small", choices=["small", "real"])
    tiny.add_argument("--tie-embeddings", action="store_true")
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=2)
    tiny.add_argument("--intermediate", type=int, default=256)
    tiny.add_argument("--vision-depth", type=int, default=2)
    tiny.add_argument("--vision-hidden", type=int, default=64)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tiny.set_defaults(fn=cmd_model_tiny)

    cv = sub.add_parser("convert", help="checkpoint conversion").add_subparsers(dest="convert_command", required=True)
    h2m = cv.add_parser("hf-to-mcore", help="HF directory -> megatron-core shards for a TP x PP layout")
    h2m.add_argument("src")
    h2m.add_argument("dst")
    h2m.add_argument("--tp", type=int, default=1)
    h2m.add_argument("--pp", type=int, default=1)
    h2m.set_defaults(fn=cmd_convert)
    m2h = cv.add_parser("mcore-to-hf", help="megatron-core shards or a training checkpoint (step_N: its policy) -> "
                                            "HF directory (transformers, vLLM)")
    m2h.add_argument("src")
    m2h.add_argument("dst")
    m2h.set_defaults(fn=cmd_convert)
    rs = cv.add_parser("reshard", help="an hf-to-mcore directory or a training checkpoint (step_N, or a directory of "
                                       "them: the newest) laid out again at TP x PP (x DP); a checkpoint of megaapo's "
                                       "old per-rank format is converted to the current one")
    rs.add_argument("src")
    rs.add_argument("dst")
    rs.add_argument("--tp", type=int, default=1)
    rs.add_argument("--pp", type=int, default=1)
    rs.add_argument("--dp", type=int, default=1, help="data-parallel processes (training checkpoints)")
    rs.set_defaults(fn=cmd_convert)

    ck = sub.add_parser("check", help="correctness checks").add_subparsers(dest="check_command", required=True)
    par = ck.add_parser("parity", help="learner vs transformers on the same weights and a batch with images")
    par.add_argument("--hf", required=True, help="HF Qwen2.5-VL directory (fp32 recommended)")
    par.add_argument("--tp", type=int, default=1)
    par.add_argument("--pp", type=int, default=1)
    par.add_argument("--tol", type=float, default=1e-4, help="max relative error accepted")
    par.add_argument("--packed", action="store_true", help="the learner packs the batch into one row")
    par.set_defaults(fn=cmd_check_parity)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    # Overrides may follow options (`megaapo eval demo --checkpoint X eval.k=4`); argparse leaves those unclaimed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:  # `megaapo` alone runs the main job, like `megaapo train`
        args = build_parser().parse_args(["train", *(argv or [])])
    return report_errors(lambda: args.fn(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
