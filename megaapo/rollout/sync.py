"""The trainer side of the weight broadcast: plans buckets, packs HF-layout tensors into them, broadcasts them.

Called by `RolloutClient.update_weights` (which sends each engine the plan over the RPC first) and by
`benchmarks/sync.py`. The sender is sync-group rank 0.

Multi-rank learners (megatron TP x PP): the full HF tensors are gathered to the sending rank one tensor at a time,
in plan order, by a generator that every trainer rank runs in lockstep (the gather is a collective); rank 0 passes
that generator to `send` and the other ranks simply exhaust it. Because the plan is built from `TensorSpec`s
(names, shapes, dtypes known from the model config), no rank ever holds more than about two buckets of gathered
weights. A later multi-sender layout (one sender per pipeline stage) only needs `Bucket.src` set per stage.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Iterator, Optional

import torch

from megaapo.rollout.buckets import Bucket, TensorSpec, as_bytes, checksum, pack, plan_buckets
from megaapo.rollout.group import SyncGroup


def cast_for_engine(named_tensors: Iterable[tuple[str, torch.Tensor]],
                    dtype: Optional[torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    """Floating tensors in the engine's dtype (fp32 master weights -> bf16 halves the bytes sent)."""
    for name, t in named_tensors:
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        yield name, t


class WeightSender:
    def __init__(self, group: SyncGroup, bucket_bytes: int):
        self.group = group
        self.bucket_bytes = bucket_bytes
        self.device = group.device
        self._bufs: list[torch.Tensor] = []

    def plan(self, specs: Iterable[TensorSpec]) -> list[Bucket]:
        return plan_buckets(specs, self.bucket_bytes)

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        while len(self._bufs) <= slot:
            self._bufs.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._bufs[slot].numel() < nbytes:
            self._bufs[slot] = torch.empty(max(nbytes, self.bucket_bytes), dtype=torch.uint8, device=self.device)
        return self._bufs[slot]

    def send(self, buckets: list[Bucket], named_tensors: Iterable[tuple[str, torch.Tensor]],
             want_checksums: bool = False) -> dict:
        """Broadcast `named_tensors` (in plan order, already in the planned dtypes) bucket by bucket.

        Two packing buffers alternate: bucket k+1 is packed while bucket k is on the wire. Returns timing and,
        when asked, each bucket's checksum (see `buckets.checksum`)."""
        it = iter(named_tensors)
        inflight: deque = deque()   # (work, data, slot)
        sums: list[int] = []
        t0 = time.perf_counter()
        nbytes = 0
        slot = 0
        for b in buckets:
            tensors = [self._next(it, spec) for spec, _ in b.entries]
            if b.solo:
                data, used = as_bytes(tensors[0].contiguous()), -1
            else:
                while any(s == slot for _, _, s in inflight):
                    inflight.popleft()[0].wait()
                data, used = pack(b, tensors, self._buffer(slot, b.nbytes)), slot
                slot ^= 1
            if want_checksums:
                sums.append(checksum(data))
            inflight.append((self.group.broadcast(data, b.src), data, used))
            nbytes += b.nbytes
            # Solo buckets are already in flight from their own storage; keep at most two transfers queued.
            while len(inflight) > 2:
                inflight.popleft()[0].wait()
        while inflight:
            inflight.popleft()[0].wait()
        leftover = next(it, None)
        if leftover is not None:
            raise ValueError(f"weight {leftover[0]!r} is not in the sync plan (the plan and the weights disagree)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"buckets": len(buckets), "bytes": nbytes, "seconds": time.perf_counter() - t0,
                "checksums": sums if want_checksums else None}

    def _next(self, it, spec: TensorSpec) -> torch.Tensor:
        try:
            name, t = next(it)
        except StopIteration:
            raise ValueError(f"the weights ended before {spec.name!r}, which the sync plan expects") from None
        if name != spec.name or tuple(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
            raise ValueError(f"weight {name!r} {tuple(t.shape)} {t.dtype} arrived where the sync plan expects "
                             f"{spec.name!r} {spec.shape} {spec.dtype}: weights must come in plan order")
        if t.device != self.device:
            t = t.to(self.device, non_blocking=True)
        return t
