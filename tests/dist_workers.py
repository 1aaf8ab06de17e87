"""Worker functions for multi-process learner tests (spawned processes import them by module name)."""

from __future__ import annotations

from pathlib import Path

import torch


def _learner(hf_path, tp, pp, packing=True, budget=10**9, lr=1e-3, recompute="none"):
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.distributed import init_distributed
    from megaapo.learner import Learner

    groups = init_distributed(tp=tp, pp=pp)
    return Learner(hf_path, groups, ModelConfig(dtype="float32", recompute=recompute),
                   ParallelConfig(tp=tp, pp=pp, sequence_packing=packing, micro_batch_tokens=budget),
                   OptimConfig(lr=lr, schedule="constant", grad_clip=1.0))


def export_worker(rank, world, port, hf_path, tp, pp, out_dir):
    """Load at tp x pp and export straight back to HF (no training)."""
    from megaapo.distributed import destroy, set_rank_env

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    learner = _learner(hf_path, tp, pp)
    learner.export_hf(out_dir)
    destroy()


def train_worker(rank, world, port, hf_path, tp, pp, out_file, recompute="none"):
    """Two training steps on a fixed batch with a policy-gradient loss; the last stage saves the per-step loss
    metrics and the log-probs after training."""
    from megaapo.algos.losses import LossSettings, policy_loss
    from megaapo.config import AlgoConfig
    from megaapo.distributed import destroy, set_rank_env
    from megaapo.parity import parity_batch

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    learner = _learner(hf_path, tp, pp, recompute=recompute)
    batch = parity_batch(hf_path)
    samples = [learner.make_sample(s["input_ids"], s["prompt_len"], s["pixel_values"], s["image_grid_thw"])
               for s in batch] * 2
    old = learner.logprobs(samples)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    settings = LossSettings.from_config(AlgoConfig(), max_new_tokens=16)
    total = sum(s.response_len for s in samples)
    width = max(s.response_len for s in samples)

    def loss_fn(logp, entropy, mask, rows):
        n = logp.shape[1]
        old_rows = torch.stack([torch.nn.functional.pad(old[r], (0, width - len(old[r]))) for r in rows])[:, :n] \
            if old is not None else logp.detach()
        return policy_loss(logp, old_rows, adv[rows], mask, settings, num_tokens=total)

    hist = [learner.train_step(samples, loss_fn).metrics for _ in range(2)]
    after = learner.logprobs(samples)
    if learner.groups.last_stage and learner.groups.tp_rank == 0:
        torch.save({"metrics": hist, "old": old, "after": after}, out_file)
    destroy()


# ------------------------------------------------------------------ fused RL update (tests/test_fused_update.py)
# name: (LossSettings overrides, tis_cap, entropy, sequence packing, micro-batch token budget)
FUSED_CASES = {
    "ppo": (dict(), 0.0, False, True, 10**9),
    "kl_tis_entropy": (dict(kl_coef=0.05, kl_estimator="k3", kl_agg="seq_mean_token_mean", entropy_coef=0.01),
                       2.0, True, True, 60),
    "padded_drgrpo_k2": (dict(loss_agg="seq_sum_norm", loss_agg_norm_len=16, kl_coef=0.1, kl_estimator="k2",
                              clip_eps_high=0.28), 1.5, True, False, 10**9),
    # one on-policy update (no pi_old: the ratio's denominator is the current log-prob), StepGRPO's loss
    "on_policy_stepgrpo": (dict(policy_loss="vanilla", loss_agg="seq_mean_token_mean", kl_coef=0.04),
                           0.0, True, True, 60),
}


def fused_learner(hf_path, tp, packing, budget, pp=1, impl="torch"):
    """fp32 learner (impl: its optimizer, megaapo.optim). Adam's eps is 1e-4, not 1e-8: the first Adam step is lr * g / (|g| + eps), which for |g| near a
    tiny eps is a sign function that blows the fp32 rounding differences of two equal gradients up to ~1e-5 of the
    weights; with this eps the step stays smooth in g, so equal gradients give equal weights."""
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.distributed import init_distributed
    from megaapo.learner import Learner

    return Learner(hf_path, init_distributed(tp=tp, pp=pp), ModelConfig(dtype="float32"),
                   ParallelConfig(tp=tp, pp=pp, sequence_packing=packing, micro_batch_tokens=budget),
                   OptimConfig(impl=impl, lr=1e-3, eps=1e-4, schedule="constant", grad_clip=1.0))


