"""The engine process: one vLLM engine behind a small ZMQ request/reply RPC (msgpack messages, no tensors).

Started by `RolloutClient` for a local run, or by a cluster launcher on a rollout node:
    python -m megaapo.rollout.server --bind tcp://0.0.0.0:5555 --config demo [rollout.max_model_len=2048 ...]
and then listed in the trainer's `rollout.addresses`. The model path and dtype come from the run config's
`model` section (or --model / --dtype).

Messages: {"op": name, "args": {...}} -> {"ok": true, "result": ...} | {"ok": false, "error": "..."}.
ops: health, generate, score; the four phases of vLLM's weight-transfer protocol (init_weight_transfer,
start_weight_update, update_weights, finish_weight_update) and shutdown_weight_transfer; worker_call (a
`megaapo_*` method of the worker extension on every worker); submit and collect (partial rollouts: the engine
steps a submitted batch between requests, so a weight update can pause it in place); shutdown. One request is
served at a time, which is what keeps weight updates between (never inside) generate calls, and between two engine
steps of a submitted batch.

A failure to start is printed as one `MEGAAPO_ENGINE_ERROR: ...` line before exiting; the client shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import traceback

from megaapo.rollout.types import ERROR_MARKER


_TMP_DIR: str | None = None   # --tmp-dir: this engine's private $TMPDIR, removed however the engine ends


def _remove_tmp_dir() -> None:
    if _TMP_DIR:
        shutil.rmtree(_TMP_DIR, ignore_errors=True)


def _exit(code: int) -> None:
    """End the process without interpreter teardown (vLLM's atexit hooks and threads can stall it)."""
    _remove_tmp_dir()
    os._exit(code)


def _fail(msg: str, code: int = 1) -> None:
    print(ERROR_MARKER + msg.replace("\n", " | "), file=sys.stderr, flush=True)
    _remove_tmp_dir()
    sys.exit(code)


def _describe(e: BaseException) -> str:
    text = str(e).strip() or repr(e)
    return f"{type(e).__name__}: {text}"


def _watch_parent(parent_pid: int) -> None:
    """Exit when the trainer that started us is gone (even if it was SIGKILLed and ran no cleanup), so no engine
    outlives its run. The child-side check needs no help from the parent."""
    def loop():
        while True:
            if os.getppid() != parent_pid:
                _exit(3)
            time.sleep(1.0)
    threading.Thread(target=loop, name="megaapo-parent-watch", daemon=True).start()


def _spec_from_args(args):
    from megaapo.rollout.types import EngineSpec

    if args.spec_json:
        return EngineSpec(**json.loads(args.spec_json))
    from megaapo.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        _fail(f"bad config: {e}", 2)
    model = args.model or cfg.model.path
    if not model:
        _fail("no model: pass --model PATH or set model.path in the config", 2)
    return EngineSpec.from_config(cfg.rollout, model, args.dtype or cfg.model.dtype,
                                  min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)


def _bind(address: str):
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if address.endswith(":0"):
            sock.bind_to_random_port(address.rsplit(":", 1)[0])
        else:
            sock.bind(address)
    except zmq.ZMQError as e:
        _fail(f"cannot listen on {address}: {e} (is another engine or program using this port?)", 2)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _update(engine, a: dict):
    """update_weights, after start_weight_update when the client sent the two together (`start`)."""
    if a.get("start"):
        engine.start_weight_update(a.get("checksums", False))
    return engine.update_weights(a["update_info"])


def serve(sock, engine) -> None:
    import msgspec

    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    handlers = {
        "health": lambda a: engine.health(),
        "generate": lambda a: engine.generate(a["prompts"], a["sampling"]),
        "submit": lambda a: engine.submit(a["prompts"], a["sampling"]),
        "collect": lambda a: engine.collect(),
        "score": lambda a: engine.score(a["prompts"], a["continuations"]),
        "init_weight_transfer": lambda a: engine.init_weight_transfer(a["init_info"]),
        "start_weight_update": lambda a: engine.start_weight_update(a.get("checksums", False)),
        "update_weights": lambda a: _update(engine, a),
        "finish_weight_update": lambda a: engine.finish_weight_update(a["version"]),
        "shutdown_weight_transfer": lambda a: engine.shutdown_weight_transfer(),
        "worker_call": lambda a: engine.worker_call(a["method"], a.get("args", [])),
    }
    while True:
        # Partial rollouts: between requests the engine steps its batch in flight; a request (a weight update's
        # phases, a collect) is served between two engine steps.
        if engine.generating() and not sock.poll(0):
            try:
                engine.advance()
            except Exception as e:   # the next collect reports it
                traceback.print_exc()
                engine.fail(_describe(e))
            continue
        msg = dec.decode(sock.recv())
        op = msg.get("op")
        if op == "shutdown":
            sock.send(enc.encode({"ok": True, "result": None}))
            return
        try:
            if op not in handlers:
                raise ValueError(f"unknown op {op!r}; known: {', '.join(handlers)}, shutdown")
            reply = {"ok": True, "result": handlers[op](msg.get("args") or {})}
            dead = False
        except Exception as e:   # reported to the caller; the engine keeps serving unless vLLM itself died
            traceback.print_exc()
            reply = {"ok": False, "error": _describe(e)}
            dead = type(e).__name__ == "EngineDeadError"
        sock.send(enc.encode(reply))
        if dead:
            _fail(f"vLLM engine died: {reply['error']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megaapo.rollout.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZMQ address to listen on (port 0: any free)")
    p.add_argument("--config", default=None, help="run config preset or YAML (its rollout/model/data sections)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.max_model_len=2048")
    p.add_argument("--spec-json", default=None, help=argparse.SUPPRESS)      # set by RolloutClient
    p.add_argument("--endpoint-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tmp-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global _TMP_DIR
    _TMP_DIR = args.tmp_dir

    from megaapo.rollout.types import apply_engine_env

    apply_engine_env()    # before anything imports vllm
    from megaapo.cpus import confine_engine

    confine_engine()      # a core list in VLLM_CPU_OMP_THREADS_BIND (rollout.engine_cpus) holds the whole process
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    spec = _spec_from_args(args)
    sock, endpoint = _bind(args.bind)
    if args.endpoint_file:
        tmp = args.endpoint_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(endpoint)
        os.replace(tmp, args.endpoint_file)
    print(f"megaapo engine listening on {endpoint}", file=sys.stderr, flush=True)

    from megaapo.rollout.engine import VllmEngine

    try:
        engine = VllmEngine(spec)
    except BaseException as e:   # noqa: BLE001 - any start failure becomes the one line the client reports
        traceback.print_exc()
        _fail(f"could not start vLLM on {spec.model}: {_describe(e)}")
    print(f"megaapo engine ready in {engine.start_seconds:.1f} s", file=sys.stderr, flush=True)
    serve(sock, engine)
    sys.stdout.flush()
    # vLLM's atexit hooks and worker threads can stall interpreter teardown; the engine holds nothing to flush.
    _exit(0)


if __name__ == "__main__":
    main()
