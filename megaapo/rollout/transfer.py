"""Weight sync on vLLM's weight-transfer protocol, trainer side.

    sync = WeightSync(policy, engines, cfg.rollout)   # every trainer rank, at the same point (collective)
    sync.send(policy.version)                         # every trainer rank; the engines then serve that version

vLLM 0.32's protocol: the trainer builds a `TrainerWeightTransferEngine` with `WeightTransferTrainerFactory.
trainer_init(init_info, client=..., source=...)` and calls `send_weights()` once per sync; the engine drives the
inference side through the client's four methods (`init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update`). Here:
  * the source is `megaapo.rollout.source.LearnerSource` on every rank (HF names, layer order, TP gather, PP stage
    owners); global rank 0 is the sender, the other ranks run the same engine as non-senders (they only iterate
    the source, whose gathers are collectives among them: vLLM's contract);
  * the backend is the engines' (`rollout.sync_backend`): vLLM's `nccl` (GPU engines of their own), vLLM's `ipc`
    (colocated), or megaapo's `gloo` (CPU, `megaapo.rollout.gloo`, registered with vLLM's factories);
  * the client is the rollout object on rank 0: `RolloutClient` (the four methods over the engines' msgpack RPC,
    fanned out, with deadlines and death watch) or `ColocatedEngine` (in process). `push` below is what both run
    per sync: it hands the version over (vLLM's trainer engines call `finish_weight_update()` without one) and
    checks what every engine reports at the finish: the version it serves and, with `rollout.sync_checksum`, the
    checksum of every tensor it loaded against the sender's.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megaapo.rollout.source import Checksummed, LearnerSource
from megaapo.rollout.types import EngineError


def trainer_engine(init_info, client, source):
    """vLLM's trainer engine for `init_info`'s backend; on the sender this rendezvouses with the engines."""
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from megaapo.rollout import gloo

    gloo.register()
    return WeightTransferTrainerFactory.trainer_init(init_info, client=client, source=source)


def init_info(backend: str, *, rank: int = 0, host: str = "", port: int = 0, world_size: int = 0,
              bucket_bytes: int = 512 << 20, timeout_s: float = 600.0, listen_socket=None):
    """The trainer init info of `backend` (non-senders need only their rank and the wire parameters)."""
    if backend == "gloo":
        from megaapo.rollout.gloo import GlooTrainerInitInfo

        return GlooTrainerInitInfo(rank=rank, master_address=host, master_port=port, world_size=world_size,
                                   bucket_bytes=bucket_bytes, timeout_s=timeout_s, listen_socket=listen_socket)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        # Packed: the buckets of `rollout.sync_bucket_mb`, two in flight (vLLM's double buffering).
        return NCCLTrainerInitInfo(rank=rank, master_address=host, master_port=port, world_size=world_size,
                                   packed=True, packed_buffer_size_bytes=bucket_bytes, packed_num_buffers=2)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=bucket_bytes)
    raise EngineError(f"unknown weight-transfer backend {backend!r} (rollout.sync_backend: gloo, nccl, ipc)")


def push(client, engine, source, version: int, checksums: bool) -> dict:
    """One sync from the sending rank through vLLM's trainer `engine`, whose client is `client`. Afterwards every
    engine serves `version`, or this raises EngineError naming the engine that does not (or that loaded other bytes
    than were sent). The client records each engine's finish reply in `client.finished` [(name, reply)]."""
    sent = Checksummed(source) if checksums else source
    engine.source = sent                 # vLLM's engines replay `self.source` on every send_weights()
    client.pending_version = version     # ... and call client.finish_weight_update() without a version
    client.finished = []
    t0 = time.perf_counter()
    engine.send_weights()
    seconds = time.perf_counter() - t0
    for name, reply in client.finished:
        if reply["version"] != version:
            raise EngineError(f"{name} serves weight version {reply['version']} after an update to {version}")
        if checksums and not reply.get("checksums"):
            raise EngineError(f"{name} returned no checksums for weight version {version}")
        for worker, got in enumerate(reply["checksums"] if checksums else []):
            bad = _first_difference(sent.sums, got)
            if bad is not None:
                raise EngineError(f"{name} (worker {worker}) loaded other bytes than the trainer sent: {bad}")
    meta = sent.metadata()
    stats = {"version": version, "tensors": len(meta), "seconds": seconds,
             "bytes": sum(torch.Size(m.shape).numel() * m.dtype.itemsize for m in meta),
             "engine_load_seconds": max((r.get("seconds", 0.0) for _, r in client.finished), default=0.0)}
    return stats | getattr(engine, "last", {})


def _first_difference(sent: list, got: list):
    for i, (a, b) in enumerate(zip(sent, got)):
        if list(a) != list(b):
            return f"tensor {i} of {len(sent)}: sent {a[0]!r} (checksum {a[1]}), loaded {b[0]!r} (checksum {b[1]})"
    if len(sent) != len(got):
        return f"{len(got)} tensors loaded, {len(sent)} sent"
    return None


class WeightSync:
    """The learner's side of weight sync on one trainer rank (see the module docstring). Built on every rank at
    the same point: rank 0 tells the others the engines' backend and dtype, and the source plans collectively."""

    def __init__(self, learner, engines, cfg):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.engines, self.bucket_bytes = engines, cfg.sync_bucket_mb << 20
        box = [(engines.transfer_backend, str(engines.engine_dtype).removeprefix("torch."))
               if engines is not None else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        self.backend = box[0][0] if box[0] else None
        self.source = None
        if self.backend is not None:
            self.source = LearnerSource(learner, getattr(torch, box[0][1]))

    def send(self, version: int) -> dict:
        """Every trainer rank: the engines serve `version` when the sender's call returns (its stats; {} elsewhere)."""
        if self.source is None:
            return {}
        if self.engines is not None:
            return self.engines.send_weights(self.source, version)
        follower = trainer_engine(init_info(self.backend, rank=self.rank, bucket_bytes=self.bucket_bytes),
                                  None, self.source)
        follower.send_weights()
        return {}
