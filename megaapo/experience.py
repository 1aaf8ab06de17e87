"""One rollout batch turned into training experience: learner samples, rewards, advantages and APO/DAPO shaping.

Called by train.py between rollout and update (and by eval for scoring). The RL math itself lives in
`megaapo.algos`; this module only lines its inputs up: which response belongs to which prompt and group, how long it
is, whether it is correct, and the per-token tensors the loss reads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from megaapo.algos.advantages import compute_advantages
from megaapo.algos.apo import apo_shaping
from megaapo.algos.dapo import dynamic_sampling_keep, overlong_penalty
from megaapo.algos.losses import policy_loss
from megaapo.algos.mismatch import logprob_mismatch, tis_weight
from megaapo.rewards import RewardInput


class ImagePixels:
    """Images -> (pixel_values, image_grid_thw) with the same processor settings the engines use; LRU-cached, so
    the held-out set is processed once."""

    def __init__(self, model_path, min_pixels: int, max_pixels: int, cache_size: int = 4096):
        from transformers import AutoImageProcessor

        self.proc = AutoImageProcessor.from_pretrained(model_path, min_pixels=min_pixels, max_pixels=max_pixels)
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size

    def __call__(self, paths: list[str]):
        if not paths:
            return None, None
        key = tuple(paths)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        from PIL import Image

        images = []
        for p in paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        out = self.proc(images=images, return_tensors="pt")
        value = (out["pixel_values"], out["image_grid_thw"])
        self.cache[key] = value
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return value


@dataclass
class Experience:
    """B = prompts x n responses, prompt-major. Tensors are [B] unless noted."""
    samples: list                      # megaapo.data.packing.Sample, one per response
    group: torch.Tensor                # long: prompt index within the batch
    rewards: torch.Tensor              # total reward (after the overlong penalty, if any)
    components: dict                   # reward name -> [B]
    correct: torch.Tensor              # bool: accuracy reward == 1
    lengths: torch.Tensor              # response tokens
    rollout_logp: list                 # per response [len] float32: the engine's sampled-token log-probs
    advantages: torch.Tensor = None
    kl_weight: torch.Tensor = None
    adv_multiplier: torch.Tensor = None
    keep: torch.Tensor = None          # bool: responses that train (DAPO's dynamic sampling drops groups)
    truncated: torch.Tensor = None     # bool: finished by length
    stats: dict = field(default_factory=dict)


def reward_inputs(rollouts, examples, reward_cfg) -> list[RewardInput]:
    out = []
    for r in rollouts:
        ex = examples[r.group]
        # MathVerse keeps its choices inside the question text; its converter parses them into meta["choices"].
        out.append(RewardInput(response=r.text, answer=ex.answer, key_steps=ex.key_steps, alpha=reward_cfg.step_alpha,
                               faithful_to=reward_cfg.faithful_to, solution=ex.solution,
                               choices=ex.choices or ex.meta.get("choices"),
                               unit=ex.meta.get("unit") or "", precision=ex.meta.get("precision")))
    return out


def to_samples(rollouts, examples, pixels: ImagePixels, learner) -> list:
    """Learner samples from the engines' own token ids (prompt with expanded image pads + response)."""
    per_prompt = {}
    out = []
    for r in rollouts:
        if r.group not in per_prompt:
            per_prompt[r.group] = [*pixels(examples[r.group].images), None]
        pix, grid, prompt_pos = per_prompt[r.group]
        n = len(r.prompt_token_ids)
        ids = torch.tensor(list(r.prompt_token_ids) + list(r.token_ids), dtype=torch.long)
        out.append(learner.make_sample(ids, n, pix, grid, prompt_positions=prompt_pos))
        per_prompt[r.group][2] = out[-1].position_ids[:, :n]   # the group's other samples reuse the prompt's
    return out


