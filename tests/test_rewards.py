"""Rewards: answer checking with math-verify, the R1 format, StepRAR/StepRVR rules, and the timeout pool."""

import random

import pytest

from megaapo.rewards import REWARDS, RewardInput, step_rar, step_rvr
from megaapo.rewards.answers import answers_match, extract_answer, gold_is_parsable
from megaapo.rewards.basic import accuracy, r1_format
from megaapo.rewards.pool import RewardScorer

VALID = ("### Image Description: two red squares and one blue. ### Rationales: count all squares. "
         "### Let's think step by step. ### Step 1: Count the red squares: 2 red. "
         "### Step 2: Add the counts: 2 + 1 = 3. ### The final answer is: 3")


@pytest.mark.parametrize("pred,gold,ok", [
    ("3", "3", True), ("3.0", "3", True), ("\\frac{1}{2}", "0.5", True), ("$\\frac{6}{2}$", "3", True),
    ("\\boxed{3}", "3", True), ("4", "3", False), ("5 cm", "5", True), ("x = 3", "3", True),
    ("B", "B", True), ("(B)", "B", True), ("B. 5 cm", "b", True), ("(C)", "B", False), ("The answer is (B)", "B", True),
    ("", "3", False), (None, "3", False),
])
def test_answers_match(pred, gold, ok):
    assert answers_match(pred, gold) is ok


ANGLES = ["130°", "145°", "160°", "175°"]


@pytest.mark.parametrize("pred,ok", [
    ("B", True), ("(B)", True), ("B.", True), ("B) 145°", True), ("The answer is (B)", True), ("b", True),
    ("145°", True), ("145", True), ("145^\\circ", True), ("145 degrees", True), ("$145^{\\circ}$", True),
    ("130°", False), ("C", False), ("(A) 145°", False), ("150", False), ("", False),
])
def test_choice_text_counts_for_its_letter(pred, ok):
    assert answers_match(pred, "B", choices=ANGLES) is ok


def test_choice_matching_edge_cases():
    assert not answers_match("145", "B")                                    # no choices: text cannot name a letter
    assert not answers_match("0.5", "A", choices=["1/2", "0.5"])            # equal to two choices: ambiguous
    assert answers_match("larger than.", "A", choices=["Larger than", "equal to"])
    assert answers_match("B", "145°", choices=ANGLES)                       # a letter for a gold given as text
    assert not answers_match("C", "145°", choices=ANGLES)


@pytest.mark.parametrize("pred,gold,unit,ok", [
    ("5", "5", "cm", True), ("5 cm", "5", "cm", True), ("5cm", "5", "cm", True), ("5 \\text{cm}", "5", "cm", True),
    ("$5$ cm", "5", "cm", True), ("12 cm^2", "12", "cm^2", True), ("12 cm^2", "12", "", False),
    ("6 cm", "5", "cm", False), ("5 cm", "5", "m", True),                      # units are dropped, never checked
    ("40°", "40", "", True), ("40^\\circ", "40", "", True), ("40^{\\circ}", "40", "", True),
    ("40 degrees", "40", "", True), ("41°", "40", "", False),
    ("25%", "25", "", True), ("25\\%", "25", "", True), ("25%", "0.25", "", True), ("0.25", "25%", "", True),
    ("0.25", "25", "", False), ("2.5%", "0.25", "", False),
])
def test_numbers_with_units_degrees_and_percent(pred, gold, unit, ok):
    assert answers_match(pred, gold, unit=unit) is ok


@pytest.mark.parametrize("pred,ok", [
    ("1/2", True), ("0.5", True), ("\\frac12", True), ("\\dfrac{1}{2}", True), ("\\tfrac{1}{2}", True),
    ("$\\frac{2}{4}$", True), ("\\boxed{\\frac{1}{2}}", True), ("1/3", False), ("\\frac{1}{3}", False),
    ("-\\frac{1}{2}", False), ("2", False),
])
def test_latex_fractions(pred, ok):
    assert answers_match(pred, "\\frac{1}{2}") is ok


