"""The rollout interface's data types: sampling settings, one generated sample, the engine spec, the error.

Used by the trainer (through `RolloutClient`), the engine server and the colocated engine. Everything here crosses
the RPC as plain msgpack-able values (dicts, lists, numbers, bytes); tensors never do.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

# vLLM reads these at import time, so they are set in the engine process before `import vllm`. Loopback addresses
# keep vLLM's ZMQ sockets off public interfaces; the usage-stats switches stop it from posting to an outside server;
# 1 GiB of KV cache is plenty for CPU runs (its default takes a large share of RAM); the in-process engine core
# starts in ~3 s instead of ~20 s and keeps one process per engine (our server process *is* the engine process).
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def apply_engine_env(env: Optional[dict] = None) -> dict:
    """Fill ENGINE_ENV into `env` (default os.environ) without overriding what the user set explicitly."""
    env = os.environ if env is None else env
    for k, v in ENGINE_ENV.items():
        env.setdefault(k, v)
    # Our server process is the engine process; vLLM's own engine-core subprocess would only add a hop.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


# The engine server prints a start failure as one line with this prefix; the client quotes that line.
ERROR_MARKER = "MEGAAPO_ENGINE_ERROR: "


class EngineError(RuntimeError):
    """An engine died, stopped answering, failed to start or failed a request; the message names which and why."""


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. Log-probs are always returned for the sampled tokens, after temperature (what the learner
    computes from logits / temperature); with top_p < 1 they are renormalised over the nucleus vLLM sampled from."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple = ()
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    seed: Optional[int] = None   # sample k of prompt i uses seed + i * n + k (distinct; vLLM batching may still
                                 # change results a little, so not bit-reproducible across batch compositions)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "SamplingSpec":
        """From a `RolloutConfig`; keyword overrides win (eval uses e.g. n=1, temperature=0.01)."""
        base = dict(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                    stop=tuple(cfg.stop))
        base.update(overrides)
        return cls(**base)

    def to_wire(self) -> dict:
        d = asdict(self)
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return d


@dataclass
class Rollout:
    """One sampled response. `prompt_token_ids` are the engine's own ids with image pads expanded, so the learner
    rebuilds prompt + response from ids and never re-tokenises text."""
    group: int                    # index of the prompt in the generate() call (the GRPO group id)
    sample: int                   # 0..n-1 within the group
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]         # one per token id: log p(token) under the engine's weights, post-temperature
    text: str                     # detokenised response, for reward functions only
    finish_reason: str            # "stop" (EOS or stop string/token) | "length" | "abort"
    stop_reason: Any              # the stop string or token id that ended it, None for EOS/length
    weight_version: int           # the weights the engine served when the call returned
    engine: int                   # which engine served it
    weight_versions: list = field(default_factory=list)   # vLLM's [version, start, end) spans over the tokens


@dataclass
class EngineSpec:
    """What one engine process loads and how; built by the client from RolloutConfig (+ model path and dtype)."""
    model: str
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool = False
    max_model_len: int = 0            # 0: the model's own limit
    max_num_seqs: int = 256
    max_images_per_prompt: int = 1
    min_pixels: Optional[int] = None  # the image processor's bounds; must match the prompt builder's
    max_pixels: Optional[int] = None
    seed: int = 0
    enable_sleep_mode: bool = False   # colocated mode only (GPU)
    weight_transfer: str = "gloo"     # vLLM's WeightTransferConfig backend: gloo (CPU), nccl, ipc (colocated)
    extra: dict = field(default_factory=dict)   # more vllm.LLM keyword arguments, passed through

    @classmethod
    def from_config(cls, cfg, model: str, dtype: str, **kw) -> "EngineSpec":
        return cls(model=str(model), dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                   gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                   max_model_len=cfg.max_model_len, max_images_per_prompt=cfg.max_images_per_prompt,
                   enable_sleep_mode=cfg.mode == "colocated", weight_transfer=transfer_backend(cfg), **kw)


def transfer_backend(cfg) -> str:
    """`rollout.sync_backend`, with "auto" resolved where it is read (the trainer for engines it starts, the engine
    server for a rollout node): ipc when colocated, else nccl where CUDA is available, gloo otherwise."""
    if cfg.sync_backend != "auto":
        return cfg.sync_backend
    if cfg.mode == "colocated":
        return "ipc"
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


# --------------------------------------------------------------------------------------------- prompts on the wire
def encode_image(image) -> bytes:
    """An image as compact file bytes: a path is read as it is (already encoded), a PIL image is written as PNG
    (lossless, so the engine sees exactly the pixels the learner's processor sees)."""
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def encode_prompt(prompt) -> dict:
    """A `megaapo.data.prompts.Prompt` (or any object with .text and .images, or a (text, images) pair) as a
    wire dict. Images travel as bytes so that an engine on another node needs no shared filesystem."""
    if isinstance(prompt, str):
        text, images = prompt, []
    elif isinstance(prompt, (tuple, list)):
        text, images = prompt
    else:
        text, images = prompt.text, prompt.images
    return {"text": text, "images": [encode_image(im) for im in (images or [])]}


def encode_prompts(prompts: Sequence) -> list[dict]:
    return [encode_prompt(p) for p in prompts]


def to_rollouts(reply: dict, first_group: int, engine: int) -> list[Rollout]:
    """An engine's generate reply as Rollouts, its prompts numbered from `first_group`."""
    out = []
    for j, o in enumerate(reply["outputs"]):
        for k, s in enumerate(o["samples"]):
            out.append(Rollout(group=first_group + j, sample=k, prompt_token_ids=o["prompt_token_ids"],
                               token_ids=s["token_ids"], logprobs=s["logprobs"], text=s["text"],
                               finish_reason=s["finish_reason"], stop_reason=s["stop_reason"],
                               weight_version=reply["version"], engine=engine,
                               weight_versions=s.get("weight_versions", [])))
    return out
