"""Colocated rollout (GPU only): vLLM inside the trainer process, on the learner's GPU, asleep while it trains.

Built by `megaapo.rollout.make_rollout` when `rollout.mode=colocated`, with the same interface as `RolloutClient`;
the RL loop (`megaapo.train`) and `megaapo.run.Run` drive its lifecycle:

    start (before the learners exist) -> sleep           vLLM's start-up check wants its share of an empty GPU
    per step:  generate                                  wakes what sleeps: weights, then the KV cache
               sleep                                     weights and KV cache off the GPU: the learner's turn
               (old/reference log-probs, updates)
               send_weights                              wakes the weights only and loads the new ones in place,
                                                         through vLLM's ipc weight-transfer backend
               generate ...                              wakes the KV cache last, after the load

Why this order: `vllm.LLM(gpu_memory_utilization=u)` refuses to start unless u x total memory is free (vLLM 0.32,
`vllm/v1/worker/utils.py::request_memory`), and it sizes its KV cache from that budget, so the engine is built
first and put to sleep before the learners allocate; the learners then live in the memory it gave back, and what
they hold while the engine is awake must fit in (1 - u) of the GPU. Loading before the KV cache is back keeps the
peak of a weight update at learner + engine weights, not learner + engine weights + KV cache (vLLM's RLHF flow:
`wake_up(["weights"])`, load, `wake_up(["kv_cache"])`). PyTorch's cached free blocks are handed back to the driver
before each wake-up, or vLLM's allocator could not map its pages beside the learner's cache.

The weights come through vLLM's weight-transfer protocol with its `ipc` backend (`megaapo.rollout.transfer`):
vLLM's IPC trainer engine packs the learner's tensors into a GPU buffer and hands its CUDA IPC handle to the
engine's worker, which maps it (no copy beyond the packing). A CUDA IPC handle cannot be opened by the process
that made it, so this engine runs its one worker in a process of its own (vLLM's `mp` executor) on this GPU.

Sleep level 1 keeps a host copy of the weights (the host memory of one model), so an engine woken without a weight
update (an eval right after a resume) serves the weights it had. vLLM's sleep mode is CUDA-only ("Sleep mode is not
supported on current platform" on CPU): on a machine without a GPU construction fails with a clear message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from megaapo.rollout.types import EngineError, EngineSpec, Rollout, SamplingSpec, encode_prompts, to_rollouts


def build_engine(spec: EngineSpec):
    """The in-process vLLM engine with sleep mode (the one thing a CPU test replaces, with a recording double)."""
    if not torch.cuda.is_available():
        raise EngineError("rollout.mode=colocated needs a CUDA GPU: it relies on vLLM's sleep mode (freeing the "
                          "engine's weights and KV cache while the learner trains), which vLLM supports only "
                          "on GPUs. Use rollout.mode=disaggregated on this machine.")
    from megaapo.rollout.engine import VllmEngine

    return VllmEngine(spec)


class ColocatedEngine:
    def __init__(self, cfg, model: str | Path, dtype: str = "bfloat16", *, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None, sleep_level: int = 1, engine_extra: Optional[dict] = None,
                 log_dir=None, placement=None):
        """Same arguments as `RolloutClient` (log_dir and placement are unused: the engine is this process, on
        its GPU, and logs to its output)."""
        if cfg.tensor_parallel_size != 1 or cfg.num_engines != 1:
            raise EngineError("rollout.mode=colocated supports one engine with tensor_parallel_size=1 (the engine "
                              "must live in the trainer process); use rollout.mode=disaggregated for more")
        spec = EngineSpec.from_config(cfg, str(model), dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                                      extra=dict(engine_extra or {}))
        spec.enable_sleep_mode = True
        self.cfg, self.sleep_level = cfg, sleep_level
        self.engine = build_engine(spec)
        self.asleep: set[str] = set()   # the vLLM memory tags now off the GPU: "weights", "kv_cache"
        self._transfer = None            # vLLM's IPC trainer engine (made at the first send_weights)
        self.pending_version, self.finished = 0, []

    @property
    def version(self) -> int:
        return self.engine.version

    # ---------------------------------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        """Free the GPU for the learner: the KV cache is discarded, the weights go to host memory."""
        if self.asleep != {"weights", "kv_cache"}:
            if self.asleep:   # half awake (weights loaded, cache not yet back): wake fully so vLLM can sleep
                self._wake("kv_cache")
            self.engine.sleep(self.sleep_level)
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            torch.cuda.empty_cache()   # the learner's cached free blocks back to the driver, for vLLM to map
            self.engine.wake_up([tag])
            self.asleep.discard(tag)

    def _awake(self) -> None:
        """Everything back before serving, weights first (vLLM resumes scheduling only when nothing sleeps)."""
        self._wake("weights")
        self._wake("kv_cache")

    # ------------------------------------------------------------------------------------------------- calls
    def generate(self, prompts: Sequence, sampling: Optional[SamplingSpec] = None, between=None) -> list[Rollout]:
        if between is not None:   # config validation refuses colocated + max_staleness >= 1 (so partial rollouts)
            raise EngineError("a colocated engine does not generate across weight updates (rollout.partial)")
        self._awake()
        sampling = sampling or SamplingSpec.from_config(self.cfg)
        return to_rollouts(self.engine.generate(encode_prompts(prompts), sampling.to_wire()), 0, 0)

    def score(self, prompts: Sequence, continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        self._awake()
        return self.engine.score(encode_prompts(prompts), [list(c) for c in continuations])["logprobs"]

    @property
    def engine_dtype(self) -> torch.dtype:
        return getattr(torch, self.engine.health()["dtype"])

    @property
    def transfer_backend(self) -> str:
        return self.engine.spec.weight_transfer

    def send_weights(self, source, version: int) -> dict:
        """Load `source` (a vLLM WeightSource) in place through vLLM's ipc backend; serves `version` after. The KV
        cache stays asleep until the next generate, so the update's peak is learner + engine weights."""
        from megaapo.rollout.transfer import push, trainer_engine

        self._wake("weights")
        if self._transfer is None:
            self._transfer = trainer_engine(self._trainer_init_info(), self, source)
        return push(self, self._transfer, source, version, self.cfg.sync_checksum)

    def _trainer_init_info(self):
        """ipc (the engine's spec says so on a GPU); gloo joins the in-process worker over a loopback group, which
        is how the colocated lifecycle runs on a CPU (tests/test_colocated.py: no sleep mode, no CUDA IPC there)."""
        from megaapo.rollout.transfer import init_info

        bucket = self.cfg.sync_bucket_mb << 20
        if self.transfer_backend != "gloo":
            return init_info(self.transfer_backend, bucket_bytes=bucket)
        from megaapo.rollout.client import free_listen_socket

        listen = free_listen_socket("127.0.0.1")
        return init_info("gloo", host="127.0.0.1", port=listen.getsockname()[1], world_size=2, bucket_bytes=bucket,
                         timeout_s=self.cfg.request_timeout_s, listen_socket=listen)

    # The client side of vLLM's weight-transfer protocol, in process (vLLM's IPC trainer engine calls these).
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update(self.cfg.sync_checksum)

    def update_weights(self, update_info) -> None:
        self.engine.update_weights(update_info)

    def finish_weight_update(self, weight_version=None) -> None:
        version = int(weight_version) if weight_version is not None else self.pending_version
        self.finished = [("the colocated engine", self.engine.finish_weight_update(version))]

    def health(self) -> list[dict]:
        return [dict(self.engine.health(), asleep=sorted(self.asleep))]

    def ready(self) -> "ColocatedEngine":
        """Built in-process, so ready once constructed (the same call as RolloutClient's)."""
        return self

    def shutdown(self) -> None:
        self.engine = None

    def __enter__(self) -> "ColocatedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
