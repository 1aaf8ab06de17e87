"""Shared harness and helpers of the kernel tests (tests/test_kernels_*.py), each op checked against an fp64
PyTorch reference (and megaapo.algos).

How they run. triton.jit fixes interpreted-vs-compiled when a kernel module is imported, and TRITON_INTERPRET=1
leaking into the rest of the pytest session would also switch other packages' Triton kernels (vLLM) to the
interpreter. So on a machine without CUDA each kernel test file re-runs itself once, in a child pytest with
TRITON_INTERPRET=1 (junit report), and every `@kernel_test` in it reports its own outcome from that file's child.
With CUDA the tests run directly on the GPU. Tolerances (max abs error / max |reference|): fp32 inputs 1e-5, bf16
inputs 2e-2. Every float buffer the kernels allocate is filled with NaN first (`poison` fixture), so unwritten
elements fail.

Fixtures defined outside a conftest apply only where they are imported, so every kernel test file imports the
autouse ones by name: `from kernel_harness import _record_name, poison  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NATIVE = torch.cuda.is_available() and not INTERPRET
IN_RUNNER = INTERPRET or NATIVE          # this process executes the kernels
DEV = "cuda" if NATIVE else "cpu"
ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-9}
# (input dtype, logits_dtype): bf16 inputs are tested in the default mode, whose logits are rounded to bf16 exactly
# as eager PyTorch and vLLM round them (oracle: fp64 math on the same bf16-rounded logits), and with fp32 logits
# (oracle: plain fp64 math).
MODES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "bf16-fp32logits": (torch.bfloat16,
                                                                                          torch.float32)}

# ----------------------------------------------------------------------------------------------- harness
_current: dict = {}


@pytest.fixture(autouse=True)
def _record_name(request):
    _current.update(name=request.node.name, path=str(request.path), function=request.function)


@functools.lru_cache(maxsize=None)
def _child_report(path):
    """Run the test file at `path` under the interpreter once; name -> (outcome, message)."""
    xml = Path(tempfile.mkdtemp(prefix="kernels-interp-")) / "report.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    target = Path(path).resolve()
    if target.is_relative_to(ROOT):
        target = target.relative_to(ROOT)
    proc = subprocess.run([sys.executable, "-m", "pytest", str(target), "-q", "-n", "0",
                           "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning", f"--junitxml={xml}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome, msg = tag, (el.get("message") or "") + "\n" + (el.text or "")
                    break
            report[case.get("name")] = (outcome, msg)
        xml.unlink()
        xml.parent.rmdir()
    return report, proc.stdout[-4000:] + proc.stderr[-4000:]


def kernel_test(fn):
    """Run `fn` where the kernels execute (GPU, or the interpreter child); elsewhere report the child's outcome."""
    if IN_RUNNER:
        return fn

    @functools.wraps(fn)
    def from_child(*args, **kwargs):
        # without `_record_name` in the test module, `_current` would still describe an earlier test (possibly of
        # another file), and this test would silently report that one's outcome
        if _current.get("function") is not from_child:
            pytest.fail("the test module must import `_record_name` and `poison` from kernel_harness", pytrace=False)
        report, tail = _child_report(_current["path"])
        name = _current["name"]
        if name not in report:
            pytest.fail(f"{name} did not run in the TRITON_INTERPRET=1 child:\n{tail}", pytrace=False)
        outcome, msg = report[name]
        if outcome == "skipped":
            pytest.skip(msg)
        if outcome != "passed":
            pytest.fail(f"[TRITON_INTERPRET=1 child] {msg}", pytrace=False)
    return from_child


