"""StepRVR and StepRAR in both modes (`faithful_to` paper / code): a table of hand-written responses whose rewards
were worked out by hand from the rules (R1-VL's paper; shared ALGORITHMS.md, "StepGRPO as the authors' code computes
it"; docs/rewards.md), and a property test over generated responses.

Where the code's answer rule runs math-verify on the whole response, the comment names what math-verify reads there
(a number after "final answer is", else the right-most number); "red" and other words give math-verify nothing, so
for word answers the code's exact-string rule alone decides.
"""

import random
from dataclasses import replace
from typing import NamedTuple, Optional

import pytest

from megaapo.rewards import REWARDS, RewardInput
from megaapo.rewards.step import key_step_fraction, step_rar, step_rvr

ALPHA = 0.1
# A clean R1-VL response to "how many squares?" (gold 3) and its pieces
D = "### Image Description: two red squares and one blue square.\n"
R = "### Rationales: count every square.\n"
T = "### Let's think step by step.\n"
S1 = "### Step 1: count the red squares: 2 red.\n"
S2 = "### Step 2: add the blue one: 2 + 1 = 3.\n"
F = "### The final answer is: 3"
VALID = D + R + T + S1 + S2 + F
KS = [["2 red"], ["2 + 1 = 3", "2+1=3"]]          # S1 holds the first group, S2 the second: k = 1
# The same for "which square is largest?" (gold "red")
DW = "### Image Description: three squares: red, blue and green.\n"
RW = "### Rationales: find the largest square.\n"
S1W = "### Step 1: compare the sizes: red is 12 px, blue is 8 px.\n"
S2W = "### Step 2: the largest square is red.\n"
FW = "### The final answer is: red"
VALID_W = DW + RW + T + S1W + S2W + FW
KSW = [["largest square is red"], ["12 px"]]       # S2W and S1W: k = 1


class Case(NamedTuple):
    name: str
    response: str
    key_steps: Optional[list]
    gold: str
    paper: tuple            # (StepRVR, StepRAR) with faithful_to="paper"
    code: tuple             # (StepRVR, StepRAR) with faithful_to="code"
    extra: dict = {}        # solution, choices, unit


