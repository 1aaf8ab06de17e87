"""The RL loop: `megaapo train` and `torchrun -m megaapo.train CONFIG [overrides]`.

    build: distributed groups -> data, policy (+ reference) learner, rollout engines, reward pool, metrics
    (optional supervised format warm-up) -> broadcast weights -> evaluate
    loop:  rollout G samples per prompt (a colocated engine then sleeps) -> rewards -> advantages (+ DADS/STCR)
           -> reference log-probs -> k optimizer updates -> broadcast weights -> log -> evaluate -> checkpoint

Rank 0 drives the engines and scores rewards; the experience is then shared with every trainer rank, which all run
the learner (tensor/pipeline shards). Metrics, plots and checkpoint metadata belong to the loss-visible rank.
"""

from __future__ import annotations

import logging
import sys

from megaapo.algos.losses import LossSettings
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
    """pi_old of the PPO ratio, when the updates need one (several mini-batches, or TIS)."""
    if cfg.algo.updates_per_batch == 1 and cfg.rollout.tis_cap <= 0:
        return None   # one on-policy update: pi_old is the current policy (detached)
    if cfg.algo.old_logprob == "rollout":
        return exp.rollout_logp
    return policy.logprobs(samples, cfg.rollout.temperature)


def update_metrics(updates) -> dict:
    """Loss metrics averaged over the step's updates; the rollout/learner mismatch is the first update's (the
    later ones also measure how far the policy moved)."""
    keys = set().union(*(u.metrics for u in updates))
    out = {k: sum(u.metrics.get(k, 0.0) for u in updates) / len(updates) for k in keys}
    out.update({k: v for k, v in updates[0].metrics.items() if k.startswith("mismatch/")})
    out["updates"] = len(updates)
    out["skipped_updates"] = sum(u.metrics.get("skipped_updates", 0.0) for u in updates)   # NaN/inf guard
    return out


def main(cfg) -> int:
    from megaapo.run import Run

    with Run(cfg) as run:
        if run.dry:
            return 0
        state = run.state
        policy, engines, stream = run.policy, run.engines, run.stream
        settings = LossSettings.from_config(cfg.algo, cfg.rollout.max_new_tokens)
        for step in run.progress(state.step, cfg.trainer.total_steps):
            m = run.metrics
            with m.timer("rollout"):
                idx = share(stream.take(cfg.rollout.prompts_per_step), run.groups)
                examples = [run.train[i] for i in idx]
                rollouts = None
                if engines:
                    # Colocated: wakes what sleeps (weights if no update came, then the KV cache) and generates,
                    # then frees the GPU for the learner's turn; engines on their own GPUs keep theirs.
                    rollouts = engines.generate([run.builder.build(e) for e in examples], run.sampling(step))
                    engines.sleep()
            with m.timer("reward"):
                rewards = run.scorer.score(reward_inputs(rollouts, examples, cfg.reward)) if engines else None
            rollouts, rewards = share((rollouts, rewards), run.groups)
            samples = to_samples(rollouts, examples, run.pixels, policy)
            exp = build(rollouts, examples, rewards, cfg.algo, cfg.rollout, samples)
            with m.timer("old_logprob"):
                old = old_logprobs(cfg, policy, exp, samples)
            with m.timer("ref_logprob"):
                ref = run.reference.logprobs(samples, cfg.rollout.temperature) if run.reference else None
            with m.timer("update"):
                updates = [policy.train_step([samples[i] for i in idx],
                                             rl_loss(exp, idx, settings, old, ref, cfg.rollout.tis_cap),
                                             cfg.rollout.temperature, entropy=True)
                           for idx in minibatches(exp, cfg.algo.updates_per_batch)]
            state.step, state.weight_version = step + 1, policy.version
            with m.timer("weight_sync"):   # colocated: wakes only the engine's weights to load them
                sync = run.weight_sync.send(policy.version)
            row = summarize(exp) | update_metrics(updates) | run.throughput(exp.samples) | \
                {"reward/timeouts": rewards.timeouts, "sync/seconds": sync.get("seconds", 0.0)}
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
    from megaapo.cli import report_errors

    return report_errors(lambda: main(load_config(preset, overrides)))


if __name__ == "__main__":
    sys.exit(cli())
