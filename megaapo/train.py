"""The RL loop: `megaapo train` and `torchrun -m megaapo.train CONFIG [overrides]`.

    build: distributed groups -> data, policy (+ reference) learner, rollout engines, reward pool, metrics
    (optional supervised format warm-up) -> broadcast weights -> evaluate
    producer: prompts -> rollout G samples per prompt (a colocated engine then sleeps) -> rewards
    consumer: batch -> advantages (+ DADS/STCR) -> pi_old, reference log-probs -> optimizer updates
              -> send weights (between two generate calls) -> log -> evaluate -> checkpoint

rollout.max_staleness = 0 runs the producer in the loop's thread before each step: the synchronous loop. k >= 1
runs it on its own thread (`megaapo.producer`), up to k batches ahead, never from weights more than k syncs old;
pi_old is then the learner's (decoupled PPO: the engine's log-probs are the behaviour policy, weighted per token).

Rank 0 drives the engines and scores rewards; the experience is then shared with every trainer rank, which all run
the learner (tensor/pipeline shards). Metrics, plots and checkpoint metadata belong to the loss-visible rank.
"""

from __future__ import annotations

import logging
import sys

from megaapo.algos.losses import LossSettings
from megaapo.algos.mismatch import mixed_version_share, stale_token_gap
from megaapo.config import load_config
from megaapo.distributed import share
from megaapo.experience import RLLoss, build, reward_inputs, summarize, to_samples

log = logging.getLogger("megaapo.train")


def minibatches(exp, k: int) -> list[list[int]]:
    """Split the batch into k mini-batches of whole groups (GRPO's baseline lives in the group), in order."""
    groups = exp.group.tolist()
    n_groups = max(groups) + 1
    bounds = [round(i * n_groups / k) for i in range(k + 1)]
    return [[i for i, g in enumerate(groups) if bounds[j] <= g < bounds[j + 1]] for j in range(k)
            if bounds[j + 1] > bounds[j]]


def rl_loss(exp, idx, settings, old_logp, ref_logp, tis_cap: float) -> RLLoss:
    """loss_fn for Learner.train_step over the mini-batch `idx` (indices into the rollout batch); on GPU the learner
    takes its fused form (loss gradient made inside the log-prob pass)."""
    return RLLoss(exp, idx, settings, old_logp, ref_logp, tis_cap)


def old_logprobs(cfg, policy, exp, samples):
    """pi_old of the PPO ratio, when the updates need one (several mini-batches, TIS, or batches generated from
    older weights: k >= 1, where decoupled PPO takes the learner's own log-probs as the proximal policy and the
    engine's as the behaviour policy). None: each update takes its own log-probs, detached (one on-policy update, or
    k >= 1 with rollout.proximal=update: no extra forward pass)."""
    r = cfg.rollout
    if r.max_staleness:
        if r.off_policy == "none":
            return exp.rollout_logp
        return policy.logprobs(samples, r.temperature) if r.proximal == "recompute" else None
    if cfg.algo.updates_per_batch == 1 and r.tis_cap <= 0:
        return None   # one on-policy update: pi_old is the current policy (detached)
    if cfg.algo.old_logprob == "rollout":
        return exp.rollout_logp
    return policy.logprobs(samples, r.temperature)


def behaviour_cap(r) -> float:
    """Cap of the per-token weight pi_old / pi_behaviour (0: no weight). k=0: TIS's rollout.tis_cap, as before;
    k >= 1: decoupled PPO's weight (truncated only if rollout.tis_cap is set), truncated IS's (rollout.tis_cap,
    default 2), or none."""
    if not r.max_staleness:
        return r.tis_cap
    return {"decoupled": r.tis_cap or float("inf"), "tis": r.tis_cap or 2.0, "none": 0.0}[r.off_policy]


def off_policy_metrics(r, old, exp, batch, step: int) -> dict:
    """k >= 1: how far the behaviour log-probs (per token, from the weights that made each token) are from the
    learner's pi_old, for tokens of the current weights and of older ones; and the share of samples whose tokens
    span several versions (partial rollouts)."""
    if not r.max_staleness or not batch.token_synced:
        return {}
    behind = [[step - s for s in per] for per in batch.token_synced]
    if old is None or old is exp.rollout_logp:   # no recomputed pi_old to measure the gap against
        return {"async/mixed_version_samples": mixed_version_share(behind)}
    return {f"async/{k}": v for k, v in stale_token_gap(old, exp.rollout_logp, behind).items()}


