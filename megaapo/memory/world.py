"""The world a traced step runs in: a fake TP x PP x DP process group, fake tensors, and the GPU path's leaves.

Used by `megaapo.memory.trace`. A single process joins torch's "fake" process-group backend as one rank of the
layout (tensor rank 0, data-parallel rank 0 of a pipeline stage) and megatron builds its groups on it, so the
learner's code sees exactly the ranks, group sizes and shard shapes of the real run. Collectives return at once
(`tracker._no_communication`): their buffers are tensors that exist anyway and are counted. Python-object
collectives (metrics, per-replica log-probs) are answered with the rank's own object. The CPU shim
(`megaapo.distributed.cpu_shim`) takes megatron's "cuda" buffers to the CPU device, where the fake tensors live.

Fake CUDA tensors cannot run a backward on a machine without a GPU (autograd starts a device thread), so the
tensors are fake CPU tensors and `gpu_path("cuda")` swaps in, for the few device-specific leaves, what the GPU run
allocates:
- the log-prob / loss pass takes the fused Triton path (`kernels.fused_logprob`'s chunked workspace, dX, fp32
  statistics), with the kernel launches skipped (they only write into buffers allocated, and counted, before) and
  the fp32 weight-gradient GEMM writing in place, as cuBLAS does on the GPU (the CPU fallback upcasts operands);
- megatron's fused bias-SwiGLU and bias-dropout-add are on, as `transformer_config` sets them on a GPU (they are
  torch.compile'd there and run eagerly here: the same tensors are kept for the backward);
- torch AdamW inside megatron's optimizer takes its multi-tensor (foreach) path, the default for CUDA tensors,
  which holds one extra fp32 copy of the optimizer shard (sqrt of the second moment) during the step.
- a packed row's variable-length attention is one causal SDPA call over the row (`_varlen_on_gpu`): SDPA on CPU
  takes its flash kernel, which keeps what the varlen flash kernel keeps on the GPU (the output and an fp32
  log-sum-exp per token and head), without the CPU path's per-sample outputs and their concatenation.
Padded rows need no swap: causal SDPA on CPU is the same flash kernel. For both targets the vision tower's window
attention runs as one call (`_one_call_attention`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


@contextlib.contextmanager
def fake_world(tp: int, pp: int, dp: int, stage: int, activation_shape: tuple = ()):
    """Join a fake TP x PP x DP world as (tp 0, dp 0, pipeline stage `stage`); yields megaapo's ParallelGroups.
    activation_shape: [s, b, h] of what pipeline stages pass each other, which the real stages tell each other
    before each transfer (megatron's variable-length handshake) and the fake peers cannot."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megaapo.distributed import ParallelGroups
    from megaapo.distributed.cpu_shim import install

    if dist.is_initialized():
        raise RuntimeError("the memory plan traces in a fresh process: torch.distributed is already initialised here")
    install()
    # megatron's rank order is tp-cp-ep-dp-pp: tensor ranks vary fastest, pipeline stages slowest.
    dist.init_process_group("fake", rank=stage * tp * dp, world_size=tp * pp * dp)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 create_gloo_process_groups=False)
        pgc = ProcessGroupCollection.use_mpu_process_groups()
        groups = ParallelGroups(tp=pgc.tp, pp=pgc.pp, dp=pgc.dp, embd=getattr(pgc, "embd", None), pgc=pgc,
                                device=torch.device("cpu"))
        if (groups.pp_rank, groups.tp_rank, groups.dp_rank) != (stage, 0, 0):
            raise RuntimeError(f"megatron placed rank {stage * tp * dp} at pp/tp/dp {groups.pp_rank}/"
                               f"{groups.tp_rank}/{groups.dp_rank}, not {stage}/0/0: its rank order changed")
        def shapes(self, send_next, send_prev, recv_prev, recv_next):
            return (list(activation_shape) if recv_prev else [0, 0, 0],
                    list(activation_shape) if recv_next else [0, 0, 0])

        with patched((dist, "all_gather_object", _gather_own), (P2PCommunicator, "_communicate_shapes", shapes)):
            yield groups
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _gather_own(out, obj, group=None):
    out[:] = [obj] * len(out)


@contextlib.contextmanager
def patched(*items):
    """(object, attribute, value) triples set for the duration of the block."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in items]
    for obj, name, value in items:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def faked(target: str, tracker):
    """Fake tensors under `tracker`, with the GPU path's leaves (target="cuda") or this machine's ("cpu")."""
    import torch._dynamo
    from torch._subclasses.fake_tensor import FakeTensorMode

    with gpu_path(target, tracker), torch._dynamo.config.patch(disable=True), \
            patched((torch.utils, "swap_tensors", _swap_fake)), FakeTensorMode(allow_non_fake_inputs=True), tracker:
        yield


def _swap_fake(t1, t2, _swap=torch.utils.swap_tensors):
    """`Module.to()` swaps a fake parameter with its converted copy, which FakeTensorMode's memo (a weak reference
    to every fake tensor) forbids; giving the parameter the copy's data is the same conversion."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t1, FakeTensor):
        t1.data = t2.detach()
        return
    _swap(t1, t2)


