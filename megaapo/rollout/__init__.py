"""Rollout: vLLM engines in their own processes, the trainer's client for them, and weight sync on vLLM's
weight-transfer protocol.

    from megaapo.rollout import RolloutClient, SamplingSpec
    with RolloutClient(cfg.rollout, model_path, cfg.model.dtype) as engines:
        rollouts = engines.generate(prompts, SamplingSpec.from_config(cfg.rollout))
        engines.send_weights(TensorSource(named_hf_tensors), version=step)   # megaapo.rollout.source
    # a learner on several ranks: megaapo.rollout.transfer.WeightSync(policy, engines, cfg.rollout).send(version)

Importing this package does not import vLLM; only the engine processes and the weight transfer
(`megaapo.rollout.{transfer,source,gloo}`) do.
See docs/rollout.md for the design and measured numbers.
"""

from megaapo.rollout.buckets import Bucket, TensorSpec, plan_buckets
from megaapo.rollout.client import RolloutClient
from megaapo.rollout.types import EngineError, EngineSpec, Rollout, SamplingSpec


def make_rollout(cfg, model, dtype: str = "bfloat16", *, wait: bool = True, **kw):
    """The engine(s) `cfg.mode` asks for: `RolloutClient` (disaggregated) or `ColocatedEngine` (GPU only).
    wait=False: engine processes load in the background until the first call or `.ready()`."""
    if cfg.mode == "colocated":
        from megaapo.rollout.colocated import ColocatedEngine

        return ColocatedEngine(cfg, model, dtype, **kw)
    return RolloutClient(cfg, model, dtype, wait=wait, **kw)


__all__ = ["Bucket", "EngineError", "EngineSpec", "Rollout", "RolloutClient", "SamplingSpec", "TensorSpec",
           "make_rollout", "plan_buckets"]
