"""Flat weight buckets for the trainer -> engine broadcast: planning, packing, unpacking, checksums.

Called by the gloo weight-transfer backend (`megaapo.rollout.gloo`, on the trainer and inside each vLLM worker) and
by the checksum mode (`megaapo.rollout.{source,worker}`). The plan is made from metadata alone (names, shapes,
dtypes), so both sides make the same plan from the update's metadata before a single byte of weights exists on the
sender: the learner gathers its shards tensor by tensor in plan order.

A bucket is one uint8 buffer holding several tensors at aligned offsets (tensors of mixed dtypes share a bucket).
A tensor larger than the bucket size gets a bucket of its own and is broadcast from its own storage, uncopied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

ALIGN = 64   # bytes; keeps every tensor's offset a multiple of any element size, and of a cache line


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    dtype: str   # torch dtype name without "torch.", e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))


@dataclass
class Bucket:
    index: int
    nbytes: int
    entries: list = field(default_factory=list)   # (TensorSpec, offset) in send order
    src: int = 0      # the sync-group rank that broadcasts it (several senders later: one per pipeline stage)

    @property
    def solo(self) -> bool:
        """A bucket of one tensor is broadcast straight from that tensor's storage (no packing copy)."""
        return len(self.entries) == 1

    def to_wire(self) -> dict:
        return {"index": self.index, "nbytes": self.nbytes, "src": self.src,
                "entries": [[s.name, list(s.shape), s.dtype, off] for s, off in self.entries]}

    @classmethod
    def from_wire(cls, d: dict) -> "Bucket":
        entries = [(TensorSpec(n, tuple(shape), dt), off) for n, shape, dt, off in d["entries"]]
        return cls(index=d["index"], nbytes=d["nbytes"], entries=entries, src=d.get("src", 0))


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a larger tensor gets its own bucket)."""
    buckets: list[Bucket] = []
    cur: Bucket | None = None
    for spec in specs:
        size = spec.nbytes
        if size >= bucket_bytes:
            if cur is not None and cur.entries:
                buckets.append(cur)
            buckets.append(Bucket(len(buckets), size, [(spec, 0)]))
            cur = None
            continue
        if cur is None or _aligned(cur.nbytes) + size > bucket_bytes:
            if cur is not None and cur.entries:
                buckets.append(cur)
            cur = Bucket(len(buckets), 0)
        off = _aligned(cur.nbytes)
        cur.entries.append((spec, off))
        cur.nbytes = off + size
    if cur is not None and cur.entries:
        buckets.append(cur)
    # Packed buckets are rounded up so the checksum can read whole 32-bit words; solo buckets are sent as they are.
    for b in buckets:
        if not b.solo:
            b.nbytes = _aligned(b.nbytes)
    return buckets


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (no copy)."""
    return t.reshape(-1).view(torch.uint8)


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.device.type == "cpu" and src.device.type == "cpu":
        # One plain memcpy (numpy, GIL released). torch's copy_ splits it over its intra-op threads, which on a
        # busy 2-core machine ran 6x slower than a single thread and cannot overlap with gloo's own thread.
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src, non_blocking=True)


def pack(bucket: Bucket, tensors: list[torch.Tensor], buf: torch.Tensor) -> torch.Tensor:
    """Copy `tensors` (in the bucket's order, already the right dtype/shape) into `buf[:bucket.nbytes]`."""
    for (spec, off), t in zip(bucket.entries, tensors):
        _copy_bytes(buf[off:off + spec.nbytes], as_bytes(t.contiguous()))
    return buf[:bucket.nbytes]


def unpack(bucket: Bucket, buf: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) pairs into a received bucket buffer; the views share its memory."""
    for spec, off in bucket.entries:
        yield spec.name, buf[off:off + spec.nbytes].view(getattr(torch, spec.dtype)).view(spec.shape)


_WEIGHTS: dict = {}
_CHUNK = 1 << 22   # 32-bit words per step: bounds the int64 temporary to 32 MB


def checksum(buf: torch.Tensor) -> int:
    """A position-weighted sum of a uint8 buffer's 32-bit words, exact in int64 and identical on any device.

    It catches corrupted, missing, truncated and misplaced bytes (each word is weighted by its position mod a
    prime), at the cost of one pass over the buffer; it is not a cryptographic hash."""
    n4 = buf.numel() // 4 * 4
    words = buf[:n4].view(torch.int32)
    key = (buf.device, )
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.arange(_CHUNK, dtype=torch.int64, device=buf.device) % 65521 + 1
    w = _WEIGHTS[key]
    total = 0
    for k, chunk in enumerate(words.split(_CHUNK)):
        s = int((chunk.to(torch.int64) * w[:chunk.numel()]).sum())
        total = (total * 1_000_003 + s) % ((1 << 61) - 1)
    tail = int(buf[n4:].to(torch.int64).sum()) if n4 < buf.numel() else 0
    return (total * 1_000_003 + tail) % ((1 << 61) - 1)