@contextlib.contextmanager
def host_side():
    """Real tensors that are not counted: what the trainer holds on the host (samples, rewards, advantages)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def no_init():
    """transformers' vision tower would initialise its random weights; their values matter to nobody here."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


# ------------------------------------------------------------------------------------- the GPU path's leaves
class _NoLaunch:
    """A Triton kernel whose launch is skipped."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _kernel_stubs() -> list:
    import triton

    import kernels.fused_logprob
    import kernels.fused_policy_loss
    import kernels.policy_loss

    mods = (kernels.fused_logprob, kernels.fused_policy_loss, kernels.policy_loss)
    kinds = tuple(k for k in (getattr(triton.runtime.jit, "JITFunction", None),
                              getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None)) if k)
    items = [(m, name, _NoLaunch()) for m in mods for name, obj in vars(m).items()
             if isinstance(obj, kinds) and name.endswith("_kernel")]
    return items + [(m, "use_triton", lambda t: True) for m in mods if hasattr(m, "use_triton")]


@contextlib.contextmanager
def gpu_path(target: str, tracker):
    """The learner's device-specific leaves as on a GPU (target="cuda") or as here ("cpu"). Both mark what the
    log-prob / loss pass allocates, and skip megatron's host-side gradient norm (a list of per-tensor scalars that
    fake tensors cannot fill; 0 means no clipping)."""
    import megatron.core.optimizer.optimizer as mopt

    import kernels.fused_logprob as fl
    import megaapo.learner
    import megaapo.models.qwen2_5_vl.attention as attention
    from megaapo.models.logprob import token_logprobs

    def in_category(fn, name):
        def wrapped(*args, **kwargs):
            with tracker.category(name):
                return fn(*args, **kwargs)
        return wrapped

    L = megaapo.learner.Learner
    items = [(L, "_fused_loss", in_category(L._fused_loss, "log-prob pass")),
             (L, "_response_logprobs", in_category(L._response_logprobs, "log-prob pass")),
             (mopt, "get_grad_norm_fp32", lambda *args, **kwargs: 0.0)]
    if target == "cuda":
        def on_gpu(*args, **kwargs):
            return token_logprobs(*args, **{**kwargs, "use_kernel": True})

        items += _kernel_stubs() + [(fl, "_accumulate_wgrad", lambda dw, dz, h, first: None),
                                    (megaapo.learner, "token_logprobs", on_gpu),
                                    (attention, "varlen_attention", _varlen_on_gpu)]
    saved = os.environ.get("MEGAAPO_TRITON")
    if target == "cuda":
        os.environ["MEGAAPO_TRITON"] = "1"   # the learner's switch to the fused loss for non-CUDA tensors
    try:
        with patched(*items):
            yield
    finally:
        if saved is None:
            os.environ.pop("MEGAAPO_TRITON", None)
        else:
            os.environ["MEGAAPO_TRITON"] = saved


def _varlen_on_gpu(q, k, v, cu_seqlens, max_seqlen, scale, flash_attn=False):
    """A packed row's attention as the CUDA varlen kernels allocate it: the output [T, heads, d] (contiguous) and an
    fp32 log-sum-exp per token and head, kept for the backward. One causal SDPA call over the whole row keeps
    exactly that on CPU (its flash kernel); the CPU path's per-sample calls would add a concatenated copy."""
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                           enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


VISION_ATTENTION = "megaapo_plan_flash"   # "flash" in the name makes transformers pass the window bounds


def _one_call_attention(module, q, k, v, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The vision tower's window attention as one SDPA call over all windows, in the layout transformers' attention
    functions return ([1, tokens, heads, dim]). Run with SDPA it loops over the windows (about 80 per large image),
    which would cost the trace some hundred thousand ops per step; what the loop keeps for the backward (each
    window's output and log-sum-exp) adds up to what this one call keeps."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def as_on_gpu(learner, target: str, one_call_vision: bool = True) -> None:
    """The learner's model-config switches and optimizer defaults of a CUDA run (target="cuda"), and the vision
    tower's one-call attention (both targets; the CPU cross-check measures a real run without it)."""
    if learner.model.vision is not None and one_call_vision:
        from transformers import AttentionInterface

        AttentionInterface.register(VISION_ATTENTION, _one_call_attention)
        learner.model.vision.config._attn_implementation = VISION_ATTENTION
    if target != "cuda":
        return
    cfg = learner.model.config
    cfg.bias_activation_fusion = cfg.bias_dropout_fusion = True
    if learner.optim is not None and learner.optim.name == "megatron":
        for part in learner.optim._parts():
            for group in part.optimizer.param_groups:
                group["foreach"] = True
