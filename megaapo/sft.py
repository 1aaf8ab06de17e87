"""Supervised fine-tuning on the RL learner: `megaapo sft CONFIG` and the RL demo's format warm-up.

    build: distributed groups -> data, learner, (rank 0) a vLLM engine for greedy held-out generation, metrics
    evaluate (held-out loss; greedy accuracy and format validity)
    loop:  next batch of conversations -> one optimizer update on the assistant tokens -> log -> evaluate
           -> checkpoint
    end:   evaluate, export the policy as an HF directory that `megaapo train model.path=...` starts from

A supervised sample is prompt + target tokens; the loss is the summed negative log-prob of the target tokens over
the global batch divided by its target-token count (assistant tokens only: the prompt is never a target). The
log-probs come from the learner's fused log-prob path (the Triton kernel on GPU), so it also serves as the fused
cross-entropy: the [tokens, vocab] logits are never materialised. The target is the row's solution (R1-VL's step
format, or a conversation's assistant turn) or only its answer in the prompt style's format (`sft.target`).

The samples, the step and the held-out loss live in `megaapo.supervised` (the RL demo's format warm-up uses them
too); this module is the entry point and its loop.
"""

from __future__ import annotations

import logging
import sys

from megaapo.supervised import build_samples, sft_step

log = logging.getLogger("megaapo.sft")


def main(cfg) -> int:
    from megaapo.distributed import share
    from megaapo.run import Run

    with Run(cfg, job="sft") as run:
        if run.dry:
            return 0
        state, policy, stream = run.state, run.policy, run.stream
        for step in run.progress(state.step, cfg.trainer.total_steps):
            m = run.metrics
            with m.timer("data"):
                examples = [run.train[i] for i in share(stream.take(cfg.sft.batch_size), run.groups)]
                samples = build_samples(examples, run.builder, run.tokenizer, run.pixels, policy,
                                        target=cfg.sft.target)
            with m.timer("update"):
                metrics = sft_step(policy, samples)
            state.step, state.weight_version = step + 1, policy.version
            row = metrics | run.throughput(samples) | {"sft/sequences": len(samples)}
            if run.end_step(state.step, row):   # evaluate, log, checkpoint; True: a stop signal, saved: exit
                return 0
        run.finish()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`torchrun -m megaapo.sft CONFIG [section.key=value ...]`"""
    from megaapo.config import load_config

    argv = sys.argv[1:] if argv is None else argv
    if not argv or "=" in argv[0]:
        print("usage: python -m megaapo.sft CONFIG [section.key=value ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from megaapo.errors import report_errors

    return report_errors(lambda: main(load_config(argv[0], argv[1:])))


if __name__ == "__main__":
    sys.exit(cli())