@pytest.mark.parametrize("pred,gold,precision,ok", [
    ("1.449", "1.45", 2, True), ("1.45", "1.45", 2, True), ("1.4512", "1.45", 2, True), ("1.5", "1.45", 2, False),
    ("1.44", "1.45", 2, False), ("1.449", "1.45", None, False), ("2.46", "2.5", 1, True), ("2.4", "2.5", 1, False),
    ("\\frac{29}{20}", "1.45", 2, True), ("1.449 m", "1.45", 2, True), ("3", "3.0", 1, True), ("x", "1.45", 2, False),
])
def test_precision_rounds_both_numbers(pred, gold, precision, ok):
    assert answers_match(pred, gold, precision=precision) is ok


# All but six of these pairs matched before (whitespace deleted, math-verify reading "1 2" as 3, a hedge read as
# its first letter...).
@pytest.mark.parametrize("pred,gold", [
    ("1 2", "12"), ("re d", "red"), ("Re d", "red"), ("12 345", "12345"), ("1\t2", "12"), ("1\n2", "12"),
    ("1\u00a02", "12"), ("1\\,2", "12"), ("1\\ 2", "12"), ("1~2", "12"), ("1\\quad 2", "12"), ("0 .5", "0.5"),
    ("1. 5", "1.5"), ("1 ,000", "1,000"), ("\\frac{1}{2 0}", "\\frac{1}{20}"), ("x y", "xy"),
    ("larger than", "largerthan"),
    ("1 2", "3"), ("3 4", "7"), ("12 345", "357"), ("1 1/2", "\\frac{3}{2}"),   # math-verify adds split numbers
    ("1\n2", "2"), ("3 \\\\ 4", "4"), ("3{}4", "3"), ("3\u200b4", "3"), ("3 \\lor 4", "4"),   # or reads one of them
    ("3\x00\x003", "3"), ("3\x00\x003", "33"), ("0.3\u0304", "0.3"),   # control characters, a combining overline
    ("3\\text{4}", "3"),                                             # a \text{} holding a digit is no unit
    ("(A) or (B)", "A"), ("(A) or (B)", "B"), ("A triangle", "A"),      # a hedge, an article
])
def test_no_merged_or_split_token_matches(pred, gold):
    assert not answers_match(pred, gold) and not answers_match(gold, pred)


@pytest.mark.parametrize("pred,gold", [
    ("9 \\pi", "9\\pi"), ("x = 3", "x=3"), ("(1, 2)", "(1,2)"), ("- 3", "-3"), ("1 /2", "1/2"), ("2 x", "2x"),
    ("  3\n", "3"), ("3\x00", "3"), ("\\text{ red }", "red"), ("$5$", "5"), ("Larger  than", "larger than"),
    ("The answer is 3", "3"), ("1,000", "1000"),
])
def test_separators_that_split_no_token_are_ignored(pred, gold):
    assert answers_match(pred, gold)


# Separators and where they would split a token (between two letters, two digits, a digit and "." or ",")
SEPARATORS = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2009", "\u3000", "\\,", "\\ ", "\\;", "\\!", "\\quad ", "~",
              "\\\\", "{}", "\x00", "\x00\x00", "\x1b", "\u200b", "\ufeff", "\u00ad"]


def _gold_answers(rng):
    digits = lambda n: str(rng.randint(10 ** (n - 1), 10 ** n - 1))   # noqa: E731
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))  # noqa: E731
    return rng.choice([
        digits(rng.randint(2, 6)), f"{digits(2)}.{digits(2)}", f"-{digits(3)}", f"{digits(1)},{digits(3)}",
        f"\\frac{{{digits(2)}}}{{{digits(2)}}}", f"{digits(2)}/{digits(2)}", f"{digits(2)}%", f"{digits(2)}°",
        f"{digits(2)} cm", word(), word().capitalize(), f"{word()} {word()}", f"{digits(1)}{word()[:2]}+{digits(2)}",
        f"x^{digits(1)}+{digits(2)}x", f"{digits(2)}\\pi", f"\\sqrt{{{digits(2)}}}", "红色", "三角形",
    ])