CASES = [
    # --- the template; the "Let's think" line is required by neither mode
    Case("template", VALID, KS, "3", (1, 1.1), (1, 1.1)),
    Case("no_lets_think", D + R + S1 + S2 + F, KS, "3", (1, 1.1), (1, 1.1)),
    Case("word_template", VALID_W, KSW, "red", (1, 1.1), (1, 1.1)),   # code: "red" == "red" as strings
    # on one line the code's step text runs to the end (no "\n###"), final-answer line included
    Case("one_line", VALID.replace("\n", " "), KS, "3", (1, 1.1), (1, 1.1)),
    Case("one_line_key_step_in_answer_line", VALID.replace("\n", " "), [["answer is: 3"]], "3", (1, 1.0), (1, 1.1)),
    # --- header variants: paper reads them (docs list each), the code needs the exact strings
    # code: completeness fails; only "### Step 2:" is a step, its text holds the second group: k = 1/2
    Case("upper_case_step", VALID.replace("### Step 1:", "### STEP 1:"), KS, "3", (1, 1.1), (0, 1.05)),
    Case("no_space_after_hashes", VALID.replace("### Step 1:", "###Step 1:"), KS, "3", (1, 1.1), (0, 1.05)),
    Case("no_space_before_number", VALID.replace("### Step 1:", "### Step1:"), KS, "3", (1, 1.1), (0, 1.05)),
    Case("step_without_colon", VALID.replace("### Step 1:", "### Step 1"), KS, "3", (1, 1.1), (0, 1.05)),
    Case("full_width_colon", VALID.replace("### Step 1:", "### Step 1："), KS, "3", (1, 1.1), (0, 1.05)),
    Case("zero_padded_number", VALID.replace("### Step 1:", "### Step 01:"), KS, "3", (1, 1.1), (0, 1.1)),
    # paper: a Step header with non-ASCII digits is malformed (and ends Step 1's section): k = 1/2.
    # code: Python's \d reads "２" as 2: steps 1, 2 in order, both texts count
    Case("full_width_digit", VALID.replace("### Step 2:", "### Step ２:"), KS, "3", (0, 1.05), (1, 1.1)),
    # paper: "### Step 1." is malformed, its text is no section: k = 1/2; code: not a step either
    Case("step_number_with_period", VALID.replace("### Step 1:", "### Step 1."), KS, "3", (0, 1.05), (0, 1.05)),
    # code: no "### Step 1:" string; math-verify reads the 3 after "final answer is"
    Case("final_without_colon", VALID.replace("is: 3", "is 3"), KS, "3", (1, 1.1), (0, 1.1)),
    Case("final_lower_case", VALID.replace("The final", "the final"), KS, "3", (1, 1.1), (0, 1.1)),
    Case("description_lower_case", VALID.replace("Image Description", "Image description"), KS, "3",
         (1, 1.1), (0, 1.1)),
    Case("rationales_without_colon", VALID.replace("Rationales:", "Rationales"), KS, "3", (1, 1.1), (0, 1.1)),
    # the code ignores "### step 2:", so its steps are 1, 3; its step 1 text ends at that line: k = 1/2
    Case("variant_header_code_ignores", D + R + S1 + S2.replace("Step 2", "step 2") + "### Step 3: so 3 squares.\n" + F,
         KS, "3", (1, 1.1), (0, 1.05)),
    # paper: "### Step 1.5:" is a malformed step header; the code does not see it as a step
    Case("decimal_step_number", D + R + S1 + "### Step 1.5: check: 2 red.\n" + S2 + F, KS, "3", (0, 1.1), (1, 1.1)),
    Case("four_hashes", VALID.replace("### Step 1:", "#### Step 1:"), KS, "3", (1, 1.1), (1, 1.1)),
    Case("curly_apostrophe", VALID.replace("Let's", "Let’s"), KS, "3", (1, 1.1), (1, 1.1)),
    # paper: only spaces and tabs count after "###"; a no-break space makes "###\xa0Step 1:" no header at all
    Case("no_break_space_after_hashes", VALID.replace("### Step 1:", "###\u00a0Step 1:"), KS, "3", (0, 1.05),
         (0, 1.05)),
    # --- order
    # code: the text ends with the header, so the order check is skipped; paper: two final answers, steps after one.
    # paper StepRAR: answers "3" and "" (not all right); the section before the first final answer holds group 1
    Case("code_shortcut", D + R + S1 + "### The final answer is: 3\n" + S2 + "### The final answer is:", KS, "3",
         (0, 0.05), (1, 1.1)),
    Case("no_shortcut_with_trailing_answer", D + R + S1 + "### The final answer is: 3\n" + S2 + F, KS, "3",
         (0, 1.05), (0, 1.1)),
    Case("rationales_before_description", R + D + S1 + S2 + F, KS, "3", (0, 1.1), (1, 1.1)),
    Case("steps_before_description", S1 + S2 + D + R + F, KS, "3", (0, 1.1), (1, 1.1)),
    Case("duplicate_description", D + R + D + S1 + S2 + F, KS, "3", (0, 1.1), (1, 1.1)),
    Case("think_line_after_steps", D + R + S1 + S2 + T + F, KS, "3", (0, 1.1), (1, 1.1)),
    Case("unknown_header_is_text", D + R + S1 + S2 + "### Check: all squares counted.\n" + F, KS, "3",
         (1, 1.1), (1, 1.1)),
    Case("misnumbered", D + R + S1 + S2.replace("Step 2", "Step 3") + F, KS, "3", (0, 1.1), (0, 1.1)),
    Case("starts_at_two", D + R + S1.replace("Step 1", "Step 2") + S2.replace("Step 2", "Step 3") + F, KS, "3",
         (0, 1.1), (0, 1.1)),
    Case("step_one_twice", D + R + S1 + S2.replace("Step 2", "Step 1") + F, KS, "3", (0, 1.1), (0, 1.1)),
    Case("no_steps", D + R + T + F, KS, "3", (0, 1.0), (0, 1.0)),
    Case("no_description", R + S1 + S2 + F, KS, "3", (0, 1.1), (0, 1.1)),
    Case("no_rationales", D + S1 + S2 + F, KS, "3", (0, 1.1), (0, 1.1)),
    # --- several final answers, steps after the answer
    Case("two_final_answers_same", VALID + "\n### The final answer is: 3", KS, "3", (0, 1.1), (1, 1.1)),
    # code: math-verify reads the last one (4, wrong), then the first line after the FIRST header is "3": right
    Case("two_final_answers_second_wrong", VALID + "\n### The final answer is: 4", KS, "3", (0, 0.1), (1, 1.1)),
    # code: math-verify reads the last one (3): right
    Case("two_final_answers_first_wrong", VALID.replace("is: 3", "is: 4") + "\n### The final answer is: 3", KS, "3",
         (0, 0.1), (1, 1.1)),
    # paper StepRAR counts only the sections before the final answer (k = 1 here anyway)
    Case("step_after_answer", VALID + "\n### Step 3: check: 3 squares.", KS, "3", (0, 1.1), (0, 1.1)),
    Case("key_step_only_after_answer", VALID + "\n### Step 3: 3 squares in all.", [["3 squares in all"]], "3",
         (0, 1.0), (0, 1.1)),
    # --- the final-answer line
    # code: math-verify finds nothing to compare with "red"; the line after the header is "" != "red"
    Case("empty_final_answer", DW + RW + S1W + S2W + "### The final answer is:", KSW, "red", (0, 0.0), (1, 0.1)),
    Case("answer_on_next_line", DW + RW + S1W + S2W + "### The final answer is:\nred", KSW, "red", (1, 1.1), (1, 1.1)),
    Case("answer_after_blank_lines", DW + RW + S1W + S2W + "### The final answer is:\n\n  red\n", KSW, "red",
         (1, 1.1), (1, 1.1)),
    Case("explanation_after_answer", VALID_W + "\nbecause it is the largest.", KSW, "red", (1, 1.1), (1, 1.1)),
    Case("answer_with_more_words", VALID_W + ", the largest", KSW, "red", (1, 0.1), (1, 0.1)),
    # --- key-step text
    Case("key_step_in_a_header", VALID, [["step 2"]], "3", (1, 1.0), (1, 1.0)),
    Case("key_step_in_description", VALID, [["two red squares"]], "3", (1, 1.0), (1, 1.0)),
    Case("key_step_in_answer_line", VALID, [["answer is: 3"]], "3", (1, 1.0), (1, 1.0)),
    # paper: a "###" ends a section anywhere; the code's step text runs to a LINE starting with "###"
    Case("mid_line_hashes", VALID.replace("count the red squares: 2 red", "count ### 2 red"), [["2 red"]], "3",
         (1, 1.0), (1, 1.1)),
    # paper reads a run of whitespace as one space
    Case("key_step_across_line_break", VALID.replace("2 + 1 = 3.", "2 +\n1 = 3."), [["2 + 1 = 3"]], "3",
         (1, 1.1), (1, 1.0)),
    Case("key_step_case", VALID.replace("2 red", "2 RED"), [["2 red"]], "3", (1, 1.1), (1, 1.1)),
    # paper: an empty form never matches and a group of empty forms is not counted; code: "" matches everything
    Case("empty_form", VALID, [[""], ["never mentioned"]], "3", (1, 1.0), (1, 1.05)),
    # code: the joined step text has no double space
    Case("whitespace_form", VALID, [["  "], ["2 red"]], "3", (1, 1.1), (1, 1.05)),
    Case("empty_group", VALID, [[], ["2 red"]], "3", (1, 1.1), (1, 1.05)),
    Case("bare_string_groups", VALID, ["2 red", "zzz"], "3", (1, 1.05), (1, 1.05)),
    Case("no_key_steps", VALID, None, "3", (1, 1.0), (1, 1.0)),
    # --- the answer
    # paper: no final-answer line, no reward; code: math-verify reads 3 in the whole response
    Case("answer_tag_without_header", D + R + S1 + S2 + "<answer>3</answer>", KS, "3", (0, 0.0), (0, 1.1)),
    Case("steps_only", S1 + S2, KS, "3", (0, 0.0), (0, 1.1)),
    Case("bare_word", "red", None, "red", (0, 0.0), (0, 1.0)),      # code: the whole stripped response == "red"
    Case("sentence_without_header", "The largest square is red.", KSW, "red", (0, 0.0), (0, 0.0)),
    Case("wrong_answer", VALID.replace("is: 3", "is: 4"), KS, "3", (1, 0.1), (1, 0.1)),
    Case("answer_case", VALID_W.replace("is: red", "is: Red"), KSW, "red", (1, 1.1), (1, 0.1)),
    Case("answer_full_stop", VALID_W + ".", KSW, "red", (1, 1.1), (1, 0.1)),
    Case("decimal_answer", VALID.replace("is: 3", "is: 3.0"), KS, "3", (1, 1.1), (1, 1.1)),
    # code: math-verify reads 1 after "final answer is"; "1 2" != "12"
    Case("split_number", VALID.replace("is: 3", "is: 1 2"), KS, "12", (1, 0.1), (1, 0.1)),
    Case("split_word", VALID_W.replace("is: red", "is: re d"), KSW, "red", (1, 0.1), (1, 0.1)),
    # code: math-verify reads 3 in the steps and nothing in "B"; "(B)" != "B"
    Case("choice_letter", VALID.replace("is: 3", "is: (B)"), KS, "B", (1, 1.1), (1, 0.1),
         {"choices": ["2", "3"]}),
    Case("choice_text", VALID, KS, "B", (1, 1.1), (1, 0.1), {"choices": ["2", "3"]}),
    Case("unit", VALID.replace("is: 3", "is: 5 cm"), KS, "5", (1, 1.1), (1, 1.1), {"unit": "cm"}),
    # code: against the reference solution's final-answer line (math-verify reads 1 and 2 there: unequal)
    Case("solution_line", VALID_W, KSW, "red", (1, 1.1), (1, 1.1),
         {"solution": "### Step 1: the largest is red.\n### The final answer is: red"}),
    # code: math-verify reads 12 in both the response and the solution: a wrong colour earns the answer reward
    Case("solution_number_matches_wrong_answer",
         DW + RW + S1W + "### Step 2: so the largest square is blue, at 12 px.\n### The final answer is: blue", KSW,
         "red", (1, 0.05), (1, 1.05), {"solution": "### Step 1: red is 12 px.\n### The final answer is: red"}),
    # code: math-verify reads 3 from "3\x00\x003"
    Case("control_characters_in_answer", VALID.replace("is: 3", "is: 3\x00\x003"), KS, "3", (1, 0.1), (1, 1.1)),
    # --- empty, whitespace, Unicode, line endings
    Case("empty_response", "", KS, "3", (0, 0.0), (0, 0.0)),
    Case("whitespace_response", " \n\t ", KS, "3", (0, 0.0), (0, 0.0)),
    Case("cjk_answer", D + R + S1 + S2 + "### The final answer is: 红色", KS, "红色", (1, 1.1), (1, 1.1)),
    Case("greek_key_step", VALID.replace("2 + 1 = 3.", "Δ = 2 + 1 = 3."), [["δ = 2 + 1"]], "3", (1, 1.1), (1, 1.1)),
    Case("crlf_line_endings", VALID.replace("\n", "\r\n"), KS, "3", (1, 1.1), (1, 1.1)),
]


