"""The "gloo" weight-transfer backend: vLLM's four-phase protocol over a gloo group, for CPU trainers and engines.

vLLM 0.32 ships `nccl` and `ipc` backends (GPU only); this one is registered with both of vLLM's factories by
`register()` (`WeightTransferEngineFactory` for the engine's workers, `WeightTransferTrainerFactory` for the
trainer), so a CPU run goes through exactly the phases a GPU run does:

    trainer: WeightTransferTrainerFactory.trainer_init(GlooTrainerInitInfo(...), client=..., source=...)
             -> client.init_weight_transfer_engine(worker init info)       workers join the gloo group
    each sync: send_weights(): client.start_weight_update()                  layerwise reload begins
             client.update_weights({names, dtype_names, shapes})  while    the trainer broadcasts the buckets
             client.finish_weight_update()                                 layerwise reload ends

Wire format: both sides plan the same buckets from the update info's metadata and `bucket_bytes` (an init-time
parameter, like NCCL's `packed_buffer_size_bytes`): `megaapo.rollout.buckets`, tensors of mixed dtypes in one
uint8 buffer at 64-byte aligned offsets, a tensor larger than a bucket sent alone from its own storage. The sender
packs bucket k+1 while bucket k is on the wire (gloo broadcasts on its own thread); each worker receives bucket k+1
while vLLM loads bucket k. Received buckets are fresh buffers, never reused: vLLM's layerwise reload keeps views of
a layer's tensors until the layer is complete, which may be several buckets later.

Called by vLLM itself (engine workers create the worker engine from `WeightTransferConfig(backend="gloo")`) and by
`megaapo.rollout.transfer` (trainer side); `benchmarks/sync.py` uses the bucket sender and stream directly.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import (TrainerInitInfo, TrainerWeightTransferEngine, WeightTransferEngine,
                                                   WeightTransferInitInfo, WeightTransferUpdateInfo)

from megaapo.rollout.buckets import Bucket, TensorSpec, as_bytes, pack, plan_buckets, unpack

BACKEND = "gloo"
DEFAULT_BUCKET_BYTES = 512 << 20


# ------------------------------------------------------------------------------------------------------- the group
class GlooGroup:
    """A broadcast-only gloo group outside torch.distributed's global state (vLLM's stateless process group), so the
    trainer's own groups and vLLM's are untouched. Rank 0 (the trainer) may pass a pre-bound listening socket."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float, listen_socket=None):
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.rank, self.world_size = rank, world_size
        self._pg = stateless_init_torch_distributed_process_group(
            host, port, rank, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s),
            listen_socket=listen_socket)

    def broadcast(self, tensor: torch.Tensor, src: int):
        """Start broadcasting a CPU tensor from rank `src`; wait() on the returned handle blocks until it is done.
        gloo runs the transfer on its own thread, so the caller can pack or load meanwhile."""
        return self._pg.broadcast(tensor, src)

    def close(self) -> None:
        if self._pg is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            try:
                stateless_destroy_torch_distributed_process_group(self._pg)
            except Exception:   # a peer already gone: nothing left to release here
                pass
            self._pg = None


def specs_of(names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(s), d) for n, d, s in zip(names, dtype_names, shapes)]


