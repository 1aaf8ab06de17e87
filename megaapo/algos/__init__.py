"""RL math as pure functions: advantages, APO's DADS/STCR, DAPO's filter, policy losses, KL, aggregation.

Nothing here does I/O or distributed calls; everything is chosen by a string in `AlgoConfig` through the
registries re-exported below.
"""

from megaapo.algos import apo
from megaapo.algos.advantages import ADVANTAGES, compute_advantages, group_stats
from megaapo.algos.apo import apo_shaping, dads_weight, stcr_multiplier
from megaapo.algos.dapo import dynamic_sampling_keep, overlong_penalty
from megaapo.algos.losses import (AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, LossSettings, aggregate, policy_loss,
                                  stepgrpo_objective)

__all__ = ["ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "LossSettings", "aggregate", "apo",
           "apo_shaping", "compute_advantages", "dads_weight", "dynamic_sampling_keep", "group_stats",
           "overlong_penalty", "policy_loss", "stcr_multiplier", "stepgrpo_objective"]
