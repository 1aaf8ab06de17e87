"""Name -> function registries, so RL math and rewards are chosen by a string in config.

Used by `megaapo.algos` (advantage estimators, policy losses, KL estimators, aggregations) and `megaapo.rewards`.
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._fns[name] = fn
            return fn
        return deco

    def get(self, name: str) -> Callable:
        try:
            return self._fns[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._fns), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(sorted(self._fns))}") from None

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self._fns)

    def __len__(self) -> int:
        return len(self._fns)