def fused_rl_batch(learner, hf_path):
    """Four samples (two copies of the parity batch), one dropped by `keep`, with per-sequence advantages and DADS
    weights and per-token old / reference / rollout log-probs near the learner's own -> (samples, exp, old, ref)."""
    from types import SimpleNamespace

    from megaapo.parity import parity_batch

    samples = [learner.make_sample(s["input_ids"], s["prompt_len"], s["pixel_values"], s["image_grid_thw"])
               for s in parity_batch(hf_path)] * 2
    base = learner.logprobs(samples, temperature=0.9)   # on the last pipeline stage
    if learner.groups.pp_size > 1:   # every rank builds the same loss
        import torch.distributed as dist
        box = [base]
        dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
        base = box[0]
    g = torch.Generator().manual_seed(0)
    near = lambda scale: [x + scale * torch.randn(x.shape, generator=g) for x in base]  # noqa: E731
    exp = SimpleNamespace(lengths=torch.tensor([len(x) for x in base]), keep=torch.tensor([True, True, False, True]),
                          rollout_logp=near(0.05), advantages=torch.tensor([1.0, -0.5, 0.7, -1.2]),
                          kl_weight=torch.tensor([1.0, 0.4, 1.3, 0.8]))
    return samples, exp, near(0.1), near(0.2)


def fused_vs_unfused(learner, hf_path, case):
    """One update unfused (MEGAAPO_TRITON=0), then the same update from the same weights fused (MEGAAPO_TRITON=1).
    Returns {'ref'|'got': (metrics, weights, grads)} of this rank and the number of fused calls. The gradients are
    megatron's fp32 main_grad buffers under optim.impl=megatron (where the fused kernel writes), else param.grad."""
    import os

    import kernels.fused_policy_loss as fpl
    from megaapo.algos.losses import LossSettings
    from megaapo.train import rl_loss

    over, tis_cap, entropy, _, _ = FUSED_CASES[case]
    samples, exp, old, ref = fused_rl_batch(learner, hf_path)
    settings = LossSettings(**over)
    old = None if case.startswith("on_policy") else old
    loss = rl_loss(exp, list(range(4)), settings, old, ref if settings.kl_coef > 0 else None, tis_cap)
    start = {k: v.detach().clone() for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}
    calls, real = [], fpl.fused_policy_loss
    fpl.fused_policy_loss = lambda *a, **k: calls.append(1) or real(*a, **k)
    out = {}
    try:
        for name, flag in (("ref", "0"), ("got", "1")):
            os.environ["MEGAAPO_TRITON"] = flag
            learner.load_model_tensors(start)
            learner.reset_optimizer_state()
            metrics = learner.train_step(samples, loss, temperature=0.9, entropy=entropy).metrics
            weights = {k: v.detach().clone() for k, v in learner.model.state_dict().items()
                       if not k.endswith("_extra_state")}
            grads = {k: getattr(p, "main_grad", p.grad).clone() for k, p in learner.model.named_parameters()
                     if getattr(p, "main_grad", p.grad) is not None}
            out[name] = (metrics, weights, grads)
            if name == "ref":
                assert not calls, "MEGAAPO_TRITON=0 took the fused path"
    finally:
        fpl.fused_policy_loss = real
        os.environ.pop("MEGAAPO_TRITON", None)
    out["calls"], out["start"] = len(calls), start
    return out


def fused_update_worker(rank, world, port, hf_path, tp, case, out_file, pp=1, impl="torch"):
    """fused_vs_unfused on a TP x PP layout (gloo); each rank saves its own shards' results."""
    from megaapo.distributed import destroy, set_rank_env

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    _, _, _, packing, budget = FUSED_CASES[case]
    learner = fused_learner(hf_path, tp, packing, budget, pp, impl)
    res = fused_vs_unfused(learner, hf_path, case)
    res["last_stage"] = learner.groups.last_stage
    torch.save(res, f"{out_file}.{rank}")
    destroy()


