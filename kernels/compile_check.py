"""Every Triton kernel variant the launchers in kernels/ can start, compiled for sm_80, sm_90 and sm_100 on any
machine (no GPU, no driver): compile errors, register spills and shared memory over the limit, found in CI.

Called by tests/test_kernels_compile.py (CI) and benchmarks/gpu_check.py; by hand:

    python -m kernels.compile_check                 # all variants x sm_80 / sm_90 / sm_100, table of resources
    python -m kernels.compile_check --write-docs    # ... and the table into docs/kernels.md

Where the variants come from: the launchers themselves. The public ops are driven over their input domain (the
dtypes each op accepts, optional inputs, layouts, tensor parallelism on a fake process group, forward-only,
recomputing-backward and gradient-in-forward passes) on small CPU tensors that take the GPU path
(`kernels._common.GPU_PATH_FOR`), with every launched @triton.jit kernel swapped for a recorder, so the launchers
run their own code (cuBLAS's part runs on the CPU) and each launch is noted, with its arguments and keywords,
instead of run. Nothing here restates a constexpr, a block size or num_warps. Each distinct launch is bound by the
kernel's own binder (the function `kernel[grid](...)` builds from the signature: argument dtypes, the equal-to-1
and divisible-by-16 specialisations, the kernel's do_not_specialize lists) and compiled by `triton.compile` for
each architecture with the ptxas in the triton wheel (a real compile each time, Triton's cache bypassed, so that
ptxas reports registers, stack frame and spills).

Checks (any failure exits 1): every launch site in kernels/*.py was reached, and at each one every constexpr bound
to an expression took both values where it is a bool; no integer argument is specialised by value; every variant
compiles for every architecture, spills no register (ptxas's spill stores and loads are 0) and fits the
architecture's shared memory per block.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("fused_logprob", "policy_loss", "group_advantage")    # the modules that launch kernels
ARCHS = (80, 90, 100)
# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100, B200.
SMEM_LIMIT = {80: 166912, 90: 232448, 100: 232448}


# ------------------------------------------------------------------------------------------------ recording
class _Ptr:
    """A tensor argument as the binder sees it: its dtype and an address with the tensor's offset in its storage
    (the caching allocator hands out 512-byte aligned blocks, so the offset decides the 16-byte alignment)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._addr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr


@dataclass
class Launch:
    kernel: object             # the JITFunction
    name: str
    site: tuple                # (file, line) of the launching call
    args: tuple
    kwargs: dict
    key: tuple = ()
    bound: dict = field(default_factory=dict)   # signature, constexprs, attrs, num_warps, num_stages (sm_90 binding)


@functools.lru_cache(maxsize=None)
def _resolved(path: str) -> str:
    return str(Path(path).resolve())