def update_metrics(updates) -> dict:
    """Loss metrics averaged over the step's updates; the rollout/learner mismatch is the first update's (the
    later ones also measure how far the policy moved)."""
    keys = set().union(*(u.metrics for u in updates))
    out = {k: sum(u.metrics.get(k, 0.0) for u in updates) / len(updates) for k in keys}
    out.update({k: v for k, v in updates[0].metrics.items() if k.startswith("mismatch/")})
    out["updates"] = len(updates)
    out["skipped_updates"] = sum(u.metrics.get("skipped_updates", 0.0) for u in updates)   # NaN/inf guard
    return out


def generate(run, seq: int, idx: list, between=None) -> list:
    """Producer, first half: prompts -> engines (G samples each; a colocated engine then sleeps). `between`: the
    weight updates' lock, for partial rollouts (an update may pause the batch in place and continue it)."""
    # Colocated: wakes what sleeps (weights if no update came, then the KV cache) and generates, then frees the GPU
    # for the learner's turn; engines on their own GPUs keep theirs.
    prompts = [run.builder.build(run.train[i]) for i in idx]
    rollouts = run.engines.generate(prompts, run.sampling(seq), between=between)
    run.engines.sleep()
    return rollouts


def score(run, idx: list, rollouts: list):
    """Producer, second half: responses -> rewards (the reward pool)."""
    return run.scorer.score(reward_inputs(rollouts, [run.train[i] for i in idx], run.cfg.reward))


def main(cfg) -> int:
    from megaapo.run import Run

    with Run(cfg) as run:
        if run.dry:
            return 0
        state, policy = run.state, run.policy
        settings = LossSettings.from_config(cfg.algo, cfg.rollout.max_new_tokens)
        # Rank 0's producer: in this thread at k=0 (the synchronous loop), else k batches ahead on its own thread.
        producer = run.producer(generate, score)
        for step in run.progress(state.step, cfg.trainer.total_steps):
            m = run.metrics
            with m.timer("rollout"):   # k >= 1: only the wait for a batch the producer made while we trained
                dropped = producer.dropped if producer else 0
                batch, waited = producer.next(step) if producer else (None, 0.0)
            batch = share(batch, run.groups)
            examples = [run.train[i] for i in batch.idx]
            samples = to_samples(batch.rollouts, examples, run.pixels, policy)
            exp = build(batch.rollouts, examples, batch.rewards, cfg.algo, cfg.rollout, samples)
            with m.timer("old_logprob"):
                old = old_logprobs(cfg, policy, exp, samples)
            stale = off_policy_metrics(cfg.rollout, old, exp, batch, step)
            with m.timer("ref_logprob"):
                ref = run.reference.logprobs(samples, cfg.rollout.temperature) if run.reference else None
            with m.timer("update"):
                cap = behaviour_cap(cfg.rollout)
                updates = [policy.train_step([samples[i] for i in idx], rl_loss(exp, idx, settings, old, ref, cap),
                                             cfg.rollout.temperature, entropy=True)
                           for idx in minibatches(exp, cfg.algo.updates_per_batch)]
            state.step, state.weight_version = step + 1, policy.version
            with m.timer("weight_sync"), run.between_generations(producer):
                sync = run.weight_sync.send(policy.version)   # colocated: wakes only the engine's weights
            run.weights_sent(producer, batch, policy.version)   # the bound's clock; the checkpoint's data position
            row = summarize(exp) | update_metrics(updates) | run.throughput(exp.samples) | \
                {"reward/timeouts": batch.rewards.timeouts, "sync/seconds": sync.get("seconds", 0.0)} | \
                run.producer_metrics(producer, step, batch, dropped, waited) | stale
            if run.end_step(state.step, row):   # evaluate, log, checkpoint; True: a stop signal, saved: exit
                return 0
        run.finish()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`torchrun -m megaapo.train CONFIG [section.key=value ...]`"""
    argv = sys.argv[1:] if argv is None else argv
    from megaapo.config import DEFAULT_PRESET

    preset = argv[0] if argv and "=" not in argv[0] else DEFAULT_PRESET
    overrides = argv[1:] if argv and "=" not in argv[0] else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from megaapo.errors import report_errors

    return report_errors(lambda: main(load_config(preset, overrides)))


if __name__ == "__main__":
    sys.exit(cli())