# ------------------------------------------------------------------ optimizers (tests/test_optim.py)
def optim_learner(hf_path, groups, impl, dtype="float32", steps=3, eps=1e-8):
    """A learner whose every optimizer feature is active: cosine schedule with warm-up, weight decay (not on biases
    and norms), clipping below the gradient norm. (eps: see fused_learner.)"""
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.learner import Learner

    return Learner(hf_path, groups, ModelConfig(dtype=dtype),
                   ParallelConfig(tp=groups.tp_size, pp=groups.pp_size, micro_batch_tokens=10**9),
                   OptimConfig(impl=impl, lr=2e-3, min_lr=1e-4, schedule="cosine", warmup_ratio=0.34,
                               weight_decay=0.1, grad_clip=0.05, eps=eps), total_steps=steps)


def optim_batch(learner, hf_path):
    """Four samples and a policy-gradient loss normalised by all their tokens (each data-parallel replica of the
    learner takes its share of the samples itself)."""
    from megaapo.parity import parity_batch

    samples = [learner.make_sample(s["input_ids"], s["prompt_len"], s["pixel_values"], s["image_grid_thw"])
               for s in parity_batch(hf_path)] * 2
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    total = sum(s.response_len for s in samples)

    def loss_fn(logp, entropy, mask, rows):
        loss = -(adv[rows].unsqueeze(1) * logp * mask).sum() / total
        return loss, {"loss": loss.detach()}
    return samples, loss_fn


def _weights(learner):
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}


def optim_worker(rank, world, port, hf_path, tp, pp, impls, dtype, out_file):
    """Three updates per optimizer implementation from the same weights; for megatron also an interrupted run:
    a checkpoint after update 2 (megaapo.dist_checkpoint) -> a fresh learner -> update 3. Each rank saves its
    metrics and weight shards."""
    from megaapo import dist_checkpoint as dckpt
    from megaapo.distributed import destroy, init_distributed, set_rank_env

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    groups = init_distributed(tp=tp, pp=pp)
    out = {}
    for impl in impls:
        learner = optim_learner(hf_path, groups, impl, dtype)
        out["start"] = _weights(learner)
        samples, loss_fn = optim_batch(learner, hf_path)
        out["logp"] = learner.logprobs(samples)
        metrics, root = [], Path(f"{out_file}.{impl}.ckpt")
        for step in range(3):
            metrics.append(learner.train_step(samples, loss_fn).metrics)
            if step == 1:
                saver = dckpt.Checkpointer(root, groups, async_save=False)
                saver.save(2, learner.sharded_state_dict(), {} if rank == 0 else None)
                saver.close()
        out[impl] = {"metrics": metrics, "weights": _weights(learner)}
        if impl == "megatron":
            resumed = optim_learner(hf_path, groups, impl, dtype)
            loaded, _ = dckpt.read(root / "step_000002", resumed.sharded_state_dict(is_loading=True), groups)
            resumed.load_sharded_state_dict(loaded)
            out["resumed"] = {"metrics": [resumed.train_step(samples, loss_fn).metrics],
                              "weights": _weights(resumed)}
    torch.save(out, f"{out_file}.{rank}")
    destroy()


# ------------------------------------------------------------------ non-finite guard (tests/test_optim.py)
def nonfinite_worker(rank, world, port, hf_path, impls, out_file):
    """Data-parallel replicas (DP = world), per optimizer implementation. Faults on the last rank only: a NaN
    gradient (a hook on one weight), then a NaN loss whose gradients are finite; then a clean update; then NaN
    updates until optim.nonfinite=stop ends the run. Each rank saves what it saw."""
    from megaapo.distributed import destroy, init_distributed, set_rank_env

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    groups = init_distributed(tp=1, pp=1)
    torch.save({impl: _nonfinite_updates(hf_path, groups, impl, faulty=rank == world - 1) for impl in impls},
               f"{out_file}.{rank}")
    destroy()