class _Recorder:
    """Stands in for a module's @triton.jit kernel during recording: `kernel[grid](...)` notes the launch."""

    def __init__(self, fn, name, log):
        self.fn, self.name, self.log = fn, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            caller = sys._getframe(1)
            args = tuple(_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: _Ptr(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            site = (_resolved(caller.f_code.co_filename), caller.f_lineno)
            self.log.append(Launch(self.fn, self.name, site, args, kwargs))
        return launch


def launch_sites() -> list[dict]:
    """Every `kernel[grid](...)` call in the kernel modules: file, line span, kernel name, and the keywords bound
    to expressions (not literals), read from the source."""
    import importlib
    sites = []
    for mod_name in MODULES:
        mod = importlib.import_module(f"kernels.{mod_name}")
        path = Path(mod.__file__).resolve()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name) \
                    and isinstance(getattr(mod, node.func.value.id, None), triton.runtime.JITFunction):
                sites.append(dict(module=mod, file=str(path), lines=(node.lineno, node.end_lineno),
                                  kernel=node.func.value.id,
                                  exprs=[k.arg for k in node.keywords if k.arg and not isinstance(k.value,
                                                                                                  ast.Constant)]))
    return sites


@contextlib.contextmanager
def recording():
    """Inside: kernel launches in kernels/ are recorded (the yielded list) instead of run, CPU tensors take the GPU
    path, and a fake process group of 2 ranks is the default group (tensor parallelism: its collectives do
    nothing). No GPU is touched."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import kernels._common as common
    import kernels.policy_loss as pl
    log: list = []
    patched = []
    for site in launch_sites():
        mod, name = site["module"], site["kernel"]
        if not isinstance(getattr(mod, name), _Recorder):
            patched.append((mod, name, getattr(mod, name)))
            setattr(mod, name, _Recorder(getattr(mod, name), name, log))
    if common.INTERPRET:
        raise RuntimeError("kernels.compile_check compiles the real kernels: run it without TRITON_INTERPRET=1")
    saved_ws, common.GPU_PATH_FOR = pl._WORKSPACE, "cpu"
    pl._WORKSPACE = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny CPU matmuls: a thread pool only adds its wake-up latency
    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield log
    finally:
        if own_pg:
            dist.destroy_process_group()
        for mod, name, fn in patched:
            setattr(mod, name, fn)
        common.GPU_PATH_FOR, pl._WORKSPACE = None, saved_ws
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the input domain
def _t(*shape, dtype=torch.float32, grad=False):
    """A small tensor for the recording: zeros (no kernel reads it; the CPU ops around the launches do)."""
    return torch.zeros(*shape, dtype=dtype).requires_grad_(grad)


def drive_logprob():
    """fused_logprob forward-only, and forward + backward from logp and from logp and entropy, into main_grad or
    not; fused_policy_loss on both layouts, mask dtypes and pi_old given or not: over every accepted dtype, logits
    precision, entropy, TP, and 16-aligned or odd vocabularies."""
    import torch.distributed as dist

    from kernels.fused_logprob import DTYPES, fused_logprob
    b, t, h = 3, 20, 16
    for dtype, logits, ent, tp, v in itertools.product(DTYPES, (None, torch.float32), (False, True),
                                                       (None, dist.group.WORLD), (64, 35)):
        v_local = v // 2 if tp is not None else v
        weight = _t(v_local, h, dtype=dtype, grad=True)
        targets = torch.zeros(b * t, dtype=torch.int64)
        kw = dict(tp_group=tp, logits_dtype=logits)
        with torch.no_grad():
            fused_logprob(_t(b * t, h, dtype=dtype), weight, targets, return_entropy=ent, **kw)
        for mg, with_ent in itertools.product((None, _t(v_local, h)), {False, ent}):
            lp, e = fused_logprob(_t(b * t, h, dtype=dtype, grad=True), weight, targets, 0.7, return_entropy=ent,
                                  main_grad=mg, **kw)
            (lp.sum() + (e.sum() if with_ent else 0)).backward()
        # the gradient-in-forward pass: its own row-kernel launches here, its layouts and masks in the sweep below
        fused(dtype, weight, targets, ent, kw, packed=True, mask_dt=torch.bool, on_policy=False, mg=_t(v_local, h))
    dtype, weight, targets = torch.bfloat16, _t(64, h, dtype=torch.bfloat16, grad=True), targets
    for packed, mask_dt, on_policy, mg, ent in itertools.product((False, True), (torch.bool, torch.float32),
                                                                 (False, True), (None, _t(64, h)), (False, True)):
        fused(dtype, weight, targets, ent, {}, packed, mask_dt, on_policy, mg)


def fused(dtype, weight, targets, ent, kw, packed, mask_dt, on_policy, mg, b=3, t=20):
    """One fused_policy_loss forward + backward on `b` x `t` tokens (packed or padded)."""
    from kernels.fused_policy_loss import fused_policy_loss
    from kernels.policy_loss import LossSettings
    s = LossSettings(kl_coef=0.01, entropy_coef=0.01 if ent else 0.0)
    shape = (b * t,) if packed else (b, t)
    seq = torch.zeros(b * t, dtype=torch.int64) if packed else None
    loss, _ = fused_policy_loss(_t(*shape, weight.shape[1], dtype=dtype, grad=True), weight, targets.view(shape),
                                None if on_policy else _t(*shape), _t(b), _t(*shape, dtype=mask_dt), s,
                                seq_index=seq, logp_ref=_t(*shape), kl_weight=_t(b), with_entropy=ent,
                                main_grad=mg, **kw)
    loss.backward()


def drive_policy_loss():
    """policy_loss forward and backward over every layout x mask dtype x optional input x input dtype, the loss
    settings (policy loss, KL estimator, both aggregations: 54) cycled through them, so that each appears with 14
    of the 768 combinations (they only reach runtime arguments; the full cross product would take minutes)."""
    from kernels.policy_loss import AGG_MODES, KL_MODES, PG_MODES, LossSettings, policy_loss
    b, t = 4, 30
    optional = [(False, True)] * 6     # KL term (reference log-probs), kl_weight, TIS, entropy, bonus, normalisers
    modes = itertools.cycle(itertools.product(PG_MODES, KL_MODES, AGG_MODES, AGG_MODES))
    for layout, mask_dt, (kl, w, tis, ent, bonus, norms), fdt in itertools.product(
            ("padded", "padded-token-adv", "packed"), (torch.bool, torch.float32), itertools.product(*optional),
            (torch.float32, torch.bfloat16)):
        pg, est, agg, kl_agg = next(modes)
        s = LossSettings(policy_loss=pg, kl_estimator=est, loss_agg=agg, kl_agg=kl_agg, loss_agg_norm_len=t,
                         kl_coef=0.05 if kl else 0.0, entropy_coef=0.01 if bonus else 0.0)
        shape, seq = ((b * t,), torch.zeros(b * t, dtype=torch.int64)) if layout == "packed" \
            else ((b, t), None)
        adv = _t(*shape, dtype=fdt) if layout == "padded-token-adv" else _t(b, dtype=fdt)
        lp = _t(*shape, dtype=fdt, grad=True)
        loss, _ = policy_loss(lp, _t(*shape, dtype=fdt), adv, _t(*shape, dtype=mask_dt), s, seq_index=seq,
                              logp_ref=_t(*shape, dtype=fdt) if kl else None,
                              kl_weight=_t(b, dtype=fdt) if w else None, tis_weight=_t(*shape, dtype=fdt) if tis
                              else None, entropy=_t(*shape, dtype=fdt, grad=True) if ent else None,
                              num_tokens=100.0 if norms else None, num_seqs=4.0 if norms else None)
        loss.backward()


def drive_group_advantage():
    """group_advantage over every rewards / ids / correct dtype, with and without APO, every estimator and switch."""
    from kernels.group_advantage import ESTIMATORS, group_advantage
    n = 100
    for r_dt, id_dt, apo, c_dt, est, faithful, unbiased, dads, stcr in itertools.product(
            (torch.float32, torch.float64, torch.bfloat16, torch.int64), (torch.int64, torch.int32), (False, True),
            (torch.bool, torch.int64), ESTIMATORS, ("paper", "code"), (True, False), (True, False), (True, False)):
        group_advantage(_t(n, dtype=r_dt), _t(n, dtype=id_dt), estimator=est, unbiased=unbiased,
                        correct=_t(n, dtype=c_dt) if apo else None, lengths=_t(n, dtype=id_dt) if apo else None,
                        dads=dads, stcr=stcr, faithful_to=faithful)


DRIVERS = (drive_logprob, drive_policy_loss, drive_group_advantage)


# ------------------------------------------------------------------------------------------------- binding
@functools.lru_cache(maxsize=None)
def _binder(fn, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def _bind(launch: Launch, arch: int):
    """What `kernel[grid](...)` would compile for `arch`: (signature, constexprs, attrs, options), from the kernel's
    own binder and argument packer."""
    backend, binder = _binder(launch.kernel, arch)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def variants() -> tuple[list[Launch], list[Launch]]:
    """(every recorded launch, the distinct variants among them: distinct in what the kernel's binder makes of
    the arguments, i.e. in what Triton would compile)."""
    with recording() as log:
        for drive in DRIVERS:
            drive()
    distinct: dict = {}
    for launch in log:
        _, binder = _binder(launch.kernel, 90)
        _, spec, opts = binder(*launch.args, **launch.kwargs)
        launch.key = (launch.name, tuple(spec), tuple(sorted(opts.items())))
        if launch.key not in distinct:
            distinct[launch.key] = launch
            signature, constexprs, attrs, options = _bind(launch, 90)
            names = launch.kernel.arg_names
            launch.bound = dict(signature=signature, constexprs={names[p[0]]: v for p, v in constexprs.items()},
                                attrs={names[p[0]]: v for p, v in attrs.items() if v},
                                num_warps=options.num_warps, num_stages=options.num_stages)
    return log, list(distinct.values())


def coverage_problems(log: list[Launch]) -> list[str]:
    """Launch sites never reached, bool constexprs bound to an expression that took only one value at a site, and
    integer arguments Triton specialises by value (== 1, multiple of 16): the domain does not enumerate their
    value classes, so each must be in its kernel's do_not_specialize (or become an explicit constexpr)."""
    problems = []
    for x in {(x.name, x.kernel) for x in log}:
        name, fn = x
        for p in fn.params:
            vals = [ln.args[p.num] if p.num < len(ln.args) else ln.kwargs.get(p.name) for ln in log if ln.name == name]
            if not p.is_constexpr and not p.do_not_specialize \
                    and any(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                problems.append(f"{name}: integer argument {p.name} is specialised by value; add it to the kernel's "
                                f"do_not_specialize")
    for site in launch_sites():
        lo, hi = site["lines"]
        here = [x for x in log if x.site[0] == site["file"] and lo <= x.site[1] <= hi]
        where = f"{Path(site['file']).name}:{lo} ({site['kernel']})"
        if not here:
            problems.append(f"{where}: never launched by the input domain (extend the drivers in compile_check)")
            continue
        for kw in site["exprs"]:
            seen = {x.kwargs.get(kw) for x in here}
            if seen <= {True, False} and len(seen) == 1:
                problems.append(f"{where}: {kw} was always {seen.pop()} (extend the drivers in compile_check)")
    return problems


# ------------------------------------------------------------------------------------------------- compiling
_VARIANTS: list = []    # set before the worker processes fork


def _ptxas_report(log: str, name: str) -> dict:
    """Registers, stack frame, spill stores / loads and static shared memory of `name`, from ptxas's -v report."""
    part = log[log.index(f"Function properties for {name}"):]
    stack, stores, loads = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                              r"(\d+) bytes spill loads", part).groups())
    used = re.search(r"Used (\d+) registers[^\n]*", part)
    smem = re.search(r"(\d+) bytes smem", used.group(0))
    return dict(registers=int(used.group(1)), stack=stack, spill_stores=stores, spill_loads=loads,
                static_shared=int(smem.group(1)) if smem else 0)


