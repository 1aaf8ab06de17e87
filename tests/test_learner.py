"""The megatron-core learner against transformers: parity at every TP x PP layout on gloo, packing, training,
checkpoint conversion round trips, and the errors of bad checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import tests/dist_workers.py by name

TOL = 1e-4


@pytest.fixture(scope="module")
def real_vocab_model(tmp_path_factory):
    from megaapo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("real") / "model", vocab="real")


def test_mrope_positions_match_transformers(tiny_model):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megaapo.models.qwen2_5_vl.rope import mrope_positions
    from megaapo.parity import parity_batch

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    for s in parity_batch(tiny_model):
        ref, _ = hf.model.get_rope_index(s["input_ids"][None], s["mm_token_type_ids"][None], s["image_grid_thw"])
        got = mrope_positions(s["input_ids"], s["image_grid_thw"], image_token_id=hf.config.image_token_id,
                              spatial_merge_size=2)
        assert torch.equal(got, ref[:, 0])
        assert got[1].max() > got[0][s["input_ids"] == hf.config.image_token_id].max()  # a real 2D grid


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,packed", [(2, 1, False), (1, 2, False), (2, 2, False),
                                          pytest.param(2, 1, True, marks=pytest.mark.slow)])
def test_parity_with_transformers(tiny_model, tp, pp, packed):
    """packed: both samples in one packed row (variable-length attention), forward and gradients vs transformers'
    one sample at a time. (TP=1: packed equals padded, test_packed_gradients_equal_padded; padded equals
    transformers, test_check_parity_cli.)"""
    from megaapo.parity import check

    res = check(tiny_model, tp=tp, pp=pp, packed=packed)
    assert res["n_grads"] == 57
    assert res["logits"] <= TOL and res["logp"] <= TOL, res
    assert res["grads"] <= TOL, res


@pytest.mark.distributed
def test_parity_tied_embeddings_across_stages(tied_model):
    from megaapo.parity import check

    res = check(tied_model, tp=2, pp=2)
    assert res["n_grads"] == 56   # no lm_head: the embedding's gradient sums both uses
    assert max(res["logits"], res["logp"], res["grads"]) <= TOL, res


def test_check_parity_cli(tiny_model, capsys):
    from megaapo.cli import main

    assert main(["check", "parity", "--hf", str(tiny_model), "--tp", "1", "--pp", "1"]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "yes" in out and "NO" not in out
    # A tolerance nothing can meet fails the command.
    assert main(["check", "parity", "--hf", str(tiny_model), "--tol", "0"]) == 1



@pytest.fixture(scope="module")
def learner(tiny_model):
    from megaapo.distributed import destroy
    from dist_workers import _learner

    lr = _learner(tiny_model, 1, 1)
    yield lr
    destroy()


def _samples(learner, model_path, n_copies=1):
    from megaapo.parity import parity_batch

    batch = parity_batch(model_path)
    return [learner.make_sample(s["input_ids"], s["prompt_len"], s["pixel_values"], s["image_grid_thw"])
            for s in batch] * n_copies


def test_packed_and_padded_batches_equal_unbatched(learner, tiny_model):
    from megaapo.data.packing import pack

    samples = _samples(learner, tiny_model, 2)
    par = learner.parallel

    def run(packing, budget, expect_microbatches):
        par.sequence_packing, par.micro_batch_tokens = packing, budget
        assert len(pack(samples, budget, packing)) == expect_microbatches
        return learner.logprobs(samples)

    alone = run(False, 1, 4)                            # one sample per micro-batch
    longest = max(len(s.input_ids) for s in samples)
    for packing, budget, n in [(True, 10**6, 1),        # all four share one row (block-diagonal mask)
                               (True, longest + 1, 4),  # first-fit rows under a tight budget
                               (False, 10**6, 1),       # one right-padded [4, T] batch (different lengths)
                               (False, 2 * longest, 2)]:
        for a, b in zip(alone, run(packing, budget, n)):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5), (packing, budget)


def _grads_of_one_step(learner, samples, packing):
    """param.grad of one update from the current weights (weights and Adam state are put back afterwards)."""
    start = {k: v.detach().clone() for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])[:len(samples)]
    total = sum(s.response_len for s in samples)

    def loss_fn(logp, entropy, mask, rows):
        loss = -(adv[rows].unsqueeze(1) * logp * mask).sum() / total
        return loss, {"loss": loss.detach()}

    par = learner.parallel
    saved = par.sequence_packing, par.micro_batch_tokens
    par.sequence_packing, par.micro_batch_tokens = packing, 10**9
    try:
        res = learner.train_step(samples, loss_fn)
        grads = {k: p.grad.clone() for k, p in learner.model.named_parameters() if p.grad is not None}
    finally:
        par.sequence_packing, par.micro_batch_tokens = saved
        learner.load_model_tensors(start)
        learner.reset_optimizer_state()
    assert res.num_microbatches == 1
    return grads


def test_packed_gradients_equal_padded(learner, tiny_model):
    """One update over four samples (images of two sizes, different lengths) as one packed row and as one
    right-padded [4, S] batch: the same gradient for every parameter, vision tower included."""
    samples = _samples(learner, tiny_model, 2)
    packed, padded = (_grads_of_one_step(learner, samples, p) for p in (True, False))
    assert packed.keys() == padded.keys() and len(packed) == 47   # every parameter
    for k in packed:
        scale = float(padded[k].abs().max())
        assert float((packed[k] - padded[k]).abs().max()) <= 1e-5 * max(scale, 1e-6), k


def test_packed_step_makes_no_tensor_with_two_sequence_dims(learner):
    """Every tensor made during a packed micro-batch's forward and backward (traced with a TorchDispatchMode) has at
    most one dimension that is a sequence length, of the row (T = 161) or of a sample: no [T, T] mask or scores,
    no per-sample [L, L] either (the CPU kernel is fused too). On GPU the attention op is torch's varlen kernel
    instead (tests/test_attention.py traces that one with fake CUDA tensors); every other op is this one."""
    from test_attention import ShapeLog, two_sequence_dims

    lengths = [37, 53, 71]
    g = torch.Generator().manual_seed(0)
    samples = [learner.make_sample(torch.randint(0, 600, (n,), generator=g), n - 9) for n in lengths]
    with ShapeLog() as log:
        grads = _grads_of_one_step(learner, samples, True)
    T = sum(lengths)
    assert grads and any(T in shape for _, shape in log.ops)          # the packed row was traced
    assert any(op.startswith("aten._scaled_dot_product_flash") for op, _ in log.ops)
    assert not two_sequence_dims(log.ops, {T, *lengths})


def test_te_thd_layout_keeps_each_samples_positions(learner, tiny_model):
    """The THD layout Transformer Engine gets (megatron squeezes q/k/v to [t, h, d] and applies the rotary
    embedding per sample through cu_seqlens) gives the unbatched log-probs: each packed sample keeps its own mrope
    positions. Run here with our kernel in TE's place (TE does not install on CPU)."""
    samples = _samples(learner, tiny_model, 2)
    par = learner.parallel
    saved = par.sequence_packing, par.micro_batch_tokens
    try:
        par.sequence_packing, par.micro_batch_tokens = False, 1
        alone = learner.logprobs(samples)
        par.sequence_packing, par.micro_batch_tokens = True, 10**9
        learner.model.attention = "te"   # PackedSeqParams in THD
        thd = learner.logprobs(samples)
    finally:
        learner.model.attention = "sdpa"
        par.sequence_packing, par.micro_batch_tokens = saved
    for a, b in zip(alone, thd):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5)


