"""The trainer's handle on its rollout engines: start or connect, generate, score, update weights, shut down.

Called by the RL loop (`megaapo.train`) and eval as
    with RolloutClient(cfg.rollout, model_path, cfg.model.dtype) as engines:
        rollouts = engines.generate(prompts, SamplingSpec.from_config(cfg.rollout))
        engines.update_weights(learner.hf_weights(), version=step)
Fan-out is explicit: every call sends one request per engine, then `_wait` collects the replies, watching each
engine's process and a deadline, so a dead or silent engine becomes one `EngineError` naming it and what it was
doing. After any such error the client refuses further calls (engines may hold half a request) and the caller
shuts down. Engines started here live in their own process group and die with the trainer (atexit, context
manager, and the engine's own parent watch for a trainer that was SIGKILLed).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional, Sequence
from urllib.parse import urlparse

import torch

from megaapo.rollout.buckets import TensorSpec
from megaapo.rollout.group import SyncGroup, free_listen_socket, route_address
from megaapo.rollout.placement import Placement, plan_here
from megaapo.rollout.sync import WeightSender, cast_for_engine
from megaapo.rollout.types import (ERROR_MARKER, EngineError, EngineSpec, Rollout, SamplingSpec, apply_engine_env,
                                   encode_prompts, to_rollouts)

# Strong references: a client dropped without shutdown() must still have its engines stopped at exit.
_LIVE: "set[RolloutClient]" = set()


@atexit.register
def _shutdown_all() -> None:
    for client in list(_LIVE):
        client.shutdown()


class EngineHandle:
    """One engine: a process this client started, or an address a launcher gave us."""

    def __init__(self, index: int, address: str | None = None, proc: subprocess.Popen | None = None,
                 log_path: Path | None = None, endpoint_file: Path | None = None, tmp_dir: Path | None = None):
        import msgspec

        self.index, self.address, self.proc = index, address, proc
        self.log_path, self.endpoint_file, self.tmp_dir = log_path, endpoint_file, tmp_dir
        self.sock = None
        self.info: dict = {}
        self._enc, self._dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()

    @property
    def name(self) -> str:
        return f"engine {self.index} (pid {self.proc.pid})" if self.proc else f"engine {self.index} ({self.address})"

    def connect(self, address: str) -> None:
        import zmq

        self.address = address
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def send(self, op: str, **args) -> None:
        self.sock.send(self._enc.encode({"op": op, "args": args}))

    def recv(self) -> dict:
        return self._dec.decode(self.sock.recv())

    def death(self, what: str) -> EngineError:
        rc = self.proc.poll()
        killed = rc is not None and rc < 0
        how = f"killed by {signal.Signals(-rc).name}" if killed else f"exit code {rc}"
        reason = self.log_reason(killed)
        return EngineError(f"{self.name} died while {what} ({how})" + (f": {reason}" if reason else "")
                           + (f"; log: {self.log_path}" if self.log_path else ""))

    def log_reason(self, killed: bool = False) -> str:
        """The engine's own account of its end: its error line, else the exception that ended it; nothing for an
        engine killed by a signal (it wrote nothing about that; the last lines of its log are about something
        else) or one whose log holds no error."""
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        marked = [ln.split(ERROR_MARKER, 1)[1] for ln in text if ERROR_MARKER in ln]
        if marked:
            return marked[-1]
        if killed:
            return ""
        return _last_exception(text)[-1200:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)   # the engine's whole process group (vLLM may fork workers)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.tmp_dir is not None and (self.proc is None or self.proc.poll() is not None):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)   # vLLM's rendezvous files (vllm_dist_*) live there


def _last_exception(lines: list[str]) -> str:
    """The final line of the last Python traceback in a log ("ValueError: ..."), or ""."""
    start = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")), default=None)
    if start is None:
        return ""
    for ln in lines[start + 1:]:
        if ln and not ln.startswith((" ", "\t", "Traceback")):
            return ln.strip()
    return ""


class _Background(threading.Thread):
    """Runs a blocking transfer (group join, broadcast) while the caller keeps watching the engines."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True, name="megaapo-sync")
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:   # noqa: BLE001 - re-raised in the caller's thread
            self.error = e