def test_property_no_answer_matches_its_split_or_merged_form():
    """A few thousand gold answers, each with a separator inserted where it splits a token: never a match, either
    way round, also as a choice's text; the gold itself (padded with whitespace) still matches."""
    rng = random.Random(13)
    checked = 0
    for _ in range(3000):
        gold = _gold_answers(rng)
        assert answers_match(f" {gold}\n", gold), gold
        cuts = [i for i in range(1, len(gold)) if (gold[i - 1].isalpha() and gold[i].isalpha())
                or (gold[i - 1].isdigit() and (gold[i].isdigit() or gold[i] in ".,"))
                or (gold[i - 1] == "." and gold[i].isdigit())]
        if not cuts:
            continue
        i = rng.choice(cuts)
        split = gold[:i] + rng.choice(SEPARATORS) + gold[i:]
        assert not answers_match(split, gold), (split, gold)
        assert not answers_match(gold, split), (gold, split)
        assert not answers_match(split, "A", choices=[gold, "zz"]), (split, gold)
        checked += 1
    assert checked > 2500


def test_reward_input_carries_choices_unit_and_precision():
    acc = REWARDS["accuracy"]
    assert acc(RewardInput("<answer>145</answer>", "B", choices=ANGLES)) == 1.0
    assert acc(RewardInput("<answer>145</answer>", "B")) == 0.0
    assert acc(RewardInput("<answer>12 cm^2</answer>", "12", unit="cm^2")) == 1.0
    assert acc(RewardInput("<answer>1.449</answer>", "1.45", precision=2)) == 1.0
    assert acc(RewardInput("<answer>1.449</answer>", "1.45")) == 0.0
    # the pool copies inputs with dataclasses.replace: the new fields must survive it
    batch = RewardScorer({"accuracy": 1.0}, num_workers=0).score([RewardInput("<answer>145</answer>", "B",
                                                                             choices=ANGLES)])
    assert batch.total == [1.0]


def test_extraction_styles():
    assert extract_answer("<think>x</think><answer> 7 </answer>") == "7"
    assert extract_answer("... ### The final answer is: 12") == "12"
    assert extract_answer("### The final answer is 12 ### Step 9: junk") == "12"
    assert extract_answer("no answer here") is None


def test_unparsable_gold_is_detected():
    assert gold_is_parsable("3") and gold_is_parsable("B") and gold_is_parsable("\\frac{1}{2}")
    assert not gold_is_parsable("\\frac{1}{") and not gold_is_parsable("???") and not gold_is_parsable("")


def test_r1_format_needs_exactly_one_of_each_tag():
    assert r1_format("<think>a</think>\n<answer>3</answer>") == 1.0
    assert r1_format("<answer>3</answer>") == 0.0
    assert r1_format("<think>a</think><think>b</think><answer>3</answer>") == 0.0
    assert r1_format("<think>a</think><answer>3</answer> trailing") == 0.0
    assert accuracy("<think>a</think><answer>3</answer>", "3") == 1.0