def _nonfinite_updates(hf_path, groups, impl, faulty):
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.learner import Learner
    from megaapo.optim import NonFiniteError

    learner = Learner(hf_path, groups, ModelConfig(dtype="float32"), ParallelConfig(micro_batch_tokens=10**9),
                      OptimConfig(impl=impl, lr=1e-3, schedule="constant", nonfinite="stop", nonfinite_patience=3),
                      total_steps=10)
    samples, loss_fn = optim_batch(learner, hf_path)
    param = dict(learner.model.named_parameters())["lm.decoder.layers.0.mlp.linear_fc1.weight"]

    def nan_loss(*args):
        loss, metrics = loss_fn(*args)
        return (loss + float("nan"), metrics) if faulty else (loss, metrics)   # a constant: gradients stay finite

    out = {"start": _weights(learner), "metrics": [], "weights": []}
    hook = param.register_hook(lambda g: g * float("nan")) if faulty else None
    for fn in (loss_fn, nan_loss, loss_fn):
        out["metrics"].append(learner.train_step(samples, fn).metrics)
        out["weights"].append(_weights(learner))
        if hook is not None:
            hook.remove()
            hook = None
    out["lr_step"], out["version"] = learner.lr_step, learner.version
    out["raised_at"] = None
    for i in range(3):
        try:
            learner.train_step(samples, nan_loss)
        except NonFiniteError as e:
            out["raised_at"], out["error"] = i + 1, str(e)
            break
    return out


# ------------------------------------------------------------------ dist checkpoints (tests/test_dist_checkpoint.py)
def run_state(policy, reference, rng: dict | None = None) -> dict:
    """What a run checkpoints (as megaapo.run does): the policy with its optimizer, the reference model's weights,
    this rank's RNG streams."""
    from megaapo.dist_checkpoint import rng_sharded_object

    return {"policy": policy.sharded_state_dict(is_loading=rng is None),
            "ref": reference.sharded_state_dict(prefix="ref.", optimizer=False),
            "rng": rng_sharded_object(rng)}


def gathered_hf_weights(learner) -> dict:
    """Every stage's full HF tensors, on global rank 0 (collective on all ranks; {} elsewhere): each stage's first
    tensor- and data-parallel rank contributes its own (the tiny test models travel as objects)."""
    import torch.distributed as dist

    g = learner.groups
    mine = {k: v.detach().cpu().clone() for k, v in learner.hf_weights()}   # every TP rank takes part in the gathers
    mine = mine if g.tp_rank == 0 and g.dp_rank == 0 else {}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if parts else {}


def _step_and_weights(learner, samples, loss_fn) -> tuple[dict, dict | None]:
    """One update -> (its metrics as the last stage has them, the full HF weights after it on rank 0)."""
    import torch.distributed as dist

    metrics = [None] * dist.get_world_size()
    dist.all_gather_object(metrics, learner.train_step(samples, loss_fn).metrics)
    metrics = next(m for m in metrics if "loss" in m)
    weights = gathered_hf_weights(learner)
    return metrics, (weights if weights else None)


def dist_ckpt_worker(rank, world, port, hf_path, layouts, role, root, out_file, impls=("megatron", "torch")):
    """role "save" (at layouts[0]): per optimizer, two updates, an async save of step 2 while update 3 already runs
    (the uninterrupted reference), then a fresh learner loads step 2 and makes update 3 again (same layout).
    role "resume": per layout (tp, pp) of these processes and per optimizer, load step 2, save it again (sync) as
    `<impl>-<tp><pp><dp>` for the tests to compare tensor by tensor, then update 3. Rank 0 saves the metrics and
    the full HF weights after update 3, by layout."""
    from megatron.core import parallel_state

    from megaapo.distributed import destroy, init_distributed, set_rank_env

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    out = {}
    for tp, pp in layouts:
        groups = init_distributed(tp=tp, pp=pp)
        out[(tp, pp, groups.dp_size)] = {impl: _dist_ckpt_case(groups, hf_path, impl, role, Path(root))
                                         for impl in impls}
        parallel_state.destroy_model_parallel()   # the same processes take the next layout
    if rank == 0:
        torch.save(out, out_file)
    destroy()


