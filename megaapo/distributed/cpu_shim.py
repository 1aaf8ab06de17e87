"""Lets megatron-core's parallel layers, GPTModel and pipeline schedules run on CPU (gloo) for tests and the demo.

megatron-core assumes CUDA in a handful of places that have nothing to do with the math: it allocates small buffers on
`torch.cuda.current_device()`, keeps dropout RNG states with `torch.cuda.get_rng_state`, and a few schedule counters
are created with `device="cuda"`. Its DDP gradient buffers and distributed optimizer (`optim.impl=megatron`) add a
few more: flag and norm tensors made on "cuda", and parameter-type checks that accept only `torch.cuda.*Tensor`
names. Its `dist_checkpointing` (fully parallel load) makes exchange buffers with `device="cuda"`. On a machine
without CUDA, `install()` redirects exactly those to the CPU, so the CPU tests run the same optimizer and
checkpointing code a GPU run does; it does nothing where CUDA is available. Called once by `megaapo.distributed.init`
before any model is built.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_installed = False


class _CudaToCpu(types.ModuleType):
    """A stand-in for the `torch` module inside one megatron module: tensor factories called with device="cuda"
    build on the CPU instead; everything else is torch itself."""

    _FACTORIES = ("zeros", "ones", "empty", "empty_like", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, __f=attr, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return __f(*args, **kwargs)
            return factory
        return attr


def install() -> None:
    """Patch megatron-core's CUDA-only calls to CPU equivalents when no GPU is present (idempotent)."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as mrandom

    # Buffers megatron allocates "on the current device" belong on the CPU here.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    # Tied embeddings across pipeline stages are moved with `.cuda()` before their first all-reduce.
    torch.Tensor.cuda = lambda self, *a, **k: self
    # Dropout RNG streams (the tracker) are kept as CPU generator states.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: None
    # Schedule counters created with a literal device="cuda".
    schedules.torch = _CudaToCpu()
    p2p_communication.torch = _CudaToCpu()
    _install_optimizer()
    _install_dist_checkpointing()
    _installed = True


@contextlib.contextmanager
def _cuda_type_names():
    """Within the block `tensor.type()` names CPU tensors as CUDA ones ("torch.cuda.FloatTensor"): megatron's
    optimizer checks those names to tell fp32 from bf16/fp16 parameters, which is all it wants to know."""
    original = torch.Tensor.type

    def named(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and not name.startswith("torch.cuda."):
            name = "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)
    return wrapper


def _install_optimizer() -> None:
    """megatron-core's DDP buffers, distributed optimizer and gradient clipping on CPU."""
    import megatron.core.utils as mutils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core.optimizer import optimizer as moptimizer

    for module in (param_and_grad_buffer, moptimizer, distrib_optimizer, clip_grads, mutils, grad_scaler):
        module.torch = _CudaToCpu()   # overflow flags, norms, loss scales and warm-up tensors made on "cuda"
    build = distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups
    distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups = staticmethod(
        _with_cuda_type_names(build))
    moptimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(moptimizer.clip_grad_by_total_norm_fp32)




def _install_dist_checkpointing() -> None:
    """Fully parallel loading exchanges shards between ranks through buffers it makes on "cuda"."""
    from megatron.core.dist_checkpointing import exchange_utils, mapping
    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    exchange_utils.torch = _CudaToCpu()
    state_dict_saver.torch = _CudaToCpu()
    init_data = mapping.ShardedTensor.init_data

    def init_on_cpu(self, device, *args, **kwargs):
        return init_data(self, "cpu" if str(device).startswith("cuda") else device, *args, **kwargs)

    mapping.ShardedTensor.init_data = init_on_cpu