def test_step_rar_cases():
    keys = [["2 red", "red: 2"], ["2 + 1 = 3", "2+1=3"], ["never mentioned"]]  # 2 of 3 groups match
    k = 2 / 3
    assert step_rar(VALID, keys, "3") == pytest.approx(1 + 0.1 * k)
    assert step_rar(VALID.replace("is: 3", "is: 4"), keys, "3") == pytest.approx(0.1 * k)
    no_final = VALID.split("### The final answer is")[0]
    assert step_rar(no_final, keys, "3") == 0.0
    # the code runs math-verify on the whole response: it reads the 3 of "2 + 1 = 3" and pays the answer reward
    assert step_rar(no_final, keys, "3", faithful_to="code") == pytest.approx(1 + 0.1 * k)
    # ... and reads "2" (of "2 red") when the sum is in words: wrong, only the key step "2 red" is paid
    assert step_rar(no_final.replace("2 + 1 = 3", "two and one"), keys, "3", faithful_to="code") == \
        pytest.approx(0.1 / 3)
    # matching is case-insensitive and only looks inside the Step sections
    assert step_rar(VALID.replace("2 red", "2 RED"), [["2 red"]], "3") == pytest.approx(1.1)
    assert step_rar(VALID, [["two red squares"]], "3") == pytest.approx(1.0)  # only in the description
    assert step_rar(VALID, None, "3") == pytest.approx(1.0)


def test_step_rvr_rules():
    assert step_rvr(VALID) == 1.0
    assert step_rvr(VALID.replace("### Rationales:", "")) == 0.0                      # missing header
    for mode in ("paper", "code"):   # neither the paper nor the authors' code requires the "Let's think" line
        assert step_rvr(VALID.replace("### Let's think step by step.", ""), faithful_to=mode) == 1.0
    assert step_rvr(VALID.replace("### The final answer is: 3", "")) == 0.0
    assert step_rvr(VALID.replace("### Step 2:", "### Step 3:")) == 0.0              # misnumbered
    assert step_rvr(VALID.replace("### Step 1:", "### Step 2:", 1).replace("### Step 2: Add", "### Step 1: Add")) == 0
    swapped = ("### Rationales: count. ### Image Description: squares. ### Let's think step by step. "
               "### Step 1: 2 + 1 = 3. ### The final answer is: 3")
    assert step_rvr(swapped) == 0.0                                                   # wrong order (paper)
    assert step_rvr(swapped, faithful_to="code") == 1.0                               # the code skips that check
    late_step = VALID + " ### Step 3: more"
    assert step_rvr(late_step) == 0.0                                                 # a step after the answer
    assert step_rvr("### Image Description: x ### Rationales: y ### Let's think step by step. "
                    "### The final answer is: 3") == 0.0                              # no steps at all


def test_registry_names_and_errors():
    assert set(REWARDS) == {"accuracy", "format", "step_rar", "step_rvr"}
    with pytest.raises(KeyError, match="did you mean 'accuracy'"):
        REWARDS.get("acuracy")


def test_pool_scores_in_order_and_times_out_pathological_responses():
    good = RewardInput("<think>x</think><answer>3</answer>", "3")
    tower = RewardInput("<think>x</think><answer>9^{9^{9^{9^{9}}}}</answer>", "3")
    wrong = RewardInput("<think>x</think><answer>\\frac{8}{2}</answer>", "3")
    with RewardScorer({"accuracy": 1.0, "format": 0.5}, num_workers=2, timeout_s=1.5) as scorer:
        batch = scorer.score([good, tower, wrong, good])
        assert batch.total == [1.5, 0.0, 0.5, 1.5]
        assert batch.timeouts == 1 and batch.failed == [1] and batch.errors == 0
        assert batch.components["format"] == [1.0, 0.0, 1.0, 1.0]  # the timed-out response scores 0 everywhere
        again = scorer.score([good])  # the killed worker was replaced
        assert again.total == [1.5] and again.timeouts == 0


