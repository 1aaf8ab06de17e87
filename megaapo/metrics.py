"""The one metrics component of a run: W&B, a console line, a JSONL file, a progress bar, a plot and a summary table.

Who calls it: `megaapo/train.py` (and sft/eval) build one `Metrics` per process with `enabled=True` only on the
loss-visible rank (first rank of the last pipeline stage); everywhere else every call is a cheap no-op, so the loop
never branches on rank to log. Per step the loop times phases with `metrics.timer("rollout")`, then calls
`metrics.log(step, {...})` once; at the end `metrics.finish()` writes the PNG and prints the summary table.

Sinks:
- W&B: `logging.wandb=auto` is online when `WANDB_API_KEY` is set and an offline run directory under
  `<run_dir>/wandb/` otherwise (`wandb sync` uploads it later). Login never prompts; any W&B failure is one warning
  and the run goes on without it. On resume the same run id continues (`resume="allow"`); W&B ignores steps at or below
  the last one it already holds, and exact resume makes those equal to what it holds.
- JSONL: `<run_dir>/metrics.jsonl`, one flushed line per step, always valid JSON: a NaN/inf value is written as
  `null` and the row lists those keys under `"nonfinite"` (W&B gets the float itself). Built with `start_step=k`,
  rows with step >= k are dropped first (atomically) and every other line is kept, so after a resume the file equals
  an uninterrupted run's and no earlier row is ever lost. A failed write (disk full) is a `WriteError` naming the file.
- Console: a compact line every `logging.console_every` steps. In a terminal it is cropped to the window's width
  and printed above a live progress bar; in a file or pipe (CI, SLURM output, `megaapo train > log.txt`) there is
  no bar and each line is written whole, one per step, with the ETA at its end (rich would otherwise wrap it at 80
  columns, in the middle of a field).

Key names the loop, the plot and the table agree on (anything else is logged as given): `reward/total`,
`reward/<component>`, `train/accuracy`, `eval/accuracy`, `len/mean`, `kl`, `entropy`, `clip_frac`, `time/<phase>`
(seconds in this step), `time/step`, `perf/tokens_per_s`, `perf/mfu`.

Also here: `flops_per_token` and `mfu` (model FLOPs utilisation) helpers, and `device_peak_flops`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

from megaapo.config import LoggingConfig
from megaapo.rundir import writing

log = logging.getLogger(__name__)

REWARD_KEY = "reward/total"
TRAIN_ACC_KEY = "train/accuracy"
EVAL_ACC_KEY = "eval/accuracy"
PLOT_KEYS = (REWARD_KEY, EVAL_ACC_KEY)
# key -> short console label; keys absent from a step are skipped
CONSOLE_KEYS = {REWARD_KEY: "reward", TRAIN_ACC_KEY: "acc", EVAL_ACC_KEY: "eval_acc", "len/mean": "len", "kl": "kl",
                "entropy": "ent", "clip_frac": "clip", "sft/loss": "loss", "eval/loss": "eval_loss",
                "eval/format": "eval_fmt", "eval/answered": "eval_ans", "perf/tokens_per_s": "tok/s", "perf/mfu": "mfu",
                "time/step": "s/step"}
SUMMARY_KEYS = (REWARD_KEY, TRAIN_ACC_KEY, EVAL_ACC_KEY, "len/mean", "kl", "entropy", "clip_frac",
                "perf/tokens_per_s", "perf/mfu")
# What the progress bar, the plot and the summary table show, per kind of run.
VIEWS = {
    "rl": {"bar": {REWARD_KEY: "reward", TRAIN_ACC_KEY: "acc"}, "plot": PLOT_KEYS, "summary": SUMMARY_KEYS},
    "sft": {"bar": {"sft/loss": "loss", "eval/loss": "eval loss"},
            "plot": ("sft/loss", "eval/loss", "eval/format", EVAL_ACC_KEY),
            "summary": ("sft/loss", "eval/loss", "eval/format", EVAL_ACC_KEY, "grad_norm", "perf/tokens_per_s",
                        "perf/mfu")},
}
JSONL_NAME = "metrics.jsonl"

Number = Union[int, float]


class Metrics:
    """W&B + console + JSONL for one process; `enabled=False` makes every method a no-op.

    start_step: the first step this run will log; JSONL lines at or after it are dropped (0 for a fresh run).
    run_id: the W&B run id to continue (from the checkpoint's train state); None starts a new run.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Union[str, Path], config_dict: Optional[dict] = None,
                 enabled: bool = True, *, start_step: int = 0, run_id: Optional[str] = None,
                 console: Any = None, kind: str = "rl", console_lines: bool = True) -> None:
        self.cfg = cfg
        self.console_lines = console_lines   # False: W&B and JSONL only (a caller that prints its own table)
        self.view = VIEWS[kind]
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / JSONL_NAME
        self.wandb_mode = "disabled"
        self._run = None
        self._jsonl = None
        self._timers: dict[str, float] = {}
        self._progress = None
        self._task = None
        self._last_log_t = time.perf_counter()
        self._step_times: list[float] = []
        self._rows_logged = 0
        self._total: Optional[int] = None
        if not enabled:
            return
        from rich.console import Console

        self.console = console or Console()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            with writing(self.jsonl_path):
                self._jsonl = _open_jsonl(self.jsonl_path, start_step)
        self._run = self._init_wandb(config_dict or {}, run_id)

    # ------------------------------------------------------------------------------------------------ W&B
    def _init_wandb(self, config_dict: dict, run_id: Optional[str]):
        mode = _wandb_mode(self.cfg.wandb)
        if mode == "disabled":
            return None
        try:
            import wandb
        except ImportError as e:
            log.warning("W&B unavailable (%s); continuing with console and JSONL only", e)
            return None
        try:
            # prompt=False: a job on a cluster must never sit waiting for a key; WANDB_API_KEY is read from the env
            if mode == "online" and not wandb.login(prompt=False, verify=False):
                log.warning("W&B: no credentials (set WANDB_API_KEY or run `wandb login`); logging to an offline "
                            "run directory under %s instead", self.run_dir / "wandb")
                mode = "offline"
        except Exception as e:  # noqa: BLE001 -- W&B is optional: any failure must not end a training run
            log.warning("W&B login failed (%s: %s); logging offline", type(e).__name__, e)
            mode = "offline"
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                run = wandb.init(project=self.cfg.project, entity=self.cfg.entity or None,
                                 name=self.cfg.run_name or None, tags=list(self.cfg.tags) or None, config=config_dict,
                                 dir=str(self.run_dir), mode=attempt, id=run_id, resume="allow" if run_id else None,
                                 reinit="create_new",
                                 # our console owns stdout; W&B's capture would duplicate each line and fight rich
                                 settings=wandb.Settings(console="off", silent=attempt == "offline", save_code=False))
            except Exception as e:  # noqa: BLE001 -- as above
                log.warning("W&B init failed in %s mode (%s: %s); %s", attempt, type(e).__name__, e,
                            "trying offline" if attempt != "offline" else
                            "continuing with console and JSONL only (logging.wandb=disabled silences this)")
                continue
            self.wandb_mode = attempt
            if attempt == "offline":
                self.console.print(f"W&B offline run: {Path(run.dir).parent} (upload it with `wandb sync`)",
                                   soft_wrap=True)
            return run
        return None

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run id to store in checkpoints, so a resumed run continues the same W&B run."""
        return self._run.id if self._run is not None else None

    @property
    def wandb_dir(self) -> Optional[Path]:
        """The W&B run directory (offline: what `wandb sync` uploads), or None without W&B."""
        return Path(self._run.dir).parent if self._run is not None else None

    # ------------------------------------------------------------------------------------------------ logging
    @contextmanager
    def timer(self, phase: str, cuda_sync: bool = False) -> Iterator[None]:
        """Add the seconds spent in the block to `time/<phase>` of the current step (reset by `log`).

        cuda_sync: synchronise the GPU at both ends; without it a phase of async kernel launches measures only the
        launches and its real cost lands in whichever later phase first waits on the GPU.
        """
        if not self.enabled:
            yield
            return
        _maybe_cuda_sync(cuda_sync)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _maybe_cuda_sync(cuda_sync)
            self._timers[phase] = self._timers.get(phase, 0.0) + time.perf_counter() - t0

    def log(self, step: int, values: Mapping[str, Any]) -> dict:
        """Record one step everywhere; adds `time/<phase>` from the timers and `time/step`. Returns what was logged."""
        if not self.enabled:
            return {}
        now = time.perf_counter()
        row: dict[str, Any] = {f"time/{k}": v for k, v in self._timers.items()}
        row["time/step"] = now - self._last_log_t
        row.update({k: _scalar(k, v) for k, v in values.items()})
        self._timers.clear()
        self._last_log_t = now
        if self._rows_logged:   # the first row also spans the start-up (engine start, warm-up): not a step's time
            self._step_times = (self._step_times + [row["time/step"]])[-20:]
        self._rows_logged += 1
        if self._jsonl is not None:
            # flush, not fsync: a killed process loses nothing the kernel already holds, and resume rewrites the tail
            with writing(self.jsonl_path, f"logging step {step}"):
                self._jsonl.write(json_line(step, row))
                self._jsonl.flush()
        self._log_wandb(step, row)
        if self.console_lines and step % self.cfg.console_every == 0:
            self._print_line(step, row)
        self._advance_progress(step, row)
        return row

    @property
    def _live(self) -> bool:
        """Whether the console redraws in place (a terminal or a notebook): only there is a live bar readable."""
        return self.console.is_terminal or self.console.is_jupyter

    def _print_line(self, step: int, row: dict) -> None:
        if self._live:   # one screen line above the bar; the bar itself shows the rate and the ETA
            self.console.print(format_line(step, row, self._total), no_wrap=True, overflow="ellipsis")
            return
        eta = None
        if self._total and self._step_times:
            eta = _fmt_duration(max(0, self._total - step) * sum(self._step_times) / len(self._step_times))
        self.console.print(format_line(step, row, self._total, eta=eta), soft_wrap=True)

    def _log_wandb(self, step: int, row: dict) -> None:
        if self._run is None:
            return
        try:
            self._run.log(row, step=step)
        except Exception as e:  # noqa: BLE001 -- a W&B outage must not end a training run
            log.warning("W&B log failed at step %d (%s: %s); W&B disabled for the rest of the run",
                        step, type(e).__name__, e)
            self._run = None

    # ------------------------------------------------------------------------------------------------ progress
    @contextmanager
    def progress(self, total: int, start: int = 0, description: str = "RL") -> Iterator[None]:
        """A live bar (step, reward, accuracy, s/step, ETA) advanced by `log`; console lines print above it. In a
        file or pipe there is no bar (it cannot redraw there): the per-step lines carry the progress."""
        if not self.enabled:
            yield
            return
        self._total = total
        self._last_log_t = time.perf_counter()   # setup before the loop is not a step
        if not self._live:
            yield
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[values]}  {task.fields[rate]}  ETA {task.fields[eta]}"), TimeElapsedColumn())
        self._progress = Progress(*cols, console=self.console, transient=False)
        self._task = self._progress.add_task(description, total=total, completed=start, rate="-", eta="-",
                                             values="  ".join(f"{label} -" for label in self.view["bar"].values()))
        self._bar_values: dict = {}
        try:
            with self._progress:
                yield
        finally:
            self._progress = self._task = None

    def _advance_progress(self, step: int, row: dict) -> None:
        if self._progress is None:
            return
        # the mean of recent step times, not rich's 30 s speed window: RL steps can each take longer than that
        per_step = sum(self._step_times) / len(self._step_times) if self._step_times else None
        remaining = max(0, (self._total or 0) - step)   # the loops log step k after their k-th step
        # a key missing from this step (held-out loss between evals) keeps its last value on the bar
        self._bar_values.update({k: row[k] for k in self.view["bar"] if k in row})
        values = "  ".join(f"{label} {_fmt(self._bar_values.get(k))}" for k, label in self.view["bar"].items())
        rate, eta = ("-", "-") if per_step is None else (f"{per_step:.2f} s/step", _fmt_duration(remaining * per_step))
        self._progress.update(self._task, completed=step, values=values, rate=rate, eta=eta)

    # ------------------------------------------------------------------------------------------------ end
    def finish(self, summary: bool = True, exit_code: int = 0) -> Optional[Path]:
        """Close the sinks; with `logging.plot` write `<run_dir>/metrics.png` (returned); print the summary tables."""
        if not self.enabled:
            return None
        png = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            if self.cfg.plot:
                with writing(self.run_dir / "metrics.png"):
                    png = plot(self.jsonl_path, self.run_dir / "metrics.png", keys=self.view["plot"],
                               title=self.cfg.run_name or None)
            if summary:
                summary_table(self.jsonl_path, keys=self.view["summary"], console=self.console)
                timing_table(self.jsonl_path, console=self.console)
        if self._run is not None:
            try:
                self._run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001 -- the run's results are already on disk
                log.warning("W&B finish failed (%s: %s)", type(e).__name__, e)
            self._run = None
        return png

    def __enter__(self) -> "Metrics":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(summary=exc_type is None, exit_code=0 if exc_type is None else 1)


def _wandb_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE", "")
    if env in ("offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def json_line(step: int, row: Mapping[str, Any]) -> str:
    """One JSONL line: NaN/inf (which `json.dumps` would write as bare `NaN`, not JSON) become null, and the row
    names them under "nonfinite" so that they are counted rather than lost."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        row = {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}
    return json.dumps({"step": step, **row}, allow_nan=False) + "\n"