def test_the_table_is_big_enough_and_names_are_unique():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("mode", ["paper", "code"])
def test_hand_computed_rewards(case, mode):
    rvr, rar = getattr(case, mode)
    kwargs = {"solution": case.extra.get("solution"), "choices": case.extra.get("choices"),
              "unit": case.extra.get("unit", "")}
    assert step_rvr(case.response, faithful_to=mode) == rvr
    assert step_rar(case.response, case.key_steps, case.gold, alpha=ALPHA, faithful_to=mode,
                    **kwargs) == pytest.approx(rar, abs=1e-12)


def test_registered_rewards_pass_solution_choices_and_unit():
    """RewardInput carries what both modes need: the solution (code) and choices/unit/precision (paper)."""
    case = next(c for c in CASES if c.name == "solution_number_matches_wrong_answer")
    x = RewardInput(case.response, case.gold, key_steps=case.key_steps, solution=case.extra["solution"])
    assert REWARDS["step_rar"](x) == pytest.approx(0.05)
    assert REWARDS["step_rar"](replace(x, faithful_to="code")) == pytest.approx(1.05)
    choice = RewardInput(VALID, "B", key_steps=KS, choices=["2", "3"])
    assert REWARDS["step_rar"](choice) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="faithful_to"):
        step_rvr(VALID, faithful_to="authors")