def _dist_ckpt_case(groups, hf_path, impl, role, root: Path) -> dict:
    from megaapo import checkpoint as ckpt
    from megaapo import dist_checkpoint as dckpt
    from megaapo.config import ModelConfig, ParallelConfig
    from megaapo.learner import Learner

    # eps 1e-4 (see fused_learner): layouts sum in different orders, and Adam must not amplify that
    policy = optim_learner(hf_path, groups, impl, eps=1e-4)
    reference = Learner(hf_path, groups, ModelConfig(dtype="float32"),
                        ParallelConfig(tp=groups.tp_size, pp=groups.pp_size, micro_batch_tokens=10**9), None)
    samples, loss_fn = optim_batch(policy, hf_path)
    meta = {"train_state": {"step": 2}, "contents": ["policy", "ref", "rng"]} if torch.distributed.get_rank() == 0 \
        else None
    step2 = root / impl / "step_000002"
    out = {}
    if role == "save":
        for _ in range(2):
            policy.train_step(samples, loss_fn)
        out["step2"] = gathered_hf_weights(policy) or None
        saver = dckpt.Checkpointer(root / impl, groups, async_save=True)
        rng = ckpt.capture_rng()
        out["draw"] = torch.rand(4)   # what the run draws next; a resume at this layout must draw the same
        saver.save(2, run_state(policy, reference, rng), meta, hf_dir=policy.hf_dir)
        out["uninterrupted"] = _step_and_weights(policy, samples, loss_fn)
        out["in_flight_during_update"] = saver.saver.in_flight
        saver.close()
        policy = optim_learner(hf_path, groups, impl, eps=1e-4)
    state = run_state(policy, reference)
    if not dckpt.same_layout(step2, groups):
        del state["rng"]
    loaded, _ = dckpt.read(step2, state, groups)
    policy.load_sharded_state_dict(loaded["policy"])
    reference.load_sharded_state_dict(loaded["ref"], prefix="ref.")
    if "rng" in loaded:
        ckpt.restore_rng(loaded["rng"])
        out["resumed_draw"] = torch.rand(4)
    if role == "resume":
        layout = f"{groups.tp_size}{groups.pp_size}{groups.dp_size}"
        again = dckpt.Checkpointer(root / f"{impl}-{layout}", groups, async_save=False)
        again.save(2, run_state(policy, reference, ckpt.capture_rng()), meta)
        again.close()
    out["resumed"] = _step_and_weights(policy, samples, loss_fn)
    return out


# ------------------------------------------------------------------ weight sync (tests/test_weight_sync.py)
def sync_worker(rank, world, port, hf_path, tp, pp, address, version, out_file):
    """`sync_and_record` on one rank of a tp x pp (x dp: the rest of the world) learner."""
    from megaapo.distributed import destroy, set_rank_env

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    sync_and_record(_learner(hf_path, tp, pp), address, version, out_file)
    destroy()


def sync_and_record(learner, address, version, out_file):
    """The learner sends its weights to the engine at `address` through vLLM's weight-transfer protocol with
    checksums; then every rank iterates the source once more, and rank 0 saves what the sender yields (names in
    order, tensors), the metadata, its held names and the sync's stats."""
    import torch.distributed as dist

    from megaapo.config import RolloutConfig
    from megaapo.rollout import RolloutClient
    from megaapo.rollout.transfer import WeightSync

    rank = dist.get_rank()
    cfg = RolloutConfig(addresses=[address], sync_checksum=True, sync_bucket_mb=1, request_timeout_s=120.0)
    engines = RolloutClient(cfg) if rank == 0 else None
    try:
        sync = WeightSync(learner, engines, cfg)
        stats = sync.send(version)
        sent = [(name, None if t is None else t.clone()) for name, t in sync.source]
        meta = [(m.name, str(m.dtype), m.shape) for m in sync.source.metadata()]
        if rank == 0:
            torch.save({"stats": stats, "sent": sent, "meta": meta, "held": sync.source.held_names()}, out_file)
    finally:
        if engines is not None:
            engines.shutdown()
