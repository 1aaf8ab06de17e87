"""The trainer's handle on its rollout engines: start or connect, generate, score, update weights, shut down.

Called by the RL loop (`megaapo.train`) and eval as
    with RolloutClient(cfg.rollout, model_path, cfg.model.dtype) as engines:
        rollouts = engines.generate(prompts, SamplingSpec.from_config(cfg.rollout))
        engines.send_weights(source, version=step)       # through megaapo.rollout.transfer.WeightSync
Fan-out is explicit: every call sends one request per engine, then `_wait` collects the replies, watching each
engine's process and a deadline, so a dead or silent engine becomes one `EngineError` naming it and what it was
doing. After any such error the client refuses further calls (engines may hold half a request) and the caller
shuts down.

Weights: this client is the client side of vLLM's weight-transfer protocol over our RPC (vLLM's
`VLLMWeightSyncClient`: `init_weight_transfer_engine`, `start_weight_update`, `update_weights`,
`finish_weight_update`, each fanned out to every engine), and `send_weights` runs vLLM's trainer engine through it
(`megaapo.rollout.transfer.push`) in a watched thread: the trainer's half of a transfer (a broadcast) cannot see an
engine die, the RPC replies can. Engines started here live in their own process group and die with the trainer (atexit, context
manager, and the engine's own parent watch for a trainer that was SIGKILLed).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from megaapo import cpus
from megaapo.rollout.placement import Placement, plan_here
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
    """Runs a blocking transfer (rendezvous, broadcast) while the caller keeps watching the engines."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True, name="megaapo-sync")
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:   # noqa: BLE001 - re-raised in the caller's thread
            self.error = e