def test_batch_deadline_holds_with_several_pathological_responses():
    """Five power towers (each would take sympy minutes) among fifteen responses, one worker, timeout_s=2: the batch
    takes about timeout_s plus scheduling, not (as before) about 2 x timeout_s per tower one after another (~12 s);
    each tower scores 0 and is counted as a timeout, and every ordinary response is scored as usual."""
    good = RewardInput("<think>x</think><answer>3</answer>", "3")
    wrong = RewardInput("<think>x</think><answer>\\frac{8}{2}</answer>", "3")
    towers = [RewardInput(f"<think>x</think><answer>{b}^{{{b}^{{{b}^{{{b}^{{{b}}}}}}}}}</answer>", "3")
              for b in range(5, 10)]
    with RewardScorer({"accuracy": 1.0, "format": 0.5}, num_workers=1, timeout_s=2.0) as scorer:
        scorer.score([good])   # the worker is up (first use starts the forkserver)
        batch = scorer.score([x for tower in towers for x in (good, tower, wrong)])
        again = scorer.score([wrong, good])
    assert batch.total == [1.5, 0.0, 0.5] * 5
    assert batch.timeouts == 5 and batch.failed == [1, 4, 7, 10, 13] and batch.errors == 0
    assert batch.seconds < 2.0 + 2.5, batch.seconds   # 2.0-2.3 s on an idle 2-core machine
    assert again.total == [0.5, 1.5] and again.timeouts == 0


_GROUP_SIGTERM = """
import os, signal
from megaapo.rewards import RewardInput
from megaapo.rewards.pool import RewardScorer
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))   # a trainer's StopFlag: save at the next step
good = RewardInput("<think>x</think><answer>3</answer>", "3")
tower = RewardInput("<think>x</think><answer>9^{9^{9^{9^{9}}}}</answer>", "3")
with RewardScorer({"accuracy": 1.0, "format": 0.5}, num_workers=1, timeout_s=1.5) as scorer:
    first = scorer.score([good]).total
    os.killpg(0, signal.SIGTERM)   # what torchrun does to stop a worker
    later = scorer.score([good, tower, good])   # the timeout needs a new worker from the forkserver
    print(first, got, later.total, later.timeouts)
"""


def test_pool_outlives_sigterm_to_the_trainers_process_group():
    """torchrun stops a trainer with killpg(SIGTERM); the trainer then finishes its step, so its reward workers (and
    the forkserver that replaces them) must not die with it."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _GROUP_SIGTERM], capture_output=True, text=True, timeout=120,
                         start_new_session=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[0] == "[1.5] [1] [1.5, 0.0, 1.5] 1", res.stdout + res.stderr[-2000:]


def test_step_rewards_through_the_scorer():
    x = RewardInput(VALID, "3", key_steps=[["2 red"], ["nope"]])
    batch = RewardScorer({"step_rar": 1.0, "step_rvr": 1.0}, num_workers=0, alpha=0.1).score([x])
    assert batch.total == [pytest.approx(1 + 0.05 + 1)]


def test_eval_counts_answered_responses_in_every_prompt_style(synth_dir):
    """Held-out scoring reports the share of responses with an answer to compare: the only shape check a `direct`
    prompt has (no format reward), and next to the format share for `r1`. Four responses, worked out by hand."""
    from megaapo.config import RewardConfig
    from megaapo.data.dataset import load_examples
    from megaapo.evaluate import markdown_table, score_responses

    ex, _ = load_examples(synth_dir / "eval.jsonl")
    gold = ex[0].answer
    responses = [(0, f"<answer>{gold}</answer>"), (0, "<answer>no such answer</answer>"), (0, "I cannot tell"),
                 (0, f"<think>look</think><answer>{gold}</answer>")]
    with RewardScorer({"accuracy": 1.0}, num_workers=0) as scorer:
        direct = score_responses(ex, responses, scorer, RewardConfig(), "direct", k=4)
        r1 = score_responses(ex, responses, scorer, RewardConfig(), "r1", k=4)
    assert direct.answered == r1.answered == 0.75
    assert direct.accuracy == r1.accuracy == 0.5
    assert direct.format is None and r1.format == 0.25         # only the last one has the <think> format
    assert direct.metrics()["eval/answered"] == 0.75 and "eval/format" not in direct.metrics()
    assert r1.metrics()["eval/format"] == 0.25
    assert "| - |" in markdown_table({"b": direct}, 1) and "| 25.0 |" in markdown_table({"b": r1}, 1)
