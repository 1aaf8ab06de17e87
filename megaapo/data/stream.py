"""The order in which training prompts are drawn: `PromptStream`, shared by the RL and SFT loops (`megaapo.run`).

Its position is part of a checkpoint's run state, so a resumed run draws exactly the prompts the interrupted one
would have drawn next.
"""

from __future__ import annotations

import random


class PromptStream:
    """Prompts in a seeded order, epoch after epoch; its position is part of the checkpoint (exact resume)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.index = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order()
            take = order[self.index:self.index + k - len(out)]
            out += take
            self.index += len(take)
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
