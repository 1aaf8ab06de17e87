"""Supervised steps on the same learner: the RL demo's format warm-up (and the base of `megaapo sft`).

A supervised sample is prompt + target tokens; the loss is the mean negative log-prob of the target tokens over the
whole batch (assistant tokens only: the prompt is never a target). `random_labels` trains the answer *format* with
answers drawn from the training set's own answers, so the warm-up teaches no visual content and every point of
accuracy gained afterwards comes from RL.
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


def build_samples(examples, builder, tokenizer, pixels, learner, *, random_labels: bool = False,
                  rng: random.Random | None = None, answers: list[str] | None = None) -> list:
    """Supervised samples for examples: prompt + the prompt style's target + <|im_end|>."""
    rng = rng or random.Random(0)
    out = []
    for ex in examples:
        answer = rng.choice(answers) if random_labels else ex.answer
        target = format_target(builder.style, answer, None if random_labels else ex.solution) + "<|im_end|>"
        prompt = builder.build(ex)
        pix, grid = pixels(ex.images)
        prompt_ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        prompt_ids = expand_image_pads(prompt_ids, learner.shape.image_token_id, grid)
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt_ids + target_ids, dtype=torch.long)
        out.append(learner.make_sample(ids, len(prompt_ids), pix, grid))
    return out


def nll_loss(total_tokens: int):
    """loss_fn for Learner.train_step: summed target NLL / tokens in the whole batch."""
    def loss_fn(logp, entropy, mask, rows):
        loss = -(logp * mask).sum() / total_tokens
        return loss, {"sft/loss": loss.detach() * total_tokens / max(1, int(mask.sum()))}
    return loss_fn


def sft_step(learner, samples, lr: float | None = None) -> dict:
    """One supervised update; lr fixes the learning rate without moving the RL schedule (warm-up)."""
    total = sum(s.response_len for s in samples)
    return learner.train_step(samples, nll_loss(total), lr=lr).metrics
