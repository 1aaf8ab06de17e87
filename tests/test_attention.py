"""Packed-row attention (megaapo/models/qwen2_5_vl/attention.py) against an fp64 block-diagonal reference, the kernel
chosen on CUDA (traced with fake CUDA tensors on CPU), the PackedSeqParams layouts, and on a GPU the real kernels."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megaapo.models.qwen2_5_vl.attention import (_varlen_kwargs, packed_seq_params, varlen_attention,
                                                 varlen_backend)

LENGTHS = [1, 7, 23, 2, 31, 17]   # T = 81; a one-token sample and one longer than the others
HAS_TORCH_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None   # torch >= 2.10


def _qkv(lengths, heads, groups, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, n, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
               for n in (heads, groups, groups))
    cu = torch.tensor([0] + lengths).cumsum(0).to(device=device, dtype=torch.int32)
    return q, k, v, cu


def dense_reference(q, k, v, cu, scale):
    """Masked softmax over [heads, T, T] in fp64: block-diagonal (same sample) and causal."""
    T, heads = q.shape[:2]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long().cpu()).to(q.device)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    rep = heads // k.shape[1]
    kk, vv = (t.double().repeat_interleave(rep, 1).transpose(0, 1) for t in (k, v))
    scores = (q.double().transpose(0, 1) @ kk.transpose(1, 2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ vv).transpose(0, 1)


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor every op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), tuple(t.shape)))
        return out


def two_sequence_dims(ops, seq_lengths) -> list:
    """The recorded (op, shape) pairs with two dimensions that are sequence lengths (of the row or of a sample)."""
    return [(op, shape) for op, shape in ops if sum(d in seq_lengths for d in shape) >= 2]


@pytest.mark.parametrize("heads,groups", [(4, 2), (3, 3)])
def test_packed_attention_equals_block_diagonal_reference(heads, groups):
    """Forward and the gradients of q, k, v equal the fp64 block-diagonal causal reference (CPU kernel: fused SDPA
    per sample), with GQA and without."""
    q, k, v, cu = _qkv(LENGTHS, heads, groups, 16)
    scale = 0.3
    assert varlen_backend(q, scale, groups) == "per_sample_sdpa"
    out = varlen_attention(q, k, v, cu, max(LENGTHS), scale)
    ref = dense_reference(q, k, v, cu, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_cpu_kernel_is_fused_per_sample():
    """On CPU (fp32, GQA) the packed path runs torch's fused flash kernel once per sample: no score tensor exists,
    neither [T, T] nor [L, L] of a sample."""
    q, k, v, cu = _qkv(LENGTHS, 4, 2, 16, dtype=torch.float32)
    with ShapeLog() as log:
        out = varlen_attention(q, k, v, cu, max(LENGTHS), 0.25)
        out.square().sum().backward()
    names = {op for op, _ in log.ops}
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in names
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward.default" in names
    assert not two_sequence_dims(log.ops, {sum(LENGTHS)} | set(LENGTHS) - {1, 2})
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, cu, 0.25), rtol=0, atol=1e-5)


def test_cuda_bf16_takes_torch_varlen_kernel():
    """What a GPU runs, traced on CPU with fake CUDA tensors (no GPU, no memory): a bf16 packed row goes to torch's
    varlen flash kernel with the layout's arguments, in one op whose outputs hold no two sequence dimensions.
    (Backward cannot be traced here: autograd's CUDA device threads need a driver; it is one fused op too.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not HAS_TORCH_VARLEN:
        pytest.skip("this torch has no torch.nn.attention.varlen (torch < 2.10): CUDA runs per-sample SDPA")
    T = 1531
    with FakeTensorMode(), ShapeLog() as log:
        q, k, v = (torch.empty(T, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for n in (16, 2, 2))
        cu = torch.tensor([0, 500, 1024, T], dtype=torch.int32, device="cuda")
        assert varlen_backend(q, 128 ** -0.5, 2) == "torch_varlen"
        out = varlen_attention(q, k, v, cu, 524, 128 ** -0.5)
    assert out.shape == (T, 16, 128) and out.device.type == "cuda"
    assert [op for op, _ in log.ops if "varlen" in op] == ["torch_attn._varlen_attn.default"] * 3   # out, lse, rng
    assert not two_sequence_dims(log.ops, {T, 500, 524, 507})
    # fp32 on CUDA has no flash kernel: per-sample SDPA instead (K/V repeated for the memory-efficient kernel).
    with FakeTensorMode():
        assert varlen_backend(torch.empty(4, 16, 128, device="cuda"), 128 ** -0.5, 2) == "per_sample_sdpa"


def test_varlen_kwargs_for_each_torch_signature():
    """torch's varlen_attn signature by release (torch docs): 2.10 is_causal; 2.11 window_size + scale; 2.12+ also
    enable_gqa. The causal call is expressed in each; a scale 2.10 cannot take falls back (None)."""
    v210 = ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "return_aux"]
    v211 = v210[:7] + ["return_aux", "scale", "window_size"]
    v212 = v211 + ["enable_gqa", "seqused_k", "block_table", "num_splits"]
    d = 128
    assert _varlen_kwargs(v210, d ** -0.5, d, gqa=True) == {"is_causal": True}
    assert _varlen_kwargs(v210, 0.1, d, gqa=False) is None
    assert _varlen_kwargs(v211, 0.1, d, gqa=True) == {"window_size": (-1, 0), "scale": 0.1}
    assert _varlen_kwargs(v212, 0.1, d, gqa=True) == {"window_size": (-1, 0), "scale": 0.1, "enable_gqa": True}
    assert _varlen_kwargs(v212, 0.1, d, gqa=False) == {"window_size": (-1, 0), "scale": 0.1}
    assert _varlen_kwargs(v210[:7], 0.1, d, gqa=False) is None


def test_packed_seq_params_layouts():
    """Transformer Engine gets THD (megatron then runs TE padding-causal per sample); our attention gets SBHD with
    the same int32 boundaries."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int64)
    te = packed_seq_params(cu, 7, "te", "cpu")
    ours = packed_seq_params(cu, 7, "sdpa", "cpu")
    assert (te.qkv_format, ours.qkv_format) == ("thd", "sbhd")
    for p in (te, ours):
        assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_q.tolist() == [0, 5, 12]
        assert p.cu_seqlens_kv is p.cu_seqlens_q and p.max_seqlen_q == p.max_seqlen_kv == 7


def test_core_attention_layouts_agree_and_refuse_masks(tiny_model):
    """SDPAttention on a packed row: the SBHD [T, 1, h, d] and THD [T, h, d] layouts give the same output, equal to
    the reference; a dense mask is refused (the path must never build one)."""
    from megaapo.models.qwen2_5_vl.attention import SDPAttention
    from megaapo.models.qwen2_5_vl.config import load_hf_config, transformer_config

    cfg = transformer_config(load_hf_config(tiny_model), dtype="float32")
    attn = SDPAttention(cfg, 1, None, "self")
    q, k, v, cu = _qkv(LENGTHS, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, torch.float32)
    sbhd = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=packed_seq_params(cu, 31, "sdpa", "cpu"))
    thd = attn(q, k, v, None, packed_seq_params=packed_seq_params(cu, 31, "te", "cpu"))
    assert sbhd.shape == (sum(LENGTHS), 1, cfg.hidden_size) and thd.shape == (sum(LENGTHS), cfg.hidden_size)
    torch.testing.assert_close(sbhd[:, 0], thd, rtol=0, atol=0)
    ref = dense_reference(q, k, v, cu, attn.scale).reshape(sum(LENGTHS), -1)
    torch.testing.assert_close(thd.double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn(q[:, None], k[:, None], v[:, None], torch.zeros(1, 1, 81, 81, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_packed_attention_matches_reference(dtype):
    """On CUDA: bf16 through torch's varlen flash kernel, fp32 through per-sample SDPA; forward and gradients equal
    the fp64 reference within the dtype's tolerance (GQA 16:2, head_dim 128: Qwen2.5-VL-3B's attention)."""
    lengths = [1, 129, 700, 64, 333]
    q, k, v, cu = _qkv(lengths, 16, 2, 128, dtype=dtype, device="cuda")
    scale = 128 ** -0.5
    expect = "torch_varlen" if dtype == torch.bfloat16 and HAS_TORCH_VARLEN else "per_sample_sdpa"
    assert varlen_backend(q, scale, 2) == expect
    out = varlen_attention(q, k, v, cu, max(lengths), scale)
    ref = dense_reference(q, k, v, cu, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    w = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.gpu
@cuda
def test_gpu_packed_attention_memory_is_linear_in_tokens():
    """32k packed tokens in bf16, forward + backward: the [16, T, T] scores would take 32 GiB; the packed path's
    peak stays under 1 GiB above its inputs."""
    lengths = [4096] * 7 + [3 * 1024]
    q, k, v, cu = _qkv(lengths, 16, 2, 128, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = varlen_attention(q, k, v, cu, max(lengths), 128 ** -0.5)
    out.float().square().sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**30
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
