"""The weight sync megaapo used before vLLM's weight-transfer protocol, kept only as `benchmarks/sync.py`'s baseline.

The old protocol, as it was: the trainer planned the buckets and sent the plan with the version over the RPC in one
request; every worker of the engine (a vLLM worker extension) received the buckets over megaapo's own gloo group and
fed them to `model_runner.reload_weights(weights_iterator=...)` (vLLM's in-place reload: layerwise load, then
`process_weights_after_loading`); the trainer broadcast meanwhile. The transport (bucket plan, packing, double
buffering) is the one the gloo backend kept (`megaapo.rollout.gloo`), so the comparison measures what the protocol
changed: its phases, RPC round trips and threads.

The engine must be started with `worker_extension_cls="legacy_sync.LegacyExtension"` and `benchmarks/` on its
PYTHONPATH; the trainer side calls the extension through the engine server's `worker_call` op. CPU (gloo) only.
"""

from __future__ import annotations

import threading
import time

from megaapo.rollout.buckets import Bucket, TensorSpec, plan_buckets
from megaapo.rollout.gloo import BucketSender, BucketStream, GlooGroup
from megaapo.rollout.worker import WeightChecksumExtension


class LegacyExtension(WeightChecksumExtension):
    """The old worker extension's receive path (vLLM adds these methods to its Worker)."""

    _legacy_group = None

    def megaapo_legacy_init(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> int:
        from vllm.distributed.parallel_state import get_world_group

        rank = rank_offset + get_world_group().rank
        self._legacy_group = GlooGroup(host, port, rank, world_size, timeout_s)
        return rank

    def megaapo_legacy_receive(self, buckets: list) -> float:
        t0 = time.perf_counter()
        stream = BucketStream(self._legacy_group, [Bucket.from_wire(b) for b in buckets])

        def weights():
            for pairs in stream:
                yield from pairs
        try:
            self.model_runner.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        finally:
            stream.drain()
        return time.perf_counter() - t0

    def megaapo_legacy_close(self) -> None:
        if self._legacy_group is not None:
            self._legacy_group.close()
            self._legacy_group = None


class LegacySync:
    """The old trainer side, driving one or more engines of a `RolloutClient` (its RPC fan-out and deadlines)."""

    def __init__(self, client, bucket_bytes: int):
        from megaapo.rollout.client import free_listen_socket

        self.client, self.bucket_bytes = client, bucket_bytes
        listen = free_listen_socket("127.0.0.1")
        port, world = listen.getsockname()[1], 1 + sum(h.info["tp"] for h in client.engines)
        offset = 1
        for h in client.engines:
            h.send("worker_call", method="megaapo_legacy_init", args=["127.0.0.1", port, offset, world, 600.0])
            offset += h.info["tp"]
        box = {}
        join = threading.Thread(target=lambda: box.update(g=GlooGroup("127.0.0.1", port, 0, world, 600.0, listen)))
        join.start()
        client._wait(client.engines, "joining the legacy sync group", 600.0)
        join.join()
        self.sender = BucketSender(box["g"], bucket_bytes)
        self.group = box["g"]

    def update_weights(self, named: list) -> float:
        """Send (name, tensor) pairs (already in the engine's dtype) and wait until every engine has loaded them;
        returns the engines' longest receive-and-load time."""
        buckets = plan_buckets([TensorSpec.of(n, t) for n, t in named], self.bucket_bytes)
        wire = [b.to_wire() for b in buckets]
        for h in self.client.engines:
            h.send("worker_call", method="megaapo_legacy_receive", args=[wire])
        send = threading.Thread(target=self.sender.send, args=(buckets, named))
        send.start()
        replies = self.client._wait(self.client.engines, "loading weights (legacy)", 600.0)
        send.join()
        # (The old engine also reset its prefix cache in the same request: nothing is cached here.)
        return max(max(r) for r in replies)

    def close(self) -> None:
        for h in self.client.engines:
            h.send("worker_call", method="megaapo_legacy_close", args=[])
        self.client._wait(self.client.engines, "leaving the legacy sync group", 600.0)
        self.group.close()
