"""Supervised samples and steps on the RL learner: shared by `megaapo sft` (`megaapo.sft`) and the RL demo's format
warm-up (`megaapo.run.Run.warmup`), and the held-out loss SFT's evaluation reports.

A supervised sample is prompt + target tokens; the loss is the summed negative log-prob of the target tokens over
the global batch divided by its target-token count (assistant tokens only: the prompt is never a target).
`random_labels` (the warm-up) trains the answer *format* with answers drawn from the training set's own answers, so
the warm-up teaches no visual content and every point of accuracy gained afterwards comes from RL.
"""

from __future__ import annotations

import random

import torch

from megaapo.data.prompts import format_target


def expand_image_pads(ids: list[int], image_token_id: int, grids) -> list[int]:
    """The chat template writes one image pad per image; the model sees one per merged patch (t*h*w/4)."""
    out, g = [], 0
    for t in ids:
        if t == image_token_id and grids is not None:
            out += [t] * (int(grids[g].prod()) // 4)
            g += 1
        else:
            out.append(t)
    return out


def target_text(ex, style: str, target: str = "auto") -> str | None:
    """The assistant turn an example trains on, or None when `sft.target=solution` and the row has none."""
    solution = ex.solution if target in ("auto", "solution") else None
    if target == "solution" and not solution:
        return None
    if style == "r1" and solution:
        return f"<think>{solution}</think><answer>{ex.answer}</answer>"
    return format_target(style, ex.answer, solution)


def build_samples(examples, builder, tokenizer, pixels, learner, *, target: str = "auto",
                  random_labels: bool = False, rng: random.Random | None = None,
                  answers: list[str] | None = None) -> list:
    """Supervised samples for examples: prompt + target + <|im_end|> (rows without a usable target are left out)."""
    rng = rng or random.Random(0)
    out = []
    for ex in examples:
        if random_labels:
            text = format_target(builder.style, rng.choice(answers), None)
        else:
            text = target_text(ex, builder.style, target)
            if text is None:
                continue
        prompt = builder.build(ex)
        pix, grid = pixels(ex.images)
        prompt_ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        prompt_ids = expand_image_pads(prompt_ids, learner.shape.image_token_id, grid)
        target_ids = tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt_ids + target_ids, dtype=torch.long)
        out.append(learner.make_sample(ids, len(prompt_ids), pix, grid))
    return out


def nll_loss(total_tokens: int):
    """loss_fn for Learner.train_step: summed target NLL / tokens in the whole batch."""
    def loss_fn(logp, entropy, mask, rows):
        loss = -(logp * mask).sum() / total_tokens
        return loss, {"sft/loss": loss.detach()}   # a contribution: the learner sums them to the batch's mean
    return loss_fn


def sft_step(learner, samples, lr: float | None = None) -> dict:
    """One supervised update; lr fixes the learning rate without moving the RL schedule (warm-up)."""
    total = sum(s.response_len for s in samples)
    return learner.train_step(samples, nll_loss(total), lr=lr).metrics


def heldout_loss(learner, samples) -> dict:
    """Mean target-token NLL of samples (forward only); on the last pipeline stage, {} elsewhere."""
    lps = learner.logprobs(samples)
    if lps is None:
        return {}
    tokens = sum(int(lp.numel()) for lp in lps)
    return {"eval/loss": -sum(float(lp.double().sum()) for lp in lps) / max(1, tokens)}