class _PoisonedTorch:
    """Stands in for `torch` inside the kernel modules: empty()/empty_like() come back filled with NaN (or -1)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    def empty(self, *a, **k):
        return self._fill(torch.empty(*a, **k))

    def empty_like(self, *a, **k):
        return self._fill(torch.empty_like(*a, **k))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if IN_RUNNER:
        import kernels.fused_logprob
        import kernels.fused_policy_loss
        import kernels.group_advantage
        import kernels.policy_loss
        for mod in (kernels.fused_logprob, kernels.policy_loss, kernels.fused_policy_loss, kernels.group_advantage):
            monkeypatch.setattr(mod, "torch", _PoisonedTorch())


def close(actual, expected, tol, what):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten or NaN/inf)"
    err = ((a - e).abs().max() / e.abs().max().clamp(min=1e-30)).item() if a.numel() else 0.0
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def make_lm(n, h, v, dtype, seed=0, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, device="cpu")
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, device="cpu") * scale
    targets = torch.randint(0, v, (n,), generator=g, device="cpu")
    return hidden.to(dtype).to(DEV), weight.to(dtype).to(DEV), targets.to(DEV)


def host_randn(*shape, generator):
    """Random numbers drawn on the host (seeded, the same on any machine) and moved to the test device."""
    return torch.randn(*shape, generator=generator, device="cpu").to(DEV)


def foreign_default_device():
    """A context in which tensors made without a device land on a device other than DEV, as they do on a GPU run
    (the default device is the CPU there): a test's tensor that misses `.to(DEV)` then fails on the CPU too."""
    return torch.device("meta") if DEV == "cpu" else contextlib.nullcontext()


def leaf(x, dtype=None):
    return x.detach().clone().to(dtype or x.dtype).requires_grad_()


class Launches:
    """Stands in for a module's @triton.jit kernel and logs each launch by name (then launches the real one)."""

    def __init__(self, monkeypatch, module, *names):
        self.log = []
        for name in names:
            monkeypatch.setattr(module, name, self._Kernel(getattr(module, name), name, self.log))

    class _Kernel:
        def __init__(self, kernel, name, log):
            self.kernel, self.name, self.log = kernel, name, log

        def __getitem__(self, grid):
            from torch.utils._python_dispatch import _disable_current_modes

            def launch(*args, **kwargs):
                self.log.append(self.name)
                with _disable_current_modes():   # the interpreter's own host copies are not the op's device work
                    return self.kernel[grid](*args, **kwargs)
            return launch


# aten ops that allocate or make views: no device work, no launch
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "reshape", "detach", "alias", "select",
              "slice", "as_strided", "expand", "t", "lift_fresh", "unsqueeze", "squeeze", "_reshape_alias"}


def device_ops():
    """Context manager recording every aten op that could launch device work (fills, copies, math)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.work = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_LAUNCH:
                self.work.append(str(func))
            return func(*args, **(kwargs or {}))
    return Record()


# --------------------------------------------------------------------------------------------- shared data
# small blocks and chunks so every block / chunk boundary is crossed: 3 row chunks, 4 vocab chunks, ragged tiles
SMALL = dict(chunk_rows=16, chunk_vocab=96, block_rows=8, block_vocab=32)


def oracle_logits_dtype(dtype, logits_dtype):
    return logits_dtype or (dtype if dtype != torch.float32 else None)


def rl_batch(b=5, t=13, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64, device="cpu")
    lp = torch.randn(b, t, **f64) * 0.3 - 1.0
    d = dict(logp=lp,
             logp_old=lp + 0.25 * torch.randn(b, t, **f64),
             logp_ref=lp + 0.25 * torch.randn(b, t, **f64),
             advantages=torch.randn(b, **f64),
             mask=torch.rand(b, t, generator=g, device="cpu") > 0.3,
             kl_weight=torch.rand(b, **f64),
             tis_weight=torch.rand(b, t, **f64) + 0.5,
             entropy=torch.rand(b, t, **f64) * 3)
    if b > 3:
        d["mask"][1] = False                 # an empty sequence
        d["mask"][3, :2] = False
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(DEV) for k, v in d.items()}


def settings(**kw):
    from megaapo.algos.losses import LossSettings
    base = dict(clip_eps_low=0.1, clip_eps_high=0.28, loss_agg_norm_len=20, kl_coef=0.05, entropy_coef=0.01)
    base.update(kw)
    return LossSettings(**base)
