"""Weight sources for vLLM's weight-transfer protocol: what the trainer sends, as full Hugging Face tensors in order.

vLLM's trainer engines (`nccl`, `ipc`, megaapo's `gloo`) take a `vllm.distributed.weight_transfer.WeightSource`:
`metadata()` (name, wire dtype, full shape of every tensor, without transferring anything) and an iteration that
yields the same tensors in the same order, a fresh pass per sync. Used by `megaapo.rollout.transfer` (the learner's
source on every trainer rank) and by tests and benchmarks (`TensorSource` over a plain state dict).

`LearnerSource` over the megatron learner (TP x PP x DP):
  * names and order: HF names (`model.layers.N.*`, `visual.*`, ...), stage by stage, each stage's vision tower
    first, then its language-model layers in order, so every vLLM layer receives its tensors together (vLLM's
    layerwise reload processes a layer as soon as it is complete);
  * TP: each tensor is all-gathered over its stage's TP group when its turn comes (replica 0 only: other DP
    replicas hold the same weights and stay idle);
  * PP: `held_names()` is this rank's stage's names; the stage's owner (its first TP rank of replica 0) sends each
    of them to the sender (global rank 0) when its turn comes, point to point, and the sender yields it;
  * memory: one gathered tensor at a time on any rank (plus the transfer's two buckets on the sender).
Every trainer rank iterates in lockstep; ranks other than the sender yield None for what they do not materialise
(vLLM's contract). (vLLM's IPC trainer engine would pack real tensors on every rank; colocated mode, its user here,
runs one trainer process.)
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer import ParamMeta, WeightSource

from megaapo.rollout.buckets import as_bytes, checksum


def wire_dtype(t_dtype: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Floating tensors travel in the engine's dtype (fp32 master weights -> bf16 halves the bytes)."""
    return dtype if dtype is not None and t_dtype.is_floating_point else t_dtype


class TensorSource(WeightSource):
    """A fixed list of (HF name, tensor) pairs, e.g. an HF model's `state_dict()` (tests, benchmarks)."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]] | dict, dtype: Optional[torch.dtype] = None):
        self.items = list(named.items() if isinstance(named, dict) else named)
        self.dtype = dtype

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, wire_dtype(t.dtype, self.dtype), tuple(t.shape)) for n, t in self.items]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n, t in self.items:
            yield n, t.detach().to(wire_dtype(t.dtype, self.dtype))


class Checksummed(WeightSource):
    """Another source, recording [name, checksum] of every tensor it yields (the sender's side of
    `rollout.sync_checksum`; the engines' side is `megaapo.rollout.worker`)."""

    def __init__(self, inner: WeightSource):
        self.inner = inner
        self.sums: list = []

    def metadata(self) -> list[ParamMeta]:
        return self.inner.metadata()

    def held_names(self):
        return self.inner.held_names()

    def __iter__(self):
        self.sums = []
        for name, t in self.inner:
            if t is not None:
                self.sums.append([name, checksum(as_bytes(t.detach().contiguous()))])
            yield name, t


class LearnerSource(WeightSource):
    """The megatron learner's weights (see the module docstring). Collective to build: every trainer rank
    constructs it at the same point, and `dtype` is taken from global rank 0 (which knows the engines')."""

    def __init__(self, learner, dtype: Optional[torch.dtype] = None):
        self.learner = learner
        g = learner.groups
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_sender = self.rank == 0
        self.stage, self.replica0 = g.pp_rank, g.dp_rank == 0
        # Each stage's owner describes its tensors (names, learner dtypes, full shapes: no gather needed).
        mine = learner.hf_layout() if g.tp_rank == 0 and self.replica0 else None
        mine = [(key, [(n, _name(dt), tuple(shape)) for n, dt, shape in metas]) for key, metas in mine] \
            if mine is not None else None
        everyone = [(g.pp_rank, mine, _name(dtype) if dtype is not None else None)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, (g.pp_rank, mine, _name(dtype) if dtype is not None else None))
        self.dtype = getattr(torch, everyone[0][2]) if everyone[0][2] else None   # rank 0's (the engines')
        # Send order: stage by stage. plan: (owner's global rank, its stage, mcore key, [(name, wire dtype, shape)])
        owners = sorted((stage, rank) for rank, (stage, m, _) in enumerate(everyone) if m is not None)
        self.plan = [(rank, stage, key, [(n, wire_dtype(getattr(torch, d), self.dtype), s) for n, d, s in metas])
                     for stage, rank in owners for key, metas in everyone[rank][1]]
        self._meta = [ParamMeta(n, d, s) for *_, metas in self.plan for n, d, s in metas]
        self._held = [n for _, stage, _, metas in self.plan if stage == self.stage for n, _, _ in metas]

    def metadata(self) -> list[ParamMeta]:
        return self._meta

    def held_names(self) -> list[str]:
        return self._held

    def __iter__(self) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        device = self.learner.groups.device
        for owner, stage, key, metas in self.plan:
            if stage == self.stage and self.replica0:
                full = self.learner.full_weight(key)   # a collective over this stage's TP group
                if self.rank == owner:
                    for name, t in self.learner.to_hf(key, full):
                        t = t.to(wire_dtype(t.dtype, self.dtype))
                        if self.is_sender:
                            yield name, t
                            continue
                        dist.send(t.contiguous(), dst=0)
                        yield name, None
                    continue
            elif self.is_sender:
                for name, d, shape in metas:
                    buf = torch.empty(shape, dtype=d, device=device)
                    dist.recv(buf, src=owner)
                    yield name, buf
                continue
            for name, _, _ in metas:
                yield name, None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