def _open_jsonl(path: Path, start_step: int):
    """Drop the rows with step >= start_step (this run logs them again) and a half-written last line (a SIGKILL
    mid-write; always the newest row), keep every other line as it is, then append."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and not _row_at_or_after(line, start_step)]
        if kept != lines:
            tmp = path.with_name(path.name + ".tmp")
            try:
                tmp.write_text("".join(kept))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return open(path, "a", buffering=1)


def _row_at_or_after(line: str, start_step: int) -> bool:
    try:
        return json.loads(line)["step"] >= start_step
    except (ValueError, KeyError, TypeError):
        return False


def _scalar(key: str, value: Any) -> Union[Number, str, bool]:
    if isinstance(value, (bool, int, float, str)):
        return value
    numel = getattr(value, "numel", None)   # torch tensors; numpy scalars and arrays carry `size` instead
    n = numel() if callable(numel) else getattr(value, "size", None)
    if n == 1 and hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metric {key!r}: expected a number, a one-element tensor or a string, got {type(value).__name__}")


def _maybe_cuda_sync(enabled: bool) -> None:
    if enabled:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a >= 1000:
            return f"{v:.0f}"
        return f"{v:.4g}" if a >= 1 else f"{v:.3g}" if (a and a < 1e-2) else f"{v:.3f}"
    return str(v)


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def format_line(step: int, row: Mapping[str, Any], total: Optional[int] = None, eta: Optional[str] = None) -> str:
    """The compact console line: `step 12/100  reward 0.530  acc 0.400  kl 1.2e-03 ...  eta 1:30`."""
    head = f"step {step}" + (f"/{total}" if total else "")
    parts = [f"[bold]{head}[/]"] + [f"{label} {_fmt(row[k])}" for k, label in CONSOLE_KEYS.items() if k in row]
    return "  ".join(parts + ([f"eta {eta}"] if eta else []))


# ---------------------------------------------------------------------------------------------------- files
def read_jsonl(path: Union[str, Path]) -> list[dict]:
    """The rows of a metrics JSONL file; an unfinished last line (process killed mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _series(rows: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot(jsonl_path: Union[str, Path], out_png: Union[str, Path], keys: Iterable[str] = PLOT_KEYS,
         title: Optional[str] = None) -> Path:
    """One panel per key over steps (default: reward and held-out accuracy) as a PNG; returns its path.

    Uses matplotlib's object API on the Agg canvas, never pyplot, so it neither needs a display nor changes the
    caller's backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_jsonl(jsonl_path)
    keys = list(keys)
    fig = Figure(figsize=(7, 2.4 * len(keys)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        xs, ys = _series(rows, key)
        if xs:
            # sparse series (held-out accuracy every eval_every steps) need markers to be readable
            ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, linewidth=1.5)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def summary_table(source: Union[str, Path, list[dict]], keys: Iterable[str] = SUMMARY_KEYS,
                  title: str = "megaapo run summary", console: Any = None):
    """A rich Table of first/last/min/max of each key present; printed on `console` when given, and returned."""
    from rich.table import Table

    rows = read_jsonl(source) if isinstance(source, (str, Path)) else list(source)
    table = Table(title=title)
    for col in ("metric", "first", "last", "min", "max"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in keys:
        _, ys = _series(rows, key)
        if ys:
            table.add_row(key, _fmt(ys[0]), _fmt(ys[-1]), _fmt(min(ys)), _fmt(max(ys)))
    if rows:
        table.caption = f"{len(rows)} steps ({rows[0]['step']}..{rows[-1]['step']})"
    if console is not None:
        console.print(table)
    return table


def timing_table(source: Union[str, Path, list[dict]], console: Any = None):
    """A rich Table of where the step time went: total, mean per step and share of each `time/<phase>`."""
    from rich.table import Table

    rows = read_jsonl(source) if isinstance(source, (str, Path)) else list(source)
    totals: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("time/") and k != "time/step" and isinstance(v, (int, float)):
                totals[k[5:]] = totals.get(k[5:], 0.0) + v
    wall = sum(r.get("time/step", 0.0) for r in rows)
    table = Table(title="time per phase")
    for col in ("phase", "total", "per step", "share"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for phase, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        share = f"{100 * total / wall:.0f}%" if wall > 0 else "-"
        table.add_row(phase, _fmt_duration(total) if total >= 60 else f"{total:.2f} s",
                      f"{total / max(1, len(rows)):.3f} s", share)
    table.add_row("step (wall)", _fmt_duration(wall) if wall >= 60 else f"{wall:.2f} s",
                  f"{wall / max(1, len(rows)):.3f} s", "100%" if wall > 0 else "-")
    if console is not None:
        console.print(table)
    return table


# ---------------------------------------------------------------------------------------------------- FLOPs
def flops_per_token(*, hidden_size: int, num_layers: int, intermediate_size: int, vocab_size: int, seq_len: float,
                    num_heads: int, num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                    gated_mlp: bool = True, causal: bool = True, backward: bool = True) -> float:
    """Model FLOPs per token of a decoder, the numerator of MFU (recompute is not counted: that would be HFU).

    With h=hidden_size, L=num_layers, f=intermediate_size, V=vocab_size, a=num_heads*head_dim (query width),
    k=num_kv_heads*head_dim:
        N_matmul = L * (h*a + 2*h*k + a*h  +  m*h*f) + h*V          m = 3 for a gated (SwiGLU) MLP, else 2
        attn     = L * 2 * 2 * a * s_ctx                            QK^T and AV: 2 FLOPs per multiply-add each
        s_ctx    = (seq_len + 1) / 2 if causal else seq_len         mean keys a query attends to
        forward  = 2 * N_matmul + attn;   training = 3 * forward    (backward costs twice the forward)
    i.e. the familiar 6N + 12*L*h*s of PaLM, with the attention term halved for causal masks, as FlashAttention
    counts it. seq_len is the length of the sequences the tokens belong to: packed sequences attend only within
    themselves. Embedding lookups, norms, activations and softmax are left out (small, and not matmul-bound).
    Vision tower: call it again with its own shape, causal=False and vocab_size=0.
    """
    head_dim = head_dim or hidden_size // num_heads
    kv = num_kv_heads or num_heads
    a, k = num_heads * head_dim, kv * head_dim
    m = 3 if gated_mlp else 2
    n_matmul = num_layers * (hidden_size * a + 2 * hidden_size * k + a * hidden_size
                             + m * hidden_size * intermediate_size) + hidden_size * vocab_size
    s_ctx = (seq_len + 1) / 2 if causal else seq_len
    forward = 2 * n_matmul + num_layers * 4 * a * s_ctx
    return float(3 * forward if backward else forward)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the hardware's peak (all devices together).

    peak_flops: dense peak of every device doing the work, e.g. `device_peak_flops() * world_size`; None (CPU,
    unknown GPU) gives None rather than a made-up number.
    """
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


# dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s per device
_PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12),
              ("RTX 4090", 165e12))


def device_peak_flops(dtype: str = "bfloat16", device_name: Optional[str] = None) -> Optional[float]:
    """Dense bf16/fp16 peak FLOP/s of the current (or named) CUDA device; float32 counts as TF32 (half); None when
    unknown or on CPU."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for pattern, peak in _PEAK_BF16:
        if pattern.lower() in device_name.lower():
            return peak / 2 if dtype == "float32" else peak
    return None