# ------------------------------------------------------------------------------------------------ property test
PHRASES = ["2 red", "1 blue", "2 + 1 = 3", "the largest is red", "area = 12", "x = 4", "half of 8 is 4"]
HEADER_SPELLINGS = {   # variants paper mode reads as the same header (docs/rewards.md)
    "### Image Description:": ["### image description:", "###Image Description", "### IMAGE DESCRIPTION：",
                               "###\tImage  Description :"],
    "### Rationales:": ["### rationales:", "###Rationales", "### RATIONALES ："],
    "### Let's think step by step.": ["### let’s think step by step", "###LET'S THINK STEP BY STEP:"],
    "### The final answer is:": ["### the final answer is", "###The Final Answer Is :", "### THE FINAL ANSWER IS："],
}


def _step_header(rng, n):
    return rng.choice([f"### Step {n}:", f"### Step {n}:", f"###Step{n}", f"### STEP {n} :", f"### step {n}",
                       f"#### Step {n}:", f"### Step {n}.", f"### Step {chr(0xFF10 + n % 10)}:"])


def _generate(rng: random.Random) -> tuple[str, list, str]:
    """A response with random omissions, reorderings, renumbering, duplicated and variant headers."""
    n = rng.randint(0, 4)
    numbers = list(range(1, n + 1))
    if rng.random() < 0.2:
        numbers = [rng.randint(0, 5) for _ in numbers]
    steps = [f"{_step_header(rng, i) if rng.random() < 0.25 else f'### Step {i}:'} {rng.choice(PHRASES)}"
             for i in numbers]
    answer = rng.choice(["3", "4", "red", "", "3.0", "1 2", "(B)", "3\n\nmore text"])
    sections = [f"### Image Description: {rng.choice(PHRASES)}", f"### Rationales: {rng.choice(PHRASES)}",
                "### Let's think step by step.", *steps, f"### The final answer is: {answer}"]
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        if op < 0.3 and sections:
            sections.pop(rng.randrange(len(sections)))
        elif op < 0.6 and len(sections) > 1:
            i, j = rng.randrange(len(sections)), rng.randrange(len(sections))
            sections[i], sections[j] = sections[j], sections[i]
        elif op < 0.8 and sections:
            sections.insert(rng.randrange(len(sections) + 1), rng.choice(sections))
        else:
            sections.append(f"### Step {rng.randint(1, 6)}: {rng.choice(PHRASES)}")
    text = rng.choice(["\n", " ", "\n\n"]).join(sections)
    if rng.random() < 0.3:
        header = rng.choice(list(HEADER_SPELLINGS))
        text = text.replace(header, rng.choice(HEADER_SPELLINGS[header]))
    key_steps = [rng.choice([[rng.choice(PHRASES)], [rng.choice(PHRASES), rng.choice(PHRASES)], rng.choice(PHRASES),
                             [""], [], ["  "], ["never said"]]) for _ in range(rng.randint(0, 4))]
    return text, key_steps, rng.choice(["3", "red", "B"])


