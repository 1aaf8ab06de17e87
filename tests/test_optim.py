"""The learner's two optimizers (megaapo.optim): megatron-core's DDP + distributed optimizer against torch AdamW.

megatron's optimizer runs here on CPU/gloo through megaapo.distributed.cpu_shim, so these tests execute the same
DDP buffers, reduce-scatter, sharded Adam and gradient clipping that a GPU run uses.
"""

import pytest
import torch

pytestmark = pytest.mark.distributed


def _run(worker, world, *args, tmp_path, name):
    from megaapo.distributed import spawn

    out = tmp_path / name
    spawn(worker, world, *args, str(out))
    return [torch.load(f"{out}.{r}") for r in range(world)]


def _close(a: dict, b: dict, tol: float, what: str):
    for k in a:
        err = float((a[k].double() - b[k].double()).abs().max())
        assert err <= tol, f"{what}: {k} differs by {err:.2e}"


def _metrics_close(got, ref, tol, keys=("lr", "grad_norm", "loss")):
    for m, r in zip(got, ref, strict=True):
        for k in keys:
            assert m[k] == pytest.approx(r[k], rel=tol, abs=1e-7 if k == "loss" else 0), k


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory):
    """Both optimizers in one process (the megatron one with a single data-parallel shard)."""
    from dist_workers import optim_worker

    return _run(optim_worker, 1, str(tiny_model), 1, 1, ("torch", "megatron"), "float32",
                tmp_path=tmp_path_factory.mktemp("optim"), name="single")[0]


def test_schedule_clipping_and_decay_are_active(single):
    """The comparison below means something only if warm-up, cosine decay and clipping all act."""
    m = single["torch"]["metrics"]
    assert [round(x["lr"], 8) for x in m] == [2e-3, 2e-3, 1.05e-3]
    assert all(x["grad_norm"] > 0.05 for x in m)     # clipped every step


def test_megatron_optimizer_equals_torch_in_one_process(single):
    _metrics_close(single["megatron"]["metrics"], single["torch"]["metrics"], 1e-5)
    _close(single["megatron"]["weights"], single["torch"]["weights"], 2e-6, "weights after 3 updates")


@pytest.mark.parametrize("tp,pp,dp,tied", [(1, 1, 2, False), (2, 1, 1, False), (1, 2, 1, True), (2, 1, 2, False)])
def test_megatron_optimizer_across_layouts(tiny_model, tied_model, single, tmp_path, tp, pp, dp, tied):
    """At every layout the megatron path trains like torch AdamW; data-parallel runs (optimizer state sharded over
    DP, gradients reduce-scattered) equal the single process; resuming from a mid-run state is bit-exact."""
    from dist_workers import optim_worker

    model = tied_model if tied else tiny_model
    ranks = _run(optim_worker, tp * pp * dp, str(model), tp, pp, ("torch", "megatron"), "float32",
                 tmp_path=tmp_path, name="run")
    last = [r for r in ranks if "loss" in r["megatron"]["metrics"][0]]
    for r in ranks:
        _close(r["megatron"]["weights"], r["torch"]["weights"], 2e-6, "megatron vs torch")
        _close(r["resumed"]["weights"], r["megatron"]["weights"], 0.0, "resumed vs uninterrupted")
    for r in last:
        _metrics_close(r["megatron"]["metrics"], r["torch"]["metrics"], 1e-5)
        _metrics_close(r["resumed"]["metrics"], r["megatron"]["metrics"][2:], 0.0)
    if tied:
        return
    # the summed metrics of every layout are those of one process holding the whole batch
    for r in last:
        _metrics_close(r["megatron"]["metrics"], single["megatron"]["metrics"], 1e-5)
    if tp == 1:
        # data parallel: each replica scores and trains on half the samples; the log-probs (shared back over DP)
        # and the updates equal one process's
        for a, b in zip(ranks[0]["logp"], single["logp"], strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-6)
        _close(ranks[0]["megatron"]["weights"], single["megatron"]["weights"], 2e-6, "DP=2 vs one process")


def test_megatron_optimizer_bf16(tiny_model, tmp_path):
    """bf16 weights, DP=2: megatron keeps fp32 main weights (sharded) and reduces fp32 gradients; torch keeps fp32
    masters of bf16 gradients. Both make the same updates up to bf16 gradient rounding, and megatron resumes
    bit-exactly."""
    from dist_workers import optim_worker

    ranks = _run(optim_worker, 2, str(tiny_model), 1, 1, ("torch", "megatron"), "bfloat16", tmp_path=tmp_path,
                 name="bf16")
    for r in ranks:
        moved = diff = 0.0
        for k, a in r["megatron"]["weights"].items():
            b, start = r["torch"]["weights"][k].float(), r["start"][k].float()
            moved += float((b - start).abs().sum())
            diff += float((a.float() - b).abs().sum())
        assert r["megatron"]["weights"]["lm.decoder.layers.0.mlp.linear_fc1.weight"].dtype == torch.bfloat16
        assert moved > 0 and diff < 0.01 * moved, (diff, moved)
        _close(r["resumed"]["weights"], r["megatron"]["weights"], 0.0, "resumed vs uninterrupted")
    _metrics_close(ranks[0]["megatron"]["metrics"], ranks[0]["torch"]["metrics"], 2e-2)


def test_resume_refuses_other_optimizer(tiny_model):
    from megaapo.optim import _check_impl

    with pytest.raises(ValueError, match="optim.impl=torch"):
        _check_impl({"impl": "torch"}, "megatron")


def test_nonfinite_update_is_skipped_on_every_rank(tiny_model, tmp_path):
    """For both optimizers: a NaN gradient, and separately a NaN loss with finite gradients, on one of two
    data-parallel ranks: neither update touches the weights on either rank (they agree through a reduction;
    megatron through its own found-inf check), both are counted, the schedule does not advance, the next clean
    update applies, and with optim.nonfinite=stop the third skip in a row ends the run on every rank."""
    from dist_workers import nonfinite_worker

    ranks = _run(nonfinite_worker, 2, str(tiny_model), ("torch", "megatron"), tmp_path=tmp_path, name="nan")
    for impl in ("torch", "megatron"):
        for r in (ranks[0][impl], ranks[1][impl]):
            for i in (0, 1):   # the two faulty updates
                assert r["metrics"][i]["skipped_updates"] == 1.0, impl
                _close(r["weights"][i], r["start"], 0.0, f"{impl}: weights after skipped update {i}")
            assert r["metrics"][0]["grad_norm"] != r["metrics"][0]["grad_norm"]   # NaN: reported as it was
            assert r["metrics"][2]["skipped_updates"] == 0.0 and r["metrics"][2]["grad_norm"] > 0
            moved = max(float((r["weights"][2][k] - r["start"][k]).abs().max()) for k in r["start"])
            assert moved > 1e-6, impl
            assert r["lr_step"] == 1 and r["version"] == 1
            assert r["raised_at"] == 3 and "3 updates in a row had a NaN/inf loss or gradient" in r["error"]
        _close(ranks[0][impl]["weights"][2], ranks[1][impl]["weights"][2], 0.0, f"{impl}: replicas")
    _close(ranks[0]["torch"]["weights"][2], ranks[0]["megatron"]["weights"][2], 2e-6, "torch vs megatron")
