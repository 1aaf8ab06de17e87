"""benchmarks/demo_seeds.py: the seeds table from finished runs (`--reuse`): per-seed rows, the spread, the demo's bar,
and `--write-docs` replacing only the marked section of the page. (The runs themselves are whole `megaapo train`
commands, minutes each: tests/test_demo.py runs one.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import demo_seeds
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return demo_seeds


def _saved(out: Path, seed: int, evals: list[float], seconds: float) -> None:
    row = {"seed": seed, "start": evals[0], "end": evals[-1], "gain": evals[-1] - evals[0], "best": max(evals),
           "below_best": max(evals) - evals[-1], "seconds": seconds, "evals": [[50 * i, a] for i, a in enumerate(evals)],
           "preset": "demo", "overrides": [], "load": [0.5, 0.7], "date": "2026-12-07"}
    (out / f"seed_{seed}.json").write_text(json.dumps(row))


def test_table_from_saved_runs_and_docs_section(bench, tmp_path, monkeypatch, capsys):
    _saved(tmp_path, 0, [25.0, 40.0, 70.0], 290.0)     # +45, ends at its best
    _saved(tmp_path, 1, [30.0, 75.0, 62.0], 310.0)     # +32, 13 below its best: fails the bar
    doc = tmp_path / "demo.md"
    doc.write_text(f"# page\nbefore\n{bench.START}\nold table\n{bench.END}\nafter\n")
    monkeypatch.setattr(bench, "DOC", doc)

    assert bench.main(["--seeds", "0", "1", "--reuse", "--out", str(tmp_path), "--write-docs"]) == 0
    text = capsys.readouterr().out
    assert "| 0 | 25.0% | 70.0% | +45.0 | 70.0% | 0.0 | 4:50.0 | 0.50, 0.70 |" in text
    assert "| 1 | 30.0% | 62.0% | +32.0 | 75.0% | 13.0 | 5:10.0 | 0.50, 0.70 |" in text
    assert "| mean | | 66.0% | +38.5 | | 6.5 | 5:00.0 | |" in text
    assert "| min | | 62.0% | +32.0 | | 0.0 | 4:50.0 | |" in text
    assert "**no**" in text                              # seed 1 ended 13 points below its best
    # the saved runs' date and load, not the rebuild's
    assert "; 2026-12-07; load average (1 min) 0.50 at the first run's start, 0.70 at the last one's end;" in text
    page = doc.read_text()
    assert page.startswith("# page\nbefore\n") and page.endswith("\nafter\n") and "old table" not in page
    assert "| 1 | 30.0% | 62.0% | +32.0 |" in page

    assert bench.main(["--seeds", "0", "--reuse", "--out", str(tmp_path)]) == 0
    assert "**yes**" in capsys.readouterr().out


def test_answers_confusion_table_names_the_answer_a_policy_never_gives(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import answers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = ([{"gold": "blue", "answer": "green"}] * 3 + [{"gold": "green", "answer": "green"}] * 2 +
            [{"gold": "red", "answer": "red"}, {"gold": "red", "answer": None}] + [{"gold": "green", "answer": "red"}])
    f = tmp_path / "responses.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert answers.main([str(f)]) == 0
    out = capsys.readouterr().out
    assert "| gold \\ answer | blue | green | red | (none) | prompts | accuracy |" in out
    assert "| blue | 0 | 3 | 0 | 0 | 3 | 0.0% |" in out
    assert "| green | 0 | 2 | 1 | 0 | 3 | 66.7% |" in out
    assert "| red | 0 | 0 | 1 | 1 | 2 | 50.0% |" in out
    assert "| share of answers | 0.0% | 62.5% | 25.0% | 12.5% | 8 | 37.5% |" in out
    assert "never answered: blue" in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no responses"):
        answers.main([str(empty)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match="broken.jsonl:2: not JSON"):
        answers.main([str(broken)])
    broken.write_text(json.dumps({"answer": "red"}) + "\n")
    with pytest.raises(SystemExit, match="broken.jsonl:1: .*no 'gold' field"):
        answers.main([str(broken)])
