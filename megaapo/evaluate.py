"""Held-out evaluation on the rollout engines: generate, score with the training reward code, aggregate.

Used by train.py (the demo's held-out accuracy) and by `megaapo eval`. Greedy by default; with k > 1 samples per
prompt it also reports pass@k. Accuracy is the `accuracy` reward (math-verify, choice letters) of the same code that
scores training rollouts, so train and eval can never disagree about what "correct" means.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from megaapo.experience import reward_inputs


@dataclass
class EvalResult:
    n: int
    accuracy: float                 # mean over all samples (greedy: over prompts)
    format: float                   # share of responses in the expected answer format
    pass_at_k: float | None = None
    k: int = 1
    by_category: dict = field(default_factory=dict)   # category -> accuracy
    responses: list = field(default_factory=list)     # (example id, response text, correct) for inspection
    seconds: float = 0.0

    def metrics(self, prefix: str = "eval") -> dict:
        m = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/format": self.format}
        if self.pass_at_k is not None:
            m[f"{prefix}/pass@{self.k}"] = self.pass_at_k
        for cat, acc in self.by_category.items():
            m[f"{prefix}/accuracy/{cat}"] = acc
        return m


def category(example) -> str:
    meta = example.meta or {}
    if "category" in meta:
        return str(meta["category"])
    if "task" in meta:
        return f"{meta['task']}-l{meta['level']}" if "level" in meta else str(meta["task"])
    return "all"


def evaluate(engines, examples, builder, scorer, reward_cfg, *, max_new_tokens: int, k: int = 1,
             temperature: float = 0.0, seed: int = 0) -> EvalResult:
    import time

    from megaapo.rollout import SamplingSpec

    t0 = time.perf_counter()
    prompts = [builder.build(e) for e in examples]
    sampling = SamplingSpec(n=k, temperature=temperature if k == 1 else max(temperature, 1e-2),
                            max_new_tokens=max_new_tokens, seed=seed)
    rollouts = engines.generate(prompts, sampling)
    scores = scorer.score(reward_inputs(rollouts, examples, reward_cfg))
    acc = scores.components.get("accuracy") or [0.0] * len(rollouts)
    fmt = scores.components.get("format") or scores.components.get("step_rvr") or [0.0] * len(rollouts)
    per_prompt = defaultdict(list)
    for r, a in zip(rollouts, acc):
        per_prompt[r.group].append(a >= 1.0)
    cats = defaultdict(list)
    for g, hits in per_prompt.items():
        cats[category(examples[g])].append(sum(hits) / len(hits))
    res = EvalResult(n=len(examples), accuracy=sum(a >= 1.0 for a in acc) / max(1, len(acc)),
                     format=sum(f > 0 for f in fmt) / max(1, len(fmt)), k=k,
                     by_category={c: sum(v) / len(v) for c, v in sorted(cats.items())},
                     responses=[(examples[r.group].id, r.text, a >= 1.0) for r, a in zip(rollouts, acc)],
                     seconds=time.perf_counter() - t0)
    if k > 1:
        res.pass_at_k = sum(any(h) for h in per_prompt.values()) / max(1, len(per_prompt))
    return res