def _compile(task) -> dict:
    """Compile one variant for one architecture; ptxas's own report (printed when asked, on a real compile: the
    cache is bypassed) gives the resources."""
    import io

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    idx, arch = task
    launch = _VARIANTS[idx]
    row = dict(variant=idx, arch=arch, kernel=launch.name)
    t0 = time.perf_counter()
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    try:
        signature, constexprs, attrs, options = _bind(launch, arch)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        row.update(_ptxas_report(log.getvalue(), launch.name), shared=compiled.metadata.shared,
                   num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result, reported with its cause
        row["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def compile_all(found: list[Launch], archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """Compile every variant for every architecture, in `jobs` processes (forked: they inherit the variants)."""
    global _VARIANTS
    _VARIANTS = found
    tasks = [(i, a) for a in archs for i in range(len(found))]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile(t) for t in tasks]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile, tasks, chunksize=1)


def failures(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        what = f"{r['kernel']} variant {r['variant']} sm_{r['arch']}"
        if "error" in r:
            out.append(f"{what}: does not compile: {r['error']}")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{what}: spills registers ({r['spill_stores']} B stores, {r['spill_loads']} B loads per "
                       f"thread, {r['registers']} registers)")
        if r["shared"] + r["static_shared"] > SMEM_LIMIT[r["arch"]]:
            out.append(f"{what}: {r['shared'] + r['static_shared']} B shared memory > {SMEM_LIMIT[r['arch']]} B")
    return out


# ---------------------------------------------------------------------------------------------------- report
def table(found: list[Launch], rows: list[dict], archs=ARCHS) -> str:
    """Per kernel: variants, warps/stages, registers per thread (min-max) and shared memory per block per arch."""
    by = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["kernel"], []).append(r)
    head = ["kernel", "variants", "warps / stages"] + [f"sm_{a} registers / thread" for a in archs] + \
        ["shared memory (max, dynamic + static)", "spilled / stack frame (max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted({v.name for v in found}):
        rs = by.get(name, [])
        n_var = sum(1 for v in found if v.name == name)
        ws = sorted({f"{r['num_warps']}/{r['num_stages']}" for r in rs})
        regs = []
        for a in archs:
            x = [r["registers"] for r in rs if r["arch"] == a]
            regs.append(f"{min(x)}-{max(x)}" if x and min(x) != max(x) else str(x[0]) if x else "-")
        smem = max((r["shared"] + r["static_shared"] for r in rs), default=0)
        spill = max((r["spill_stores"] + r["spill_loads"] for r in rs), default=0)
        stack = max((r["stack"] for r in rs), default=0)
        lines.append(f"| `{name}` | {n_var} | {', '.join(ws)} | " + " | ".join(regs) +
                     f" | {smem} B | {spill} B / {stack} B |")
    return "\n".join(lines)


def variant_table(found: list[Launch]) -> str:
    """One line per variant: kernel, the dtypes of its tensor arguments and its constexprs."""
    out = []
    for i, v in enumerate(found):
        ptrs = ",".join(sorted({t for t in v.bound["signature"].values() if t.startswith("*")}))
        consts = " ".join(f"{k}={c}" for k, c in v.bound["constexprs"].items())
        out.append(f"{i:3d} {v.name:20s} {ptrs:30s} {consts}")
    return "\n".join(out)


def write_docs(text: str) -> Path:
    path = ROOT / "docs" / "kernels.md"
    start, end = "<!-- compile-check:start -->", "<!-- compile-check:end -->"
    body = f"{start}\n{text}\n{end}"
    doc = path.read_text()
    doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: body, doc, flags=re.S) if start in doc \
        else doc.rstrip() + "\n\n" + body + "\n"
    path.write_text(doc)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    p.add_argument("--json", type=Path, help="write every row (variant x arch) here")
    p.add_argument("--variants", action="store_true", help="also list the variants")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/kernels.md")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    log, found = variants()
    t1 = time.perf_counter()
    rows = compile_all(found, args.arch, args.jobs)
    t2 = time.perf_counter()
    problems = coverage_problems(log) + failures(rows)
    stamp = (f"triton {triton.__version__}, torch {torch.__version__}; {len(log)} launches recorded from "
             f"{len({x.site for x in log})} call lines, {len(found)} distinct variants x {len(args.arch)} "
             f"architectures = {len(rows)} compiles")
    text = f"{stamp}\n\n{table(found, rows, args.arch)}"
    if args.variants:
        print(variant_table(found))
    print(text)
    print(f"\nrecording {t1 - t0:.1f} s, compiling {t2 - t1:.1f} s ({args.jobs or os.cpu_count()} processes)")
    if args.json:
        args.json.write_text(json.dumps(dict(stamp=stamp, rows=rows, problems=problems), indent=1))
    if args.write_docs:
        print(f"wrote {write_docs(f'Command: `python -m kernels.compile_check --write-docs`; {text}')}")
    for msg in problems:
        print(f"FAIL {msg}")
    print("compile check: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
