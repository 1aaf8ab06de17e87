"""Synthetic multimodal reasoning data, rendered with Pillow: the embedded default dataset (no hub needed).

`megaapo data synth --out DIR --n N --seed S` writes DIR/train.jsonl, DIR/eval.jsonl and DIR/images/*.png in the
megaapo row format, each row with a gold answer, a step-formatted reference solution (R1-VL style) and key steps
with equivalent surface forms. Deterministic by seed: row i of a split depends only on (seed, split, i).

Task families, three difficulty levels each (level 3 is far from solved by small models):
  count   squares on a grey canvas: 1: how many (1-3, one colour); 2: how many (1-6, mixed colours);
          3: how many of one colour among 2-8 squares of three colours (0-5)
  bars    a bar chart with lettered bars: 1: which bar is tallest (a letter); 2: the height of one bar (1-9);
          3: the sum of two bars' heights
  digits  digits drawn in the image: 1: which digit is shown; 2: the sum of two digits; 3: a*b + c
  colour  squares of distinct sizes and colours: 1-2: the colour of the largest (2, or 3-4 squares);
          3: the colour of the smallest of 4
The background is a mid grey near the CLIP mean, which normalises to ~0: with black backgrounds a small randomly
initialised vision tower sees nearly identical features for every image and neither SFT nor RL learns (measured).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (122, 116, 104)
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40)}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass
class Problem:
    image: Image.Image
    question: str
    answer: str
    description: str
    rationale: str
    steps: list[str]
    key_steps: list[list[str]]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _place_squares(rng: random.Random, size: int, n: int, lo: int, hi: int,
                   sides: list[int] | None = None) -> list[tuple[int, int, int]]:
    """n non-overlapping squares (x, y, side), at least 2 px apart, inside a size x size canvas (sides given or
    drawn from [lo, hi])."""
    for _ in range(200):
        placed: list[tuple[int, int, int]] = []
        for k in range(n):
            for _ in range(100):
                s = sides[k] if sides else rng.randint(lo, hi)
                x, y = rng.randint(2, size - s - 2), rng.randint(2, size - s - 2)
                if all(x + s + 2 <= px or px + ps + 2 <= x or y + s + 2 <= py or py + ps + 2 <= y
                       for px, py, ps in placed):
                    placed.append((x, y, s))
                    break
        if len(placed) == n:
            return placed
    raise RuntimeError(f"cannot place {n} squares on a {size}px canvas")


def _count_forms(colour: str, n: int) -> list[str]:
    word = NUMBER_WORDS[n]
    return [f"{n} {colour}", f"{colour}: {n}", f"{word} {colour}", f"{colour} squares: {n}"]


def task_count(rng: random.Random, level: int, size: int) -> Problem:
    lo, hi = max(5, size // 12), max(7, size // 7)
    if level == 1:
        colour = rng.choice(list(COLOURS))
        n = rng.randint(1, 3)
        squares = [(sq, colour) for sq in _place_squares(rng, size, n, lo, hi)]
    elif level == 2:
        n = rng.randint(1, 6)
        squares = [(sq, rng.choice(list(COLOURS))) for sq in _place_squares(rng, size, n, lo, hi)]
    else:
        palette = rng.sample(list(COLOURS), 3)
        n = rng.randint(2, 8)
        squares = [(sq, rng.choice(palette)) for sq in _place_squares(rng, size, n, lo, hi)]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for (x, y, s), colour in squares:
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=COLOURS[colour])
    by_colour: dict[str, int] = {}
    for _, colour in squares:
        by_colour[colour] = by_colour.get(colour, 0) + 1
    listing = ", ".join(f"{k} {c}" for c, k in sorted(by_colour.items()))
    description = f"The image shows {len(squares)} squares: {listing}."
    if level < 3:
        answer = len(squares)
        question = "How many squares are there?"
        steps = [f"Count the {c} squares: {k} {c}." for c, k in sorted(by_colour.items())]
        parts = [str(k) for _, k in sorted(by_colour.items())]
        total = " + ".join(parts) + f" = {answer}"
        steps.append(f"Add the counts: {total}.")
        key_steps = [_count_forms(c, k) for c, k in sorted(by_colour.items())]
        key_steps.append([total, total.replace(" ", ""), f"{answer} squares", f"total = {answer}",
                          f"total is {answer}"])
        rationale = "The question asks for the total number of squares, so count each colour and add."
    else:
        target = rng.choice(sorted({c for _, c in squares}) if rng.random() < 0.8 else list(COLOURS))
        answer = by_colour.get(target, 0)
        question = f"How many {target} squares are there?"
        steps = [f"Look only at the {target} squares and ignore the other colours.",
                 f"Count them: {answer} {target}."]
        key_steps = [_count_forms(target, answer)]
        rationale = f"The question asks only about {target} squares."
    return Problem(img, question, str(answer), description, rationale, steps, key_steps)


def task_bars(rng: random.Random, level: int, size: int) -> Problem:
    n_bars = {1: 3, 2: 3, 3: 4}[level]
    letters = "ABCD"[:n_bars]
    if level == 1:
        heights = rng.sample(range(2, 10), n_bars)  # distinct, so "tallest" is unambiguous
    else:
        heights = [rng.randint(1, 9) for _ in range(n_bars)]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(max(8, size // 9))
    left, bottom, top = size // 8, size - size // 6, size // 12
    unit = (bottom - top) / 9
    for t in range(0, 10, 3):  # gridlines at 0, 3, 6, 9 so heights can be read
        yy = bottom - t * unit
        draw.line([left, yy, size - 2, yy], fill=(150, 145, 135))
        draw.text((1, yy - size // 18), str(t), fill=(20, 20, 20), font=_font(max(7, size // 12)))
    slot = (size - left - 2) / n_bars
    palette = list(COLOURS.values())
    for i, h in enumerate(heights):
        x0 = left + i * slot + slot * 0.2
        draw.rectangle([x0, bottom - h * unit, x0 + slot * 0.6, bottom], fill=palette[i % len(palette)])
        draw.text((x0 + slot * 0.1, bottom + 1), letters[i], fill=(10, 10, 10), font=font)
    values = ", ".join(f"{c}={h}" for c, h in zip(letters, heights))
    description = f"A bar chart with bars {', '.join(letters)}; their heights are {values}."
    read = [[f"{c} = {h}", f"{c}={h}", f"bar {c} is {h}", f"{c}: {h}"] for c, h in zip(letters, heights)]
    if level == 1:
        best = letters[heights.index(max(heights))]
        question = "Which bar is the tallest? Answer with its letter."
        steps = [f"Read the heights: {values}.", f"The largest height is {max(heights)}, bar {best}."]
        key_steps = read + [[f"bar {best}", f"{best} is the tallest", f"tallest is {best}", f"{best} = {max(heights)}"]]
        rationale, answer = "Compare the heights of all bars.", best
    elif level == 2:
        i = rng.randrange(n_bars)
        question = f"What is the height of bar {letters[i]}?"
        steps = [f"Find bar {letters[i]} and read its top against the gridlines: {letters[i]} = {heights[i]}."]
        key_steps = [read[i]]
        rationale, answer = f"Only bar {letters[i]} matters.", str(heights[i])
    else:
        i, j = sorted(rng.sample(range(n_bars), 2))
        s = heights[i] + heights[j]
        question = f"What is the sum of the heights of bars {letters[i]} and {letters[j]}?"
        steps = [f"Read bar {letters[i]}: {letters[i]} = {heights[i]}.",
                 f"Read bar {letters[j]}: {letters[j]} = {heights[j]}.",
                 f"Add them: {heights[i]} + {heights[j]} = {s}."]
        key_steps = [read[i], read[j], [f"{heights[i]} + {heights[j]} = {s}", f"{heights[i]}+{heights[j]}={s}",
                                        f"{heights[j]} + {heights[i]} = {s}", f"sum is {s}"]]
        rationale, answer = f"Read bars {letters[i]} and {letters[j]}, then add.", str(s)
    return Problem(img, question, answer, description, rationale, steps, key_steps)


def task_digits(rng: random.Random, level: int, size: int) -> Problem:
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    n = {1: 1, 2: 2, 3: 3}[level]
    digits = [rng.randint(0 if level == 1 else 1, 9) for _ in range(n)]
    font = _font(size // 2 if n == 1 else size // 3)
    cell = size / n
    for i, d in enumerate(digits):
        colour = rng.choice(list(COLOURS.values()))
        x = i * cell + cell * 0.25 + rng.uniform(-cell * 0.05, cell * 0.05)
        y = size * 0.25 + rng.uniform(-size * 0.08, size * 0.08)
        draw.text((x, y), str(d), fill=colour, font=font)
    shown = ", ".join(map(str, digits))
    description = f"The image shows the digit{'s' if n > 1 else ''} {shown}, left to right."
    if level == 1:
        question, answer = "Which digit is shown in the image?", str(digits[0])
        steps = [f"Read the digit: {digits[0]}."]
        key_steps = [[f"digit: {digits[0]}", f"digit is {digits[0]}", f"read the digit: {digits[0]}",
                      NUMBER_WORDS[digits[0]]]]
        rationale = "Read the single digit."
    elif level == 2:
        a, b = digits
        question, answer = "What is the sum of the two digits in the image?", str(a + b)
        steps = [f"Read the digits: {a} and {b}.", f"Add them: {a} + {b} = {a + b}."]
        key_steps = [[f"{a} and {b}", f"{a}, {b}", f"digits are {a} and {b}"],
                     [f"{a} + {b} = {a + b}", f"{a}+{b}={a + b}", f"{b} + {a} = {a + b}", f"sum is {a + b}"]]
        rationale = "Read both digits, then add them."
    else:
        a, b, c = digits
        r = a * b + c
        question = "Call the digits a, b, c from left to right. What is a*b + c?"
        answer = str(r)
        steps = [f"Read the digits: a = {a}, b = {b}, c = {c}.", f"Multiply: {a} * {b} = {a * b}.",
                 f"Add c: {a * b} + {c} = {r}."]
        key_steps = [[f"a = {a}", f"a={a}"], [f"b = {b}", f"b={b}"], [f"c = {c}", f"c={c}"],
                     [f"{a} * {b} = {a * b}", f"{a}*{b}={a * b}", f"{a} \\times {b} = {a * b}", f"{a} x {b} = {a * b}"],
                     [f"{a * b} + {c} = {r}", f"{a * b}+{c}={r}"]]
        rationale = "Read the three digits, multiply the first two, then add the third."
    return Problem(img, question, answer, description, rationale, steps, key_steps)


def task_colour(rng: random.Random, level: int, size: int) -> Problem:
    """Which colour is the largest square (levels 1-2: 2 or 3-4 squares) or the smallest (level 3: 4 squares)."""
    n = {1: 2, 2: rng.randint(3, 4), 3: 4}[level]
    names = rng.sample(list(COLOURS), n)
    lo, hi = max(5, size // 14), max(9, size // 4)
    gap = 4 if level == 1 else 2   # distinct sides, clearly so at level 1
    sides = rng.sample(range(lo, hi + 1, gap), n)
    squares = list(zip(_place_squares(rng, size, n, lo, hi, sides), names))
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for (x, y, s), colour in squares:
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=COLOURS[colour])
    which = "smallest" if level == 3 else "largest"
    ranked = sorted(squares, key=lambda q: q[0][2], reverse=which == "largest")
    answer = ranked[0][1]
    listing = ", ".join(f"{c} ({s[2]} px)" for s, c in ranked)
    steps = [f"Compare the sizes of the squares: {listing}.", f"The {which} square is {answer}."]
    key_steps = [[f"{which} square is {answer}", f"{answer} is the {which}", f"{which} is {answer}",
                  f"{answer} square is the {which}"]]
    return Problem(img, f"What colour is the {which} square?", answer,
                   f"The image shows {n} squares of different sizes: {', '.join(names)}.",
                   f"The question asks for the colour of the {which} square, so compare their sizes.", steps, key_steps)


TASKS: dict[str, Callable[[random.Random, int, int], Problem]] = {
    "count": task_count, "bars": task_bars, "digits": task_digits, "colour": task_colour}


def solution_text(p: Problem) -> str:
    """The R1-VL step-formatted reference solution."""
    steps = " ".join(f"### Step {i}: {s}" for i, s in enumerate(p.steps, 1))
    return (f"### Image Description: {p.description} ### Rationales: {p.rationale} "
            f"### Let's think step by step. {steps} ### The final answer is: {p.answer}")


def make_row(seed: int, split: str, i: int, tasks: list[str], levels: list[int], size: int, image_dir: Path,
             image_prefix: str) -> dict:
    rng = random.Random(f"megaapo-synth/{seed}/{split}/{i}")
    task = tasks[rng.randrange(len(tasks))]
    level = levels[rng.randrange(len(levels))]
    p = TASKS[task](rng, level, size)
    name = f"{split}_{i:06d}.png"
    p.image.save(image_dir / name, format="PNG")
    return {"id": f"{split}-{i}", "images": [f"{image_prefix}{name}"], "question": p.question, "answer": p.answer,
            "solution": solution_text(p), "key_steps": p.key_steps, "thinking": " ".join(p.steps),
            "task": task, "level": level}


def generate(out: str | Path, n_train: int, n_eval: int = 200, seed: int = 0, tasks: list[str] | None = None,
             levels: list[int] | None = None, image_size: int = 112, progress: bool = True) -> dict[str, Path]:
    """Render the train and held-out splits into `out`; returns {"train": path, "eval": path}."""
    tasks = list(tasks or TASKS)
    levels = list(levels or [1, 2, 3])
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; tasks: {', '.join(TASKS)}")
    out = Path(out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = range(n)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, desc=f"rendering {split}", unit="img")
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for i in rows:
                f.write(json.dumps(make_row(seed, split, i, tasks, levels, image_size, image_dir, "images/")) + "\n")
        tmp.replace(path)
        paths[split] = path
    return paths