def build(rollouts, examples, rewards, algo, rollout_cfg, samples) -> Experience:
    """Rewards -> advantages with the algorithm's shaping. `rewards` is a RewardBatch in rollout order."""
    group = torch.tensor([r.group for r in rollouts], dtype=torch.long)
    lengths = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.float32)
    total = torch.tensor(rewards.total, dtype=torch.float32)
    components = {k: torch.tensor(v, dtype=torch.float32) for k, v in rewards.components.items()}
    correct = components["accuracy"] >= 1.0 if "accuracy" in components else total > 0
    truncated = torch.tensor([r.finish_reason == "length" for r in rollouts])
    if algo.overlong.enable:
        total = total + overlong_penalty(lengths, rollout_cfg.max_new_tokens, algo.overlong.buffer_tokens,
                                         algo.overlong.penalty)
    exp = Experience(samples=samples, group=group, rewards=total, components=components, correct=correct,
                     lengths=lengths, truncated=truncated,
                     rollout_logp=[torch.tensor(r.logprobs, dtype=torch.float32) for r in rollouts])
    exp.advantages = compute_advantages(algo.advantage, total, group, algo.adv_eps, algo.std_unbiased)
    ones = torch.ones_like(total)
    exp.kl_weight, exp.adv_multiplier = ones, ones
    if algo.dads or algo.stcr:
        shaping = apo_shaping(correct, lengths, exp.advantages, group, dads=algo.dads, stcr=algo.stcr,
                              stcr_base=algo.stcr_base, faithful_to=algo.faithful_to)
        exp.kl_weight, exp.adv_multiplier = shaping.kl_weight, shaping.adv_multiplier
        exp.advantages = exp.advantages * shaping.adv_multiplier
        exp.stats["apo/dads_weight"] = float(shaping.kl_weight[shaping.positive].mean()) \
            if shaping.positive.any() else 1.0
        amplified = shaping.adv_multiplier > 1
        exp.stats["apo/stcr_multiplier"] = float(shaping.adv_multiplier[amplified].mean()) if amplified.any() else 1.0
        exp.stats["apo/stcr_fraction"] = float(amplified.float().mean())
    exp.keep = dynamic_sampling_keep(total, group) if algo.dynamic_sampling else torch.ones_like(correct)
    return exp