def free_listen_socket(host: str) -> socket.socket:
    """A bound, listening TCP socket on an OS-chosen port: the store is created on it directly, so no other process
    can take the port between choosing and binding it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host if host not in ("", "localhost") else "127.0.0.1", 0))
    s.listen()
    return s


def route_address(peer_host: str) -> str:
    """The local address the OS would use to reach `peer_host` (a UDP connect sends no packet)."""
    if peer_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 9))
        return s.getsockname()[0]


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
        self.versions: list[int] = []   # the weight version each engine reported last
        self._failed: Optional[str] = None
        self._transfer = None            # vLLM's trainer engine (rank 0's side of the weight transfer)
        self.pending_version = 0         # what the next finish_weight_update tells the engines to serve
        self.finished: list = []         # the engines' finish_weight_update replies: [(name, reply)]
        self._start_pending = False
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
        self.versions = [info["version"] for info in infos]
        backends = {info["weight_transfer"] for info in infos}
        if len(backends) > 1:
            raise EngineError(f"the engines use different weight-transfer backends {sorted(backends)}: start them "
                              "with the same rollout.sync_backend")
        self._starting = False
        return self

    @property
    def version(self) -> int:
        """The weight version the engines serve (one version: a call that saw several raised instead)."""
        return self.versions[0]

    # ------------------------------------------------------------------------------------------------- start
    def _spawn(self, spec: EngineSpec, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        base_env = apply_engine_env(dict(os.environ))
        compile_cache = Path(default_cache_dir())   # $TMPDIR/torchinductor_$USER, as every other process has it
        compile_cache.mkdir(parents=True, exist_ok=True)
        if self.cfg.engine_cpus:   # CPU runs: the engines' own cores (megaapo.cpus)
            base_env |= cpus.engine_env(cpus.check(self.cfg.engine_cpus, "rollout.engine_cpus"))
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
                # The compile cache stays shared: inductor keeps its precompiled headers under $TMPDIR whatever
                # TORCHINDUCTOR_CACHE_DIR says, and without this link every engine start rebuilt them with the C++
                # compiler for vLLM's compiled sampling op (~7 s of each start on CPU). Removing the directory removes
                # the link, not the cache.
                (tmp_dir / compile_cache.name).symlink_to(compile_cache, target_is_directory=True)
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
              timeout_name: str = "rollout.request_timeout_s") -> list:
        """Collect one reply from each handle, or raise the first failure (and mark the client unusable)."""
        import zmq

        poller = zmq.Poller()
        for h in handles:
            poller.register(h.sock, zmq.POLLIN)
        results: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) < len(handles):
                if self._failed:   # another thread's call failed (a transfer's RPC runs beside its broadcast)
                    raise EngineError(self._failed)
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
                if time.monotonic() > deadline:
                    late = [h.name for h in handles if h.index not in results]
                    raise EngineError(f"{late[0]} did not answer within {timeout:g} s while {what} "
                                      f"({timeout_name})")
        except BaseException as e:
            self._failed = self._failed or str(e)
            raise
        return [results[h.index] for h in handles]

    def _spread(self, n: int) -> list[tuple[EngineHandle, int, int]]:
        """Contiguous, near-equal slices of n prompts, one per engine (an engine with nothing to do is skipped)."""
        k = len(self.engines)
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [(h, bounds[i], bounds[i + 1]) for i, h in enumerate(self.engines) if bounds[i + 1] > bounds[i]]

    def generate(self, prompts: Sequence, sampling: Optional[SamplingSpec] = None, between=None) -> list[Rollout]:
        """n samples for each prompt (a `Prompt`, a (text, images) pair or plain text; images are paths, PIL images
        or encoded bytes), spread over all engines. Returns len(prompts) * n rollouts, prompt-major.

        between: a lock that weight updates hold (partial rollouts). The engines then generate between this call's
        requests, each made holding the lock, so an update can come mid-sequence: it pauses the batch in place and
        the sequences continue on the new weights (each sample's `weight_versions` spans say which tokens came from
        which version)."""
        if between is not None:
            return self._generate_partial(prompts, sampling, between)
        self._check_usable()
        sampling = sampling or SamplingSpec.from_config(self.cfg)
        wire, parts = encode_prompts(prompts), self._spread(len(prompts))
        base = sampling.to_wire()
        for h, lo, hi in parts:
            s = dict(base, seed=None if sampling.seed is None else sampling.seed + lo * sampling.n)
            h.send("generate", prompts=wire[lo:hi], sampling=s)
        replies = self._wait([h for h, _, _ in parts], "generating", self.cfg.request_timeout_s)
        for (h, _, _), r in zip(parts, replies):
            self.versions[h.index] = r["version"]
        versions = {r["version"] for r in replies}
        if len(versions) > 1:
            self._failed = f"engines served weight versions {sorted(versions)} in one batch"
            raise EngineError(self._failed + " (a weight update reached only some engines)")
        return [r for (h, lo, _), reply in zip(parts, replies) for r in to_rollouts(reply, lo, h.index)]

    def _generate_partial(self, prompts: Sequence, sampling: Optional[SamplingSpec], between) -> list[Rollout]:
        self._check_usable()
        sampling = sampling or SamplingSpec.from_config(self.cfg)
        wire, parts = encode_prompts(prompts), self._spread(len(prompts))
        base = sampling.to_wire()
        handles = [h for h, _, _ in parts]
        with between:
            for h, lo, hi in parts:
                h.send("submit", prompts=wire[lo:hi],
                       sampling=dict(base, seed=None if sampling.seed is None else sampling.seed + lo * sampling.n))
            self._wait(handles, "starting a batch", self.cfg.request_timeout_s)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        replies: dict[int, dict] = {}
        while len(replies) < len(handles):
            time.sleep(0.02)
            with between:
                todo = [h for h in handles if h.index not in replies]
                for h in todo:
                    h.send("collect")
                for h, r in zip(todo, self._wait(todo, "generating", self.cfg.request_timeout_s)):
                    if r["done"]:
                        replies[h.index] = r
            if len(replies) < len(handles) and time.monotonic() > deadline:
                late = next(h for h in handles if h.index not in replies)
                self._failed = (f"{late.name} did not finish its batch within {self.cfg.request_timeout_s:g} s "
                                "(rollout.request_timeout_s)")
                raise EngineError(self._failed)
        for h in handles:
            self.versions[h.index] = replies[h.index]["version"]
        return [r for h, lo, _ in parts for r in to_rollouts(replies[h.index], lo, h.index)]

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
        self._check_usable()
        return getattr(torch, self.engines[0].info["dtype"])

    @property
    def transfer_backend(self) -> str:
        """The engines' vLLM weight-transfer backend (gloo, nccl)."""
        self._check_usable()
        return self.engines[0].info["weight_transfer"]

    def send_weights(self, source, version: int) -> dict:
        """Send `source` (a vLLM `WeightSource`: HF names, full tensors) to every engine; they serve `version` when
        this returns. The first call joins the engines to the transfer (vLLM's `trainer_init`)."""
        from megaapo.rollout.transfer import push, trainer_engine

        self._check_usable()
        if self._transfer is None:
            info = self._trainer_init_info()
            self._transfer = self._watched(lambda: trainer_engine(info, self, source), "joining the weight transfer")
        return self._watched(lambda: push(self, self._transfer, source, version, self.cfg.sync_checksum),
                             f"loading weights version {version}")

    def _trainer_init_info(self):
        from megaapo.rollout.transfer import init_info

        if self.placement is not None and self.placement.shared:
            raise EngineError(f"rollout engines share a GPU with the trainer ({self.placement.describe()}), and NCCL "
                              "refuses two ranks of the weight-transfer group on one GPU: give them GPUs of their "
                              "own (fewer trainer processes, rollout.engine_gpus) or use rollout.mode=colocated")
        local = all(h.proc is not None for h in self.engines)
        host = self.cfg.sync_host or ("127.0.0.1" if local else route_address(urlparse(self.engines[0].address)
                                                                               .hostname))
        backend = self.transfer_backend
        if backend == "nccl" and not torch.cuda.is_available():
            raise EngineError("the engines take weights over NCCL (rollout.sync_backend resolved to nccl on their "
                              "machine) but this trainer has no CUDA device: set rollout.sync_backend=gloo for both")
        listen = free_listen_socket(host) if backend == "gloo" else None
        if listen is not None:
            port = listen.getsockname()[1]
        else:   # vLLM's NCCL rendezvous binds the port itself
            with free_listen_socket(host) as s:
                port = s.getsockname()[1]
        return init_info(backend, host=host, port=port, world_size=1 + sum(h.info["tp"] for h in self.engines),
                         bucket_bytes=self.cfg.sync_bucket_mb << 20, listen_socket=listen,
                         # gloo's own timeout outlasts the RPC deadline, which names the engine that went silent
                         timeout_s=self.cfg.request_timeout_s + 30.0)

    def _watched(self, fn, what: str):
        """Run fn in a thread and wait for it, raising at once if an engine call inside it failed (its RPC waits
        record that) or if it outlives the request deadline: a broadcast blocked on a dead peer never returns."""
        work = _Background(fn)
        deadline = time.monotonic() + self.cfg.request_timeout_s + 60.0
        while work.is_alive():
            work.join(0.05)
            if self._failed and work.is_alive():
                raise EngineError(self._failed)
            if time.monotonic() > deadline:
                self._failed = (f"the weight transfer did not finish within {self.cfg.request_timeout_s + 60:g} s "
                                f"while {what} (rollout.request_timeout_s)")
                raise EngineError(self._failed)
        if work.error is not None:
            if isinstance(work.error, EngineError):
                self._failed = self._failed or str(work.error)
                raise work.error
            # The trainer's half failed first (gloo: "connection reset by peer" as an engine dies): give the RPC
            # side a moment to see why, so that the error names the engine.
            end = time.monotonic() + 5.0
            dead = []
            while not self._failed and not dead and time.monotonic() < end:
                time.sleep(0.05)
                dead = [h for h in self.engines if not h.alive()]
            if self._failed:
                raise EngineError(self._failed) from work.error
            err = dead[0].death(what) if dead else EngineError(f"sending weights failed while {what}: "
                                                               f"{type(work.error).__name__}: {work.error}")
            self._failed = str(err)
            raise err from work.error
        return work.result

    # The client side of vLLM's weight-transfer protocol (VLLMWeightSyncClient), one RPC per engine. vLLM's trainer
    # engine calls these from its own threads; each waits with the request deadline and the engines' death watch.
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offset = 0
        for h in self.engines:   # each engine's workers take the next ranks of the group
            h.send("init_weight_transfer", init_info=dict(init_info, rank_offset=init_info["rank_offset"] + offset))
            offset += h.info["tp"]
        self._wait(self.engines, "joining the weight transfer", self.cfg.request_timeout_s)

    def start_weight_update(self) -> None:
        """Travels with the next update_weights request (the engines start, then receive): one round trip fewer,
        which a loaded machine makes worth tens of milliseconds a sync."""
        self._start_pending = True

    def update_weights(self, update_info) -> None:
        start, self._start_pending = self._start_pending, False
        for h in self.engines:
            h.send("update_weights", update_info=update_info, start=start, checksums=self.cfg.sync_checksum)
        self._wait(self.engines, f"loading weights version {self.pending_version}", self.cfg.request_timeout_s)

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        version = int(weight_version) if weight_version is not None else self.pending_version
        for h in self.engines:
            h.send("finish_weight_update", version=version)
        replies = self._wait(self.engines, f"finishing weight update {version}", self.cfg.request_timeout_s)
        self.finished = [(h.name, r) for h, r in zip(self.engines, replies)]
        self.versions = [r["version"] for r in replies]

    def shutdown_weight_transfer_engine(self) -> None:
        for h in self.engines:
            h.send("shutdown_weight_transfer")
        self._wait(self.engines, "leaving the weight transfer", self.cfg.request_timeout_s)

    def sleep(self) -> None:
        """The RL loop's "learner's turn" (a colocated engine frees the GPU): engines in their own processes, on
        their own GPUs, have nothing to give back."""

    # ------------------------------------------------------------------------------------------------- cleanup
    def shutdown(self) -> None:
        """Stop engines this client started (idempotent). Engines given by address are left running."""
        _LIVE.discard(self)
        if self._transfer is not None and not self._failed:
            # After a failure its group is abandoned, not destroyed: a thread may still be inside a collective.
            self._transfer.shutdown()
        self._transfer = None
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
