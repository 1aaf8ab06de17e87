"""Helpers shared by the kernel files: path selection (Triton or the PyTorch reference) and bf16 rounding.

Imported by `kernels.fused_logprob`, `kernels.policy_loss`, `kernels.fused_policy_loss` and
`kernels.group_advantage`; nothing here launches work on its own.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit decides at decoration time whether a kernel is compiled or interpreted, so the mode of every kernel in
# this package is fixed when it is first imported; reading the variable later would disagree with the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Set only by `kernels.compile_check` while it records launches (its stand-in kernels note each launch and run
# nothing): tensors on this device type then take the GPU path and the GPU's launch configuration.
GPU_PATH_FOR = None


def on_gpu(device: torch.device) -> bool:
    """Whether launches for tensors on `device` use the GPU's launch configuration (block sizes, warps)."""
    return device.type == "cuda" or device.type == GPU_PATH_FOR


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on `t`: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    return on_gpu(t.device) or INTERPRET


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> `dtype`, rounding to nearest even.

    bf16 is rounded by hand: Triton's interpreter truncates (and its RTNE mode drops the mantissa carry), so the
    native cast would give different bits on CPU than on the GPU.
    """
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        r = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(dtype), r)
    else:
        return x.to(dtype)