def summarize(exp: Experience) -> dict:
    """Rollout-side metrics of one batch (reward, accuracy, lengths, informative groups)."""
    m = {"reward/total": float(exp.rewards.mean()), "train/accuracy": float(exp.correct.float().mean()),
         "len/mean": float(exp.lengths.mean()), "len/max": float(exp.lengths.max()),
         "len/truncated": float(exp.truncated.float().mean())}
    for k, v in exp.components.items():
        m[f"reward/{k}"] = float(v.mean())
    if exp.correct.any():
        m["len/correct"] = float(exp.lengths[exp.correct].mean())
    if (~exp.correct).any():
        m["len/wrong"] = float(exp.lengths[~exp.correct].mean())
    n_groups = int(exp.group.max()) + 1
    spread = torch.zeros(n_groups).index_reduce_(0, exp.group, exp.rewards, "amax", include_self=False) - \
        torch.zeros(n_groups).index_reduce_(0, exp.group, exp.rewards, "amin", include_self=False)
    m["train/informative_groups"] = float((spread > 0).float().mean())
    m["train/kept"] = float(exp.keep.float().mean())
    m.update(exp.stats)
    return m


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Right-pad 1-D tensors with zeros to [len(rows), width]."""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        n = min(width, r.shape[0])
        out[i, :n] = r[:n]
    return out


class RLLoss:
    """The RL loss of one mini-batch `idx` (indices into the rollout batch), for `Learner.train_step`.

    Called as the learner's generic loss_fn(logp [n, R], entropy, mask, rows) on padded response log-probs. It also
    offers the fused form (`kernels.fused_policy_loss`, which makes the loss gradient inside the log-prob pass):
    `fused_inputs` gives the packed per-token constants of a micro-batch and `fused_metrics` turns the fused call's
    metrics and log-probs into the same metrics dict the loss_fn returns. Both forms divide by the mini-batch's
    token and sequence counts (`num_tokens`, `num_seqs`), so micro-batch gradients simply add up; the metrics are
    contributions in the same sense (the learner sums them): the loss terms already are, and per-token means
    (clip fraction, KL, the rollout mismatch) are weighted by the micro-batch's share of the mini-batch's tokens.
    """

    def __init__(self, exp, idx, settings, old_logp, ref_logp, tis_cap: float):
        self.exp, self.idx, self.settings = exp, idx, settings
        self.old_logp, self.ref_logp, self.tis_cap = old_logp, ref_logp, tis_cap
        self.num_tokens = max(float(sum(exp.lengths[i] for i in idx if exp.keep[i])), 1.0)
        self.num_seqs = max(float(sum(bool(exp.keep[i]) for i in idx)), 1.0)

    def __call__(self, logp, entropy, mask, rows):
        exp = self.exp
        rows = [self.idx[r] for r in rows]
        width, dev = logp.shape[1], logp.device
        mask = mask & exp.keep[rows].unsqueeze(-1).to(dev)
        rollout = padded([exp.rollout_logp[r] for r in rows], width).to(dev)
        old = padded([self.old_logp[r] for r in rows], width).to(dev) if self.old_logp is not None \
            else logp.detach()
        ref = padded([self.ref_logp[r] for r in rows], width).to(dev) if self.ref_logp is not None else None
        tis = tis_weight(old, rollout, self.tis_cap) if self.tis_cap > 0 else None
        loss, metrics = policy_loss(logp, old, exp.advantages[rows].to(dev), mask, self.settings, logp_ref=ref,
                                    kl_weight=exp.kl_weight[rows].to(dev), tis_weight=tis, entropy=entropy,
                                    num_tokens=self.num_tokens, num_seqs=self.num_seqs)
        # The engine's sampled-token log-probs against the learner's current ones (same weights at the first
        # update): the rollout/train mismatch.
        metrics.update({f"mismatch/{k}": v for k, v in logprob_mismatch(rollout, logp.detach(), mask).items()})
        return loss, self._contributions(metrics, mask)

    # metrics that policy_loss already normalises by the mini-batch's counts (the others are micro-batch means)
    ADDITIVE = ("pg_loss", "kl_loss", "entropy")

    def _contributions(self, metrics: dict, mask) -> dict:
        share = float(mask.sum()) / self.num_tokens
        return {k: v if k in self.ADDITIVE or k.endswith("_max") else v * share for k, v in metrics.items()}

    def fused_inputs(self, rows, lens, entropy: bool, device) -> dict | None:
        """Keyword arguments of `fused_policy_loss` (packed layout) for the micro-batch samples `rows` with response
        lengths `lens`, or None when the fused form does not apply: TIS without pi_old (its weight would need the
        current log-probs before the pass), an entropy bonus without entropy (the loss_fn then has none), or
        settings the kernel lacks. Without pi_old (one on-policy update) the kernel takes the current log-probs."""
        from kernels.policy_loss import AGG_MODES, KL_MODES, PG_MODES

        s = self.settings
        supported = s.policy_loss in PG_MODES and s.kl_estimator in KL_MODES and {s.loss_agg, s.kl_agg} <= {*AGG_MODES}
        if not supported or (self.old_logp is None and self.tis_cap > 0) or (s.entropy_coef > 0 and not entropy):
            return None
        exp, rows = self.exp, [self.idx[r] for r in rows]
        flat = lambda per_row: torch.cat([t[:n] for t, n in zip(per_row, lens)]).float().to(device)  # noqa: E731
        old = flat([self.old_logp[r] for r in rows]) if self.old_logp is not None else None
        seq_index = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lens)).to(device)
        tis = tis_weight(old, flat([exp.rollout_logp[r] for r in rows]), self.tis_cap) if self.tis_cap > 0 else None
        return dict(logp_old=old, advantages=exp.advantages[rows].float().to(device),
                    mask=exp.keep[rows].to(device)[seq_index], s=s, seq_index=seq_index,
                    logp_ref=flat([self.ref_logp[r] for r in rows]) if self.ref_logp is not None else None,
                    kl_weight=exp.kl_weight[rows].float().to(device), tis_weight=tis,
                    num_tokens=self.num_tokens, num_seqs=self.num_seqs)

    def fused_metrics(self, metrics: dict, logp, rows, lens, mask) -> dict:
        """The fused call's metrics + the rollout/train mismatch from its log-probs (as `__call__` reports them)."""
        rollout = torch.cat([self.exp.rollout_logp[self.idx[r]][:n] for r, n in zip(rows, lens)]).to(logp.device)
        out = dict(metrics)
        out.update({f"mismatch/{k}": v for k, v in logprob_mismatch(rollout, logp, mask).items()})
        return self._contributions(out, mask)