RESPONSES = [_generate(random.Random(f"step-property/{i}")) for i in range(3000)]


@pytest.mark.parametrize("mode", ["paper", "code"])
def test_invariants_over_generated_responses(mode):
    for i, (text, key_steps, gold) in enumerate(RESPONSES):
        rvr = step_rvr(text, faithful_to=mode)
        k = key_step_fraction(text, key_steps, faithful_to=mode)
        assert rvr in (0.0, 1.0) and 0.0 <= k <= 1.0, (i, text)
        # a group that matches nothing, or an empty group, never raises k; duplicating every group keeps it
        assert key_step_fraction(text, key_steps + [["zq never written"]], faithful_to=mode) <= k, (i, text)
        assert key_step_fraction(text, key_steps + [[]], faithful_to=mode) <= k, (i, text)
        assert key_step_fraction(text, key_steps + key_steps, faithful_to=mode) == pytest.approx(k), (i, text)
        if "step" not in text.lower() and (mode == "paper" or all(g and "" not in g for g in key_steps)):
            assert k == 0.0, (i, text)   # (the code's empty form matches even an empty step text)
        if i % 3 == 0:   # StepRAR calls math-verify (on the whole response in code mode): a third keeps this fast
            rar = step_rar(text, key_steps, gold, alpha=ALPHA, faithful_to=mode, choices=["2", "3"])
            assert 0.0 <= rar <= 1 + ALPHA and round(rar - ALPHA * k, 9) in (0.0, 1.0) or rar == 0.0, (i, text)
            if mode == "paper" and "final answer is" not in text.lower():
                assert rar == 0.0, (i, text)
        # the "Let's think" line is required by neither mode: removing it never makes a response invalid
        without = text.replace("### Let's think step by step.", "")
        if mode == "paper" or without.strip().endswith("### The final answer is:") == \
                text.strip().endswith("### The final answer is:"):
            assert step_rvr(without, faithful_to=mode) >= rvr, (i, text)


def test_paper_header_spellings_are_equivalent_and_the_code_reads_none():
    """Respelling every header (case, spaces, colon) changes nothing in paper mode; the code sees no header."""
    checked = 0
    for i, (text, key_steps, _) in enumerate(RESPONSES):
        rng = random.Random(i)
        respelled = text
        for header, variants in HEADER_SPELLINGS.items():
            respelled = respelled.replace(header, rng.choice(variants))
        respelled = respelled.replace("### Step ", rng.choice(["###Step ", "### STEP ", "### step "]))
        assert step_rvr(respelled) == step_rvr(text), (i, text, respelled)
        assert key_step_fraction(respelled, key_steps) == key_step_fraction(text, key_steps), (i, text, respelled)
        if respelled != text:
            assert step_rvr(respelled, faithful_to="code") == 0.0 or "### Step 1:" in respelled, (i, respelled)
            checked += 1
    assert checked > 2000
