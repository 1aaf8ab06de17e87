"""Which answers a policy gives, per gold answer: the confusion table of a `megaapo eval` responses file.

    megaapo eval configs/demo.yaml --checkpoint runs/demo/checkpoints/step_000500 trainer.output_dir=runs/demo
    python benchmarks/answers.py runs/demo/eval/synthetic_heldout/responses.jsonl

For benchmarks with a few distinct answers (the demo's four colours). Prints one row per gold answer (how often each
answer was given for it, and the row's accuracy), then each answer's share of all responses, and names the gold
answers the policy never gives: a policy that has stopped sampling an answer gets no reward for it again, and its
accuracy stays capped by the answers left (docs/demo.md: at kl_coef 0.01 one colour of four died at every seed).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

NONE = "(none)"


def confusion(rows: list[dict]) -> tuple[list[str], list[str], Counter]:
    """rows with "gold" and "answer" (None: nothing parsable) -> (gold answers, given answers, Counter[(gold, given)])."""
    pairs = Counter((str(r["gold"]), NONE if r.get("answer") is None else str(r["answer"])) for r in rows)
    golds = sorted({g for g, _ in pairs})
    given = sorted({a for _, a in pairs} - {NONE}) + ([NONE] if any(a == NONE for _, a in pairs) else [])
    return golds, given, pairs


def table(rows: list[dict]) -> str:
    golds, given, pairs = confusion(rows)
    cols = golds + [a for a in given if a not in golds]
    lines = ["| gold \\ answer | " + " | ".join(cols) + " | prompts | accuracy |",
             "|---|" + "---|" * (len(cols) + 2)]
    for g in golds:
        n = sum(pairs[(g, a)] for a in cols)
        lines.append(f"| {g} | " + " | ".join(str(pairs[(g, a)]) for a in cols) +
                     f" | {n} | {100 * pairs[(g, g)] / n:.1f}% |")
    total = sum(pairs.values())
    shares = {a: sum(pairs[(g, a)] for g in golds) for a in cols}
    lines.append("| share of answers | " + " | ".join(f"{100 * shares[a] / total:.1f}%" for a in cols) +
                 f" | {total} | {100 * sum(pairs[(g, g)] for g in golds) / total:.1f}% |")
    never = [g for g in golds if shares[g] == 0]
    lines += ["", "never answered: " + (", ".join(never) if never else "none")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("responses", nargs="+", help="responses.jsonl files written by `megaapo eval`")
    args = p.parse_args(argv)
    for path in args.responses:
        rows = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or "gold" not in row:
                raise SystemExit(f"{path}:{n}: not a response row of `megaapo eval` (no 'gold' field)")
            rows.append(row)
        if not rows:
            raise SystemExit(f"{path}: no responses")
        print(f"{path}\n\n{table(rows)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