# ------------------------------------------------------------------------------------------------- sender (trainer)
class BucketSender:
    """Packs named tensors into the planned buckets and broadcasts them from rank 0, two packing buffers
    alternating so that bucket k+1 is packed while bucket k is on the wire."""

    def __init__(self, group: GlooGroup, bucket_bytes: int):
        self.group, self.bucket_bytes = group, bucket_bytes
        self._bufs: list[torch.Tensor] = []

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        while len(self._bufs) <= slot:
            self._bufs.append(torch.empty(0, dtype=torch.uint8))
        if self._bufs[slot].numel() < nbytes:
            self._bufs[slot] = torch.empty(max(nbytes, self.bucket_bytes), dtype=torch.uint8)
        return self._bufs[slot]

    def send(self, buckets: list[Bucket], named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Broadcast `named_tensors` (in plan order, in the planned dtypes) bucket by bucket; returns the bytes."""
        it = iter(named_tensors)
        inflight: deque = deque()   # (work, data, slot)
        nbytes, slot = 0, 0
        for b in buckets:
            tensors = [_next(it, spec) for spec, _ in b.entries]
            if b.solo:
                data, used = as_bytes(tensors[0].contiguous()), -1
            else:
                while any(s == slot for _, _, s in inflight):
                    inflight.popleft()[0].wait()
                data, used = pack(b, tensors, self._buffer(slot, b.nbytes)), slot
                slot ^= 1
            inflight.append((self.group.broadcast(data, b.src), data, used))
            nbytes += b.nbytes
            # Solo buckets are already in flight from their own storage; keep at most two transfers queued.
            while len(inflight) > 2:
                inflight.popleft()[0].wait()
        while inflight:
            inflight.popleft()[0].wait()
        leftover = next(it, None)
        if leftover is not None:
            raise ValueError(f"weight {leftover[0]!r} is not in the sync plan (metadata and weights disagree)")
        return nbytes


def _next(it, spec: TensorSpec) -> torch.Tensor:
    try:
        name, t = next(it)
    except StopIteration:
        raise ValueError(f"the weights ended before {spec.name!r}, which the sync plan expects") from None
    if name != spec.name or tuple(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
        raise ValueError(f"weight {name!r} {tuple(t.shape)} {t.dtype} arrived where the sync plan expects "
                         f"{spec.name!r} {spec.shape} {spec.dtype}: iteration must follow metadata()")
    return t.detach().cpu() if t.device.type != "cpu" else t.detach()


# ------------------------------------------------------------------------------------------------ receiver (worker)
class BucketStream:
    """Receives the planned buckets in order, one ahead of the consumer, each into a fresh buffer; `drain` takes
    what the consumer left, so the sender never waits on a receiver that gave up."""

    def __init__(self, group: GlooGroup, buckets: list[Bucket]):
        self.group, self.buckets = group, buckets
        self.received = 0
        self._pending = None

    def _post(self, i: int):
        b = self.buckets[i]
        buf = torch.empty(b.nbytes, dtype=torch.uint8)
        return b, buf, self.group.broadcast(buf, b.src)

    def _next(self) -> tuple[Bucket, torch.Tensor]:
        if self._pending is None:
            self._pending = self._post(0)
        b, buf, work = self._pending
        work.wait()
        self.received += 1
        self._pending = self._post(self.received) if self.received < len(self.buckets) else None
        return b, buf

    def __iter__(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """One list of (name, view) pairs per bucket."""
        while self.received < len(self.buckets):
            b, buf = self._next()
            yield list(unpack(b, buf))

    def drain(self) -> int:
        left = len(self.buckets) - self.received
        while self.received < len(self.buckets):
            self._next()
        return left


# ----------------------------------------------------------------------------------------- protocol: worker side
@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """What a worker needs to join the group: the trainer's store, this engine's first rank, the group size."""
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One sync's metadata, in send order (the same fields as vLLM's NCCL update info)."""
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: {len(self.names)}, "
                             f"{len(self.dtype_names)}, {len(self.shapes)}")


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """The worker side: created by vLLM in every worker when `WeightTransferConfig(backend="gloo")`."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group: GlooGroup | None = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        if self.group is not None:   # a new trainer (or a restarted one) replaces the old group
            self.group.close()
        pc = self.parallel_config
        # A unique rank across data-parallel replicas, exactly as vLLM's NCCL backend numbers its workers.
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.group = GlooGroup(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                               init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a machine without an
        # accelerator; gloo's receives have completed when receive_weights returns.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer: update_weights before init_weight_transfer_engine")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        buckets = plan_buckets(specs_of(update_info.names, update_info.dtype_names, update_info.shapes),
                               self.bucket_bytes)
        stream = BucketStream(self.group, buckets)
        try:
            with disable_mtp_completeness_check():
                for pairs in stream:
                    self.model.load_weights([(n, t.to(self.device)) for n, t in pairs]
                                            if self.device.type != "cpu" else pairs)
        finally:
            # After a loader error the trainer is still sending: take the rest so that it finishes too.
            stream.drain()

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


# ---------------------------------------------------------------------------------------- protocol: trainer side
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info. The sender (rank 0) hosts the group's store; `listen_socket`, when given, is a bound
    listening socket for it (no other process can take the port between choosing and binding it)."""
    backend: ClassVar[str] = BACKEND
    master_address: str = "127.0.0.1"
    master_port: int = 0
    world_size: int = 2
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0
    listen_socket: object = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer side, on every trainer rank: the sender broadcasts; the others only iterate the source (its
    gathers are collectives among them)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group: GlooGroup | None = None
        self.sender: BucketSender | None = None
        self.last: dict = {}

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo trainer weight transfer requires a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s)
        # The workers block in init_weight_transfer_engine until everyone has joined: join meanwhile.
        with ThreadPoolExecutor(max_workers=1) as exe:
            joined = exe.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = GlooGroup(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                     init_info.timeout_s, listen_socket=init_info.listen_socket)
            joined.result()
        engine.sender = BucketSender(engine.group, init_info.bucket_bytes)
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        info = GlooWeightTransferUpdateInfo(names=[m.name for m in meta],
                                            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                                            shapes=[list(m.shape) for m in meta])
        buckets = plan_buckets(specs_of(info.names, info.dtype_names, info.shapes), self.bucket_bytes)
        self.client.start_weight_update()
        t0 = time.perf_counter()
        # The workers' update_weights receives what the broadcast below sends: the two run concurrently.
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            received = exe.submit(self.client.update_weights, asdict(info))
            nbytes = self.sender.send(buckets, self.source)
            received.result()
        finally:
            # Never join the RPC thread on an error: its engines may be gone (the client's own deadline ends it).
            exe.shutdown(wait=False)
        self.last = {"buckets": len(buckets), "bytes": nbytes, "transfer_seconds": time.perf_counter() - t0}
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


_REGISTERED = False


def register() -> None:
    """Add "gloo" to vLLM's worker and trainer factories (idempotent). The engine process calls it before
    `vllm.LLM(...)` (workers it forks inherit the registry; spawned TP workers import this module through the
    worker extension); the trainer before `trainer_init`."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, GlooWeightTransferEngine),
                         (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        try:
            factory.register_engine(BACKEND, cls)
        except ValueError:   # "already registered": by an earlier import of this module under another name
            pass
    _REGISTERED = True
