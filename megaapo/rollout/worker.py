"""The vLLM worker extension that receives weights: mixed into every vLLM worker through `worker_extension_cls`.

Called only through `LLM.collective_rpc("megaapo_...")` by `megaapo.rollout.engine.VllmEngine`; each method runs
on every worker of the engine (one per vLLM tensor-parallel rank). Every worker receives the full HF-layout tensors
and vLLM's own `load_weights` keeps the shard it owns, so the trainer never needs to know the engine's TP layout.
"""

from __future__ import annotations

import time
from typing import Iterator, Optional

import torch

from megaapo.rollout.buckets import Bucket, checksum, unpack
from megaapo.rollout.group import SyncGroup


class _BucketStream:
    """Receives buckets in order, one ahead of the consumer (the next bucket's transfer overlaps with loading the
    current one), and can drain what the consumer left so the sender never waits on a receiver that gave up."""

    def __init__(self, group: SyncGroup, buckets: list[Bucket], device, want_checksums: bool):
        self.group, self.buckets, self.device = group, buckets, device
        self.want_checksums = want_checksums
        self.checksums: list[int] = []
        self.received = 0
        self._pending = None

    def _post(self, i: int):
        b = self.buckets[i]
        buf = torch.empty(b.nbytes, dtype=torch.uint8, device=self.device)
        return b, buf, self.group.broadcast(buf, b.src)

    def _next(self):
        if self._pending is None:
            self._pending = self._post(0)
        b, buf, work = self._pending
        work.wait()
        self.received += 1
        self._pending = self._post(self.received) if self.received < len(self.buckets) else None
        if self.want_checksums:
            self.checksums.append(checksum(buf))
        return b, buf

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        while self.received < len(self.buckets):
            b, buf = self._next()
            yield from unpack(b, buf)

    def drain(self) -> int:
        left = len(self.buckets) - self.received
        while self.received < len(self.buckets):
            self._next()
        return left


class WeightSyncExtension:
    """Methods added to vLLM's Worker class (so `self` is the worker: `self.model_runner`, `self.device`)."""

    _megaapo_group: Optional[SyncGroup] = None

    def megaapo_init_sync(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> int:
        from vllm.distributed.parallel_state import get_world_group

        if self._megaapo_group is not None:
            self._megaapo_group.close()
        rank = rank_offset + get_world_group().rank
        self._megaapo_group = SyncGroup(host, port, rank, world_size, self.device, timeout_s)
        return rank

    def megaapo_receive(self, buckets: list[dict], want_checksums: bool) -> dict:
        if self._megaapo_group is None:
            raise RuntimeError("weights sent before the sync group was set up (megaapo_init_sync)")
        t0 = time.perf_counter()
        stream = _BucketStream(self._megaapo_group, [Bucket.from_wire(b) for b in buckets], self.device,
                               want_checksums)
        try:
            # reload_weights, not model.load_weights: on CPU the linear layers run on a pre-packed copy of each
            # weight that only process_weights_after_loading (which reload_weights re-runs) rebuilds.
            self.model_runner.reload_weights(weights_iterator=iter(stream), is_checkpoint_format=True)
        except BaseException:
            stream.drain()
            raise
        left = stream.drain()
        if left:
            raise RuntimeError(f"the model stopped reading weights with {left} bucket(s) unread")
        return {"checksums": stream.checksums, "seconds": time.perf_counter() - t0}

    def megaapo_load(self, named_tensors) -> int:
        """In-process load (colocated mode): the tensors are already on this worker's device."""
        n = 0

        def counted():
            nonlocal n
            for item in named_tensors:
                n += 1
                yield item
        self.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        return n

    def megaapo_close_sync(self) -> None:
        if self._megaapo_group is not None:
            self._megaapo_group.close()
            self._megaapo_group = None