class RolloutClient:
    def __init__(self, cfg, model: str | Path | None = None, dtype: str = "bfloat16", *,
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 log_dir: str | Path | None = None, engine_extra: Optional[dict] = None, wait: bool = True,
                 placement: Optional[Placement] = None):
        """Start `cfg.num_engines` engines on `model` (or connect to `cfg.addresses`) and wait until they serve.

        min/max_pixels must be the data config's, so that the engine's image token counts match the prompt
        builder's. Engine logs go to `log_dir` (default: a temporary directory). wait=False returns as soon as the
        engines are asked to start (they load while the caller works on); `ready()` then waits for them.
        `placement` gives each engine its GPUs (`megaapo.rollout.placement`; the run plans it at start); without
        it the client plans from this process's environment, letting engines share this process's GPU only when
        no other is free (and then refusing weight updates, which need disjoint GPUs)."""
        if cfg.mode == "colocated":
            raise EngineError("rollout.mode=colocated runs vLLM inside the trainer process: use "
                              "megaapo.rollout.colocated.ColocatedEngine, not RolloutClient")
        self.cfg = cfg
        self.engines: list[EngineHandle] = []
        self.version = 0
        self._failed: Optional[str] = None
        self._group: Optional[SyncGroup] = None
        self._sender: Optional[WeightSender] = None
        self._starting = False
        self.placement: Optional[Placement] = None
        _LIVE.add(self)
        try:
            if cfg.addresses:
                for i, addr in enumerate(cfg.addresses):
                    h = EngineHandle(i)
                    h.connect(addr)
                    self.engines.append(h)
            else:
                if not model:
                    raise EngineError("no model to serve: give RolloutClient a model path or rollout.addresses")
                spec = EngineSpec.from_config(cfg, str(model), dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                                              extra=dict(engine_extra or {}))
                if placement is None:
                    placement = plan_here(cfg, trainer_on_gpu=torch.cuda.is_available(), weight_sync=False)
                self.placement = placement
                self._spawn(spec, Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="megaapo-engines-")))
            for h in self.engines:
                h.send("health")
            self._starting = True
            if wait:
                self.ready()
        except BaseException:
            self.shutdown()
            raise

    def ready(self) -> "RolloutClient":
        """Wait until every engine serves (the health replies to the requests sent at start); idempotent."""
        if not self._starting:
            return self
        try:
            infos = self._wait(self.engines, "starting", self.cfg.start_timeout_s,
                               timeout_name="rollout.start_timeout_s")
        except BaseException:
            self.shutdown()
            raise
        for h, info in zip(self.engines, infos):
            h.info = info
        self.version = infos[0]["version"]
        self._starting = False
        return self

    # ------------------------------------------------------------------------------------------------- start
    def _spawn(self, spec: EngineSpec, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        base_env = apply_engine_env(dict(os.environ))
        for i in range(self.cfg.num_engines):
            # Its own GPUs, never the trainer's inherited CUDA_VISIBLE_DEVICES (vLLM would take the first of them).
            env = base_env | self.placement.engine_env(i)
            endpoint_file = log_dir / f"engine_{i}.endpoint"
            endpoint_file.unlink(missing_ok=True)
            log_path = log_dir / f"engine_{i}.log"
            # A temporary directory of its own: vLLM leaves a `vllm_dist_*` rendezvous file in $TMPDIR per start;
            # removed with the engine (by this client, or by the engine itself when it outlives the trainer).
            tmp_dir = Path(tempfile.mkdtemp(prefix=f"megaapo-engine{i}-"))
            cmd = [sys.executable, "-m", "megaapo.rollout.server", "--spec-json", json.dumps(asdict(spec)),
                   "--bind", "tcp://127.0.0.1:0", "--endpoint-file", str(endpoint_file),
                   "--parent-pid", str(os.getpid()), "--tmp-dir", str(tmp_dir)]
            try:
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(env, TMPDIR=str(tmp_dir)), start_new_session=True)
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            self.engines.append(EngineHandle(i, proc=proc, log_path=log_path, endpoint_file=endpoint_file,
                                             tmp_dir=tmp_dir))
        # The server binds before it imports vLLM, so its address is known within about a second.
        deadline = time.monotonic() + self.cfg.start_timeout_s
        waiting = list(self.engines)
        while waiting:
            for h in list(waiting):
                if h.endpoint_file.exists():
                    h.connect(h.endpoint_file.read_text().strip())
                    waiting.remove(h)
                elif not h.alive():
                    raise h.death("starting")
            if waiting and time.monotonic() > deadline:
                raise EngineError(f"{waiting[0].name} did not open its RPC socket within "
                                  f"{self.cfg.start_timeout_s:g} s (rollout.start_timeout_s); log: "
                                  f"{waiting[0].log_path}")
            time.sleep(0.05)

    # -------------------------------------------------------------------------------------------------- calls
    def _check_usable(self) -> None:
        if self._failed:
            raise EngineError(f"the rollout engines are unusable after an earlier failure: {self._failed}")
        if self._starting:
            self.ready()

    def _wait(self, handles: Sequence[EngineHandle], what: str, timeout: float, *,
              background: Optional[_Background] = None, timeout_name: str = "rollout.request_timeout_s") -> list:
        """Collect one reply from each handle (and let `background` finish), or raise the first failure."""
        import zmq

        poller = zmq.Poller()
        for h in handles:
            poller.register(h.sock, zmq.POLLIN)
        results: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) < len(handles) or (background is not None and background.is_alive()):
                ready = dict(poller.poll(50))
                for h in handles:
                    if h.index in results:
                        continue
                    if h.sock in ready:
                        reply = h.recv()
                        if not reply["ok"]:
                            raise EngineError(f"{h.name} failed while {what}: {reply['error']}")
                        results[h.index] = reply["result"]
                    elif not h.alive():
                        raise h.death(what)
                if background is not None and background.error is not None:
                    raise EngineError(f"sending weights failed while {what}: {background.error}") \
                        from background.error
                if time.monotonic() > deadline:
                    late = [h.name for h in handles if h.index not in results] or ["the weight sender"]
                    raise EngineError(f"{late[0]} did not answer within {timeout:g} s while {what} "
                                      f"({timeout_name})")
        except BaseException as e:
            self._failed = str(e)
            raise
        return [results[h.index] for h in handles]

    def _spread(self, n: int) -> list[tuple[EngineHandle, int, int]]:
        """Contiguous, near-equal slices of n prompts, one per engine (an engine with nothing to do is skipped)."""
        k = len(self.engines)
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [(h, bounds[i], bounds[i + 1]) for i, h in enumerate(self.engines) if bounds[i + 1] > bounds[i]]

    def generate(self, prompts: Sequence, sampling: Optional[SamplingSpec] = None) -> list[Rollout]:
        """n samples for each prompt (a `Prompt`, a (text, images) pair or plain text; images are paths, PIL images
        or encoded bytes), spread over all engines. Returns len(prompts) * n rollouts, prompt-major."""
        self._check_usable()
        sampling = sampling or SamplingSpec.from_config(self.cfg)
        wire, parts = encode_prompts(prompts), self._spread(len(prompts))
        base = sampling.to_wire()
        for h, lo, hi in parts:
            s = dict(base, seed=None if sampling.seed is None else sampling.seed + lo * sampling.n)
            h.send("generate", prompts=wire[lo:hi], sampling=s)
        replies = self._wait([h for h, _, _ in parts], "generating", self.cfg.request_timeout_s)
        versions = {r["version"] for r in replies}
        if len(versions) > 1:
            self._failed = f"engines served weight versions {sorted(versions)} in one batch"
            raise EngineError(self._failed + " (a weight update reached only some engines)")
        return [r for (h, lo, _), reply in zip(parts, replies) for r in to_rollouts(reply, lo, h.index)]

    def score(self, prompts: Sequence, continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        """The engines' log-probs (temperature 1) of given continuation token ids after each prompt."""
        self._check_usable()
        wire, parts = encode_prompts(prompts), self._spread(len(prompts))
        for h, lo, hi in parts:
            h.send("score", prompts=wire[lo:hi], continuations=[list(c) for c in continuations[lo:hi]])
        replies = self._wait([h for h, _, _ in parts], "scoring", self.cfg.request_timeout_s)
        return [lp for r in replies for lp in r["logprobs"]]

    def health(self) -> list[dict]:
        self._check_usable()
        for h in self.engines:
            h.send("health")
        return self._wait(self.engines, "answering a health check", min(30.0, self.cfg.request_timeout_s))

    # ------------------------------------------------------------------------------------------------ weights
    @property
    def engine_dtype(self) -> torch.dtype:
        return getattr(torch, self.engines[0].info["dtype"])

    def _ensure_group(self) -> None:
        if self._group is not None:
            return
        if self.placement is not None and self.placement.shared:
            raise EngineError(f"rollout engines share a GPU with the trainer ({self.placement.describe()}), and NCCL "
                              "refuses two ranks of the weight-sync group on one GPU: give them GPUs of their own "
                              "(fewer trainer processes, rollout.engine_gpus) or use rollout.mode=colocated")
        local = all(h.proc is not None for h in self.engines)
        host = self.cfg.sync_host or ("127.0.0.1" if local else route_address(urlparse(self.engines[0].address)
                                                                               .hostname))
        listen = free_listen_socket(host)
        port = listen.getsockname()[1]
        world = 1 + sum(h.info["tp"] for h in self.engines)
        offset = 1
        for h in self.engines:
            h.send("init_sync", host=host, port=port, rank_offset=offset, world_size=world,
                   timeout_s=self.cfg.request_timeout_s)
            offset += h.info["tp"]
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        join = _Background(SyncGroup, host, port, 0, world, device, self.cfg.request_timeout_s, listen)
        self._wait(self.engines, "joining the weight-sync group", self.cfg.request_timeout_s, background=join)
        self._group = join.result
        self._sender = WeightSender(self._group, self.cfg.sync_bucket_mb << 20)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                       specs: Optional[Sequence[TensorSpec]] = None) -> dict:
        """Broadcast HF-layout weights to every engine; they serve `version` when this returns.

        `specs` (names, shapes, dtypes in iteration order) let the plan be made before the tensors exist, so a
        learner can gather them lazily; without it the tensors are listed first. Floating tensors are sent in the
        engine's dtype. With rollout.sync_checksum, every engine's received bytes are checked bucket by bucket."""
        self._check_usable()
        dtype = self.engine_dtype
        named = cast_for_engine(named_tensors, dtype)
        if specs is None:
            named = list(named)
            specs = [TensorSpec.of(n, t) for n, t in named]
        else:
            wire_dtype = str(dtype).removeprefix("torch.")
            specs = [TensorSpec(s.name, tuple(s.shape), wire_dtype if getattr(torch, s.dtype).is_floating_point
                                else s.dtype) for s in specs]
        self._ensure_group()
        buckets = self._sender.plan(specs)
        wire = [b.to_wire() for b in buckets]
        for h in self.engines:
            h.send("update_weights", buckets=wire, version=version, checksums=self.cfg.sync_checksum)
        t0 = time.perf_counter()
        send = _Background(self._sender.send, buckets, named, self.cfg.sync_checksum)
        replies = self._wait(self.engines, f"loading weights version {version}", self.cfg.request_timeout_s,
                             background=send)
        for h, r in zip(self.engines, replies):
            if r["version"] != version:
                self._failed = f"{h.name} serves version {r['version']} after an update to {version}"
                raise EngineError(self._failed)
            if self.cfg.sync_checksum:
                for worker, sums in enumerate(r["checksums"]):
                    bad = [i for i, (a, b) in enumerate(zip(sums, send.result["checksums"])) if a != b]
                    if bad or len(sums) != len(buckets):
                        self._failed = (f"{h.name} (worker {worker}) received different bytes than the learner sent "
                                        f"(buckets {bad[:5]} of {len(buckets)})")
                        raise EngineError(self._failed)
        self.version = version
        return {"version": version, "buckets": len(buckets), "bytes": send.result["bytes"],
                "seconds": time.perf_counter() - t0, "engine_load_seconds": max(r["seconds"] for r in replies)}

    def sleep(self) -> None:
        """The RL loop's "learner's turn" (a colocated engine frees the GPU): engines in their own processes, on
        their own GPUs, have nothing to give back."""

    # ------------------------------------------------------------------------------------------------- cleanup
    def shutdown(self) -> None:
        """Stop engines this client started (idempotent). Engines given by address are left running."""
        _LIVE.discard(self)
        if self._group is not None:
            self._group.close()
            self._group = None
        for h in self.engines:
            if h.proc is not None and h.alive() and h.sock is not None and not self._failed:
                try:   # a polite stop first: the server replies and exits at once
                    h.send("shutdown")
                    h.proc.wait(5.0)
                except Exception:   # noqa: BLE001 - busy or wedged: killed below
                    pass
            h.kill()
        self.engines = [h for h in self.engines if h.proc is None]

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