def test_packed_row_carries_sample_boundaries_and_own_positions(learner, tiny_model):
    """A packed row: cu_seqlens at the sample boundaries, each sample's mrope positions as computed for it alone
    (restarting at 0, image grids included), no mask; a row of one sample is plain causal."""
    from megaapo.data.packing import collate

    samples = _samples(learner, tiny_model)
    mb = collate(samples, [0, 1])
    n0, n1 = (len(s.input_ids) for s in samples)
    assert mb.cu_seqlens.tolist() == [0, n0, n0 + n1] and mb.cu_seqlens.dtype == torch.int32
    assert mb.max_seqlen == max(n0, n1) and mb.input_ids.shape == (1, n0 + n1)
    assert torch.equal(mb.position_ids[:, 0, :n0], samples[0].position_ids)
    assert torch.equal(mb.position_ids[:, 0, n0:], samples[1].position_ids)
    assert int(mb.position_ids[:, 0, n0].max()) == 0
    assert collate(samples, [1]).cu_seqlens is None


def test_metrics_do_not_depend_on_micro_batching(learner, tiny_model):
    """The RL loss reports contributions that the learner sums: one micro-batch or one per sample, the logged
    pg_loss, KL, clip fraction, entropy and rollout mismatch are the same (they were averaged over micro-batches,
    which divided the loss terms by their count)."""
    from dist_workers import fused_rl_batch

    from megaapo.algos.losses import LossSettings
    from megaapo.train import rl_loss

    samples, exp, old, ref = fused_rl_batch(learner, tiny_model)
    loss = rl_loss(exp, list(range(4)), LossSettings(kl_coef=0.05, kl_estimator="k3"), old, ref, 0.0)
    start = {k: v.detach().clone() for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}
    budget, got = learner.parallel.micro_batch_tokens, []
    try:
        for tokens in (10**9, 1):
            learner.parallel.micro_batch_tokens = tokens
            learner.load_model_tensors(start)
            learner.reset_optimizer_state()
            got.append(learner.train_step(samples, loss, temperature=0.9, entropy=True))
    finally:
        learner.parallel.micro_batch_tokens = budget
        learner.load_model_tensors(start)
        learner.reset_optimizer_state()
    assert (got[0].num_microbatches, got[1].num_microbatches) == (1, 4)
    one, many = got[0].metrics, got[1].metrics
    assert {"pg_loss", "kl", "kl_loss", "clip_frac", "entropy", "mismatch/logp_diff_max"} <= set(one)
    for k, v in one.items():
        if k != "lr":
            assert many[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_pack_plan_respects_budget():
    from megaapo.data.packing import plan

    rows = plan([5, 9, 3, 7, 2, 12], token_budget=12)
    assert sorted(i for r in rows for i in r) == list(range(6))
    lengths = [5, 9, 3, 7, 2, 12]
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    assert rows == [[5], [1, 2], [0, 3], [4]]   # first-fit decreasing: 12 | 9+3 | 7+5 | 2
    assert plan([20], token_budget=8) == [[0]]   # longer than the budget: a row of its own
    # Padded: longest first, as many rows as fit with the group's longest length counted for each.
    padded = plan(lengths, token_budget=20, packing=False)
    assert padded == [[5], [1, 3], [0, 2, 4]]
    assert all(len(r) * max(lengths[i] for i in r) <= 20 for r in padded if len(r) > 1)


@pytest.mark.distributed
def test_training_steps_match_across_layouts(tiny_model, tmp_path):
    """Two policy-gradient updates at tp=2 x pp=2 give the single-process run's losses, gradient norms and new
    log-probs, and move log-probs the way the advantages say."""
    from megaapo.distributed import spawn

    from dist_workers import train_worker

    runs = {}
    for tp, pp in [(1, 1), (2, 2)]:
        spawn(train_worker, tp * pp, str(tiny_model), tp, pp, str(tmp_path / f"{tp}x{pp}.pt"))
        runs[tp, pp] = torch.load(tmp_path / f"{tp}x{pp}.pt")
    ref, got = runs[1, 1], runs[2, 2]
    for a, b in zip(got["after"], ref["after"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-4)
    for m, r in zip(got["metrics"], ref["metrics"]):
        assert abs(m["pg_loss"] - r["pg_loss"]) <= 1e-5
        assert abs(m["grad_norm"] - r["grad_norm"]) <= 1e-4 * r["grad_norm"]
    # Positive advantage (rows 0, 2) raises the response's log-prob; negative (1, 3) lowers it.
    delta = [float((a - o).sum()) for a, o in zip(ref["after"], ref["old"])]
    assert delta[0] > 0 and delta[2] > 0 and delta[1] < 0 and delta[3] < 0


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_activation_recompute_trains_the_same(tiny_model, tmp_path, tp, pp):
    """Full and selective activation recompute change memory, not maths: the same two updates (losses, gradient
    norms, log-probs after training) as without recompute."""
    from megaapo.distributed import spawn

    from dist_workers import train_worker

    runs = {}
    for mode in ("none", "full", "selective"):
        spawn(train_worker, tp * pp, str(tiny_model), tp, pp, str(tmp_path / f"{mode}.pt"), mode)
        runs[mode] = torch.load(tmp_path / f"{mode}.pt")
    for mode in ("full", "selective"):
        for a, b in zip(runs[mode]["after"], runs["none"]["after"]):
            assert torch.allclose(a, b, rtol=0, atol=1e-5), mode
        for m, r in zip(runs[mode]["metrics"], runs["none"]["metrics"]):
            assert abs(m["grad_norm"] - r["grad_norm"]) <= 1e-5 * r["grad_norm"], mode


@pytest.mark.distributed
def test_export_from_tp2_pp2_is_bit_exact(tiny_model, tmp_path):
    from megaapo.distributed import spawn
    from megaapo.models.qwen2_5_vl.weights import HFReader

    from dist_workers import export_worker

    spawn(export_worker, 4, str(tiny_model), 2, 2, str(tmp_path / "out"))
    src, out = HFReader(tiny_model), HFReader(tmp_path / "out")
    assert src.keys() == out.keys()
    assert all(torch.equal(src.get(k), out.get(k)) for k in src.keys())
    from transformers import Qwen2_5_VLForConditionalGeneration
    Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out")   # loadable by transformers


@pytest.mark.parametrize("which,tp,pp", [("real", 2, 2), ("tied", 2, 1), ("tied", 1, 2)])
def test_convert_round_trip_is_bit_exact(which, tp, pp, real_vocab_model, tied_model, tmp_path):
    from megaapo.cli import main

    src = real_vocab_model if which == "real" else tied_model
    assert main(["convert", "hf-to-mcore", str(src), str(tmp_path / "mc"), "--tp", str(tp), "--pp", str(pp)]) == 0
    assert main(["convert", "mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "back")]) == 0
    a, b = load_file(f"{src}/model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if which == "real":
        assert a["model.embed_tokens.weight"].shape[0] == 151936


def test_learner_loads_converted_checkpoint(learner, tiny_model, tmp_path):
    """A tp=1 x pp=1 mcore directory loads into the learner with the same keys as the model's state dict."""
    from megaapo.convert import hf_to_mcore, load_mcore_into

    hf_to_mcore(tiny_model, tmp_path / "mc", 1, 1, progress=False)
    before = {k: v.clone() for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}
    with torch.no_grad():
        for p in learner.model.parameters():
            p.zero_()
    load_mcore_into(learner.model, tmp_path / "mc", 1, 0, 1, 0)
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_not_qwen2_5_vl_is_refused(tiny_model, tmp_path):
    from megaapo.cli import main

    bad = _copy(tiny_model, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llava"
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="qwen2_5_vl|llava"):
        from megaapo.models.qwen2_5_vl.config import load_hf_config
        load_hf_config(bad)
    assert main(["convert", "hf-to-mcore", str(bad), str(tmp_path / "mc")]) == 2


def test_missing_tensor_is_named(tiny_model, tmp_path, capsys):
    from megaapo.cli import main

    bad = _copy(tiny_model, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    assert main(["convert", "hf-to-mcore", str(bad), str(tmp_path / "mc")]) == 2
    assert "model.layers.1.self_attn.k_proj.weight" in capsys.readouterr().err


def test_missing_tensor_leaves_learner_unbuilt(learner, tiny_model, tmp_path):
    """load_into reads every shard before writing any: the model keeps its weights when a tensor is missing."""
    from megaapo.models.qwen2_5_vl.config import CheckpointError
    from megaapo.models.qwen2_5_vl.weights import HFReader, load_into

    bad = _copy(tiny_model, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, bad / "model.safetensors")
    before = learner.model.lm.embedding.word_embeddings.weight.clone()
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_into(learner.model, HFReader(bad), learner.shape, 1, 0)
    assert torch.equal(before, learner.model.lm.embedding.word_embeddings.weight)


@pytest.mark.parametrize("tp,pp,setting", [(4, 1, "num_key_value_heads=2"), (1, 3, "num_hidden_layers=2"),
                                           (3, 1, "parallel.tp=3")])
def test_layout_that_does_not_divide_is_refused(tiny_model, tmp_path, capsys, tp, pp, setting):
    from megaapo.cli import main

    assert main(["convert", "hf-to-mcore", str(tiny_model), str(tmp_path / "mc"), "--tp", str(tp),
                 "--pp", str(pp)]) == 2
    err = capsys.readouterr().err
    assert setting in err
    assert not (tmp_path / "mc").exists()


def test_mcore_checkpoint_missing_shard(tiny_model, tmp_path, capsys):
    from megaapo.cli import main

    assert main(["convert", "hf-to-mcore", str(tiny_model), str(tmp_path / "mc"), "--tp", "2"]) == 0
    (tmp_path / "mc" / "tp01_pp000" / "model.safetensors").unlink()
    assert main(["convert", "mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "back")]) == 2
    assert "tp01_pp000" in capsys.readouterr().err


def test_shared_prompt_positions_equal_computed_ones(learner, tiny_model):
    """A group's samples reuse their prompt's mrope positions: the same positions as computing them afresh."""
    from megaapo.parity import parity_batch

    for s in parity_batch(tiny_model):
        full = learner.make_sample(s["input_ids"], s["prompt_len"], s["pixel_values"], s["image_grid_thw"])
        reused = learner.make_sample(s["input_ids"], s["prompt_len"], s["pixel_values"], s["image_grid_thw"],
                                     prompt_positions=full.position_ids[:, :s["prompt_len"]].clone())
        assert torch.equal(full.position_ids, reused.position_ids)


def test_image_pad_sampled_in_a_response_is_a_token(learner, tiny_model):
    """A policy may sample <|image_pad|>: in a response it is an ordinary token (text position, no features),
    as vLLM treats it, instead of a crash over image tokens vs features."""
    from megaapo.parity import parity_batch

    s = parity_batch(tiny_model)[0]
    ids = s["input_ids"].clone()
    ids[-2] = learner.shape.image_token_id
    sample = learner.make_sample(ids, s["prompt_len"], s["pixel_values"], s["image_grid_thw"])
    assert sample.position_ids[0, -2] == sample.position_ids[0, -3] + 1   # text position
    lp = learner.logprobs([sample])[0]
    assert lp.shape == (len(ids) - s["prompt_len"],) and torch.isfinite(lp).all()


def test_image_tokens_without_features_are_refused(learner, tiny_model):
    from megaapo.parity import parity_batch

    s = parity_batch(tiny_model)[0]
    # Prompt image tokens but no pixels: a clear error, not a shape crash deep inside.
    with pytest.raises(ValueError, match="image_grid_thw|pixel_values"):
        learner.logprobs([learner.make_sample(s["input_ids"], s["prompt_len"])])
