"""The "tiny GSM" task: seeded, verifiable word problems in GSM8K's answer format.

Each problem has a short step-by-step solution ending with ``#### <answer>``, exactly GSM8K's
format, so the same extractor (`dllm_cache.eval.answers`) scores tiny GSM and real GSM8K.

Two kinds of problems:

* word problems (the majority, ``word_problem_fraction``): 1-2 arithmetic steps over small
  integers (question numbers <= 20, every result between 0 and 100) in several families
  (shopping, ages, rates, sharing, gain/loss, comparison);
* warm-up skills with the same format: arithmetic on two or three numbers, sorting 3-4 numbers,
  reversing a word list and copying a phrase (the last three have a text answer).

The test split measures generalisation rather than memorisation, and no test question text
appears in the train split of any seed:

* word problems in the test split use a reserved, disjoint list of names (every word-problem
  question contains a name);
* warm-up questions carry no name, so their content is partitioned instead: a fixed hash of the
  question text sends each possible question to exactly one split. The arithmetic facts they test
  still occur in training through the word problems.

Each word-problem template also has phrasings that exist only for testing (``held_out_phrasing``,
test split only; the eval task ``tiny-gsm-paraphrase`` uses them for every word problem). They are
off in the default test split, on which the demo models are scored: many reserved phrasings bring
words the train split never contains ("finds 6 more", "in total"), whose meaning a model trained
from scratch on this data cannot know; the others give the facts in another order.

Number ranges are deliberately *not* held out: numbers are single tokens, and a tiny model cannot
produce a number token it has never been trained to emit.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "test"]

# Operands up to 10 keep the addition/subtraction facts few enough for 2 CPU cores to learn: with
# operands up to 20 (and two-step results near 100) the 4-layer demo model plateaued at 47% held-out,
# failing mostly on facts like 12 + 6 and on two-step chains (8%).
MAX_OPERAND = 10  # largest number that appears in a question
MAX_RESULT = 100  # largest intermediate or final result
BILLS = (10, 20)  # the banknotes of the shopping problems: the only question numbers above MAX_OPERAND


@dataclass(frozen=True)
class Problem:
    """One tiny-GSM problem; ``answer`` is the full solution, ending with the line ``#### final``."""

    question: str
    answer: str
    final: str
    family: str


@dataclass(frozen=True)
class _Person:
    name: str
    he: str  # subject pronoun

    @property
    def He(self) -> str:  # noqa: N802 - reads naturally in the templates
        return self.he.capitalize()


def _people(spec: str) -> tuple[_Person, ...]:
    out = []
    for item in spec.split():
        name, sex = item.split("/")
        out.append(_Person(name, "he" if sex == "m" else "she"))
    return tuple(out)


# Disjoint name lists: every word-problem question contains a name, so this alone keeps test
# word problems out of the train split.
TRAIN_NAMES = _people(
    "Tom/m Anna/f Ben/m Lily/f Sam/m Emma/f Jack/m Mia/f Leo/m Zoe/f Max/m Ella/f Noah/m Ava/f "
    "Luke/m Ruby/f Adam/m Grace/f Owen/m Chloe/f Ryan/m Lucy/f Eric/m Nora/f Paul/m Kate/f "
    "Dan/m Amy/f Finn/m Ivy/f"
)
TEST_NAMES = _people(
    "Oscar/m Hannah/f Victor/m Maya/f Felix/m Clara/f Hugo/m Julia/f Ivan/m Rosa/f Omar/m "
    "Tina/f Carl/m Nina/f Alex/m Jade/f"
)

# Countable things (plural). Shared by both splits: they are ordinary vocabulary.
ITEMS = (
    "apples pencils marbles stickers cookies books cards shells stamps balloons eggs flowers "
    "toys candies oranges cupcakes rocks coins"
).split()
SHOP_ITEMS = "pens notebooks apples toys books cups hats balls erasers kites".split()
# (third person verb, base verb, unit, time unit) for rate problems.
ACTIVITIES = (
    ("reads", "read", "pages", "day"),
    ("walks", "walk", "miles", "day"),
    ("earns", "earn", "dollars", "hour"),
    ("bakes", "bake", "cookies", "hour"),
    ("paints", "paint", "pictures", "week"),
    ("saves", "save", "dollars", "week"),
)
_NOT_LOSABLE = {"pages", "miles"}  # "then loses 5 miles" is not a sensible question
WORDS = (
    "red blue green cat dog sun moon tree box cup hat ball fish bird star book car boat lamp "
    "door milk cake rain snow leaf rock bell coin kite ship"
).split()


# --------------------------------------------------------------------------------------------
# Helpers


def _solution(lines: Iterable[str], final: object) -> str:
    return "\n".join([*lines, f"#### {final}"])


def _pick(rng: random.Random, held_out_phrasing: float, train: list[str], test_only: list[str]) -> str:
    """A phrasing: one of ``test_only`` with probability ``held_out_phrasing``, else one of ``train``."""
    # (the rng is drawn from only when enabled, so the train stream does not depend on it)
    if held_out_phrasing and test_only and rng.random() < held_out_phrasing:
        return rng.choice(test_only)
    return rng.choice(train)


def _two(rng: random.Random, names: tuple[_Person, ...]) -> tuple[_Person, _Person]:
    a, b = rng.sample(names, 2)
    return a, b


# A word-problem generator returns (question, solution lines without the final, final value).
# The generators fill their question templates with `q.format(**locals(), ...)`: the template
# fields are exactly the local variable names, which keeps each template next to its numbers.
_WordGen = Callable[[random.Random, float, tuple[_Person, ...], bool], tuple[str, list[str], int]]


# --------------------------------------------------------------------------------------------
# Word-problem families. Each takes (rng, held_out_phrasing, names, two_step).


def _shopping(rng: random.Random, held_out_phrasing: float, names: tuple[_Person, ...], two_step: bool):
    p = rng.choice(names)
    item = rng.choice(SHOP_ITEMS)
    if not two_step:
        a, price = rng.randint(2, 9), rng.randint(2, 10)
        r = a * price
        q = _pick(
            rng,
            held_out_phrasing,
            [
                "{N} buys {a} {item} for ${price} each. How much does {he} spend?",
                "{N} buys {a} {item} that cost ${price} each. How much money does {he} spend?",
            ],
            ["{N} buys {a} {item} that cost ${price} each. How much does {he} spend in total?"],
        )
        lines = [f"{a} * {price} = {r} dollars"]
    elif rng.random() < 0.5:
        bill = rng.choice(BILLS)
        a = rng.randint(2, 5)
        price = rng.randint(1, bill // a)
        c = a * price
        r = bill - c
        q = _pick(
            rng,
            held_out_phrasing,
            [
                "{N} buys {a} {item} for ${price} each and pays with a ${bill} bill. "
                "How much change does {he} get?",
            ],
            [
                "{N} pays with a ${bill} bill for {a} {item} that cost ${price} each. How much change does {he} get?"
            ],
        )
        lines = [f"{a} * {price} = {c} dollars", f"{bill} - {c} = {r} dollars"]
    else:
        a, price = rng.randint(2, 5), rng.randint(1, 10)
        extra = rng.randint(1, MAX_OPERAND)
        c = a * price
        r = c + extra
        q = _pick(
            rng,
            held_out_phrasing,
            [
                "{N} buys {a} {item} for ${price} each and a bag for ${extra}. "
                "How much does {he} spend in total?",
            ],
            [
                "{N} buys a bag for ${extra} and {a} {item} for ${price} each. How much does {he} spend in total?"
            ],
        )
        lines = [f"{a} * {price} = {c} dollars", f"{c} + {extra} = {r} dollars"]
    return q.format(**locals(), N=p.name, he=p.he), lines, r


def _ages(rng: random.Random, held_out_phrasing: float, names: tuple[_Person, ...], two_step: bool):
    p, m = _two(rng, names)
    a = rng.randint(5, MAX_OPERAND)
    older = rng.random() < 0.5
    d = rng.randint(1, MAX_OPERAND) if older else rng.randint(1, a - 1)
    x = a + d if older else a - d
    rel = "older" if older else "younger"
    step1 = f"{a} {'+' if older else '-'} {d} = {x} years"
    if not two_step:
        q = _pick(
            rng,
            held_out_phrasing,
            ["{N} is {a} years old. {M} is {d} years {rel} than {N}. How old is {M}?"],
            ["{M} is {d} years {rel} than {N}. {N} is {a} years old. How old is {M}?"],
        )
        lines, r = [step1], x
    elif rng.random() < 0.5:
        k = rng.randint(1, 10)
        r = x + k
        q = _pick(
            rng,
            held_out_phrasing,
            ["{N} is {a} years old. {M} is {d} years {rel} than {N}. How old will {M} be in {k} years?"],
            ["{N} is {a} years old and {M} is {d} years {rel} than {N}. How old will {M} be in {k} years?"],
        )
        lines = [step1, f"{x} + {k} = {r} years"]
    else:
        r = a + x
        q = _pick(
            rng,
            held_out_phrasing,
            ["{N} is {a} years old. {M} is {d} years {rel} than {N}. What is the sum of their ages?"],
            ["{N} is {a} years old and {M} is {d} years {rel} than {N}. What is the sum of their ages?"],
        )
        lines = [step1, f"{a} + {x} = {r} years"]
    return q.format(**locals(), N=p.name, M=m.name), lines, r


def _rates(rng: random.Random, held_out_phrasing: float, names: tuple[_Person, ...], two_step: bool):
    p = rng.choice(names)
    # 0: one step; 1: then k more; 2: then loses k (only for things one can lose).
    variant = 0 if not two_step else rng.choice([1, 2])
    activities = [act for act in ACTIVITIES if act[2] not in _NOT_LOSABLE] if variant == 2 else ACTIVITIES
    v3, v, unit, time = rng.choice(activities)
    rate = rng.randint(2, MAX_OPERAND)
    n = rng.randint(2, min(9, MAX_RESULT // rate))
    x = rate * n
    step1 = f"{rate} * {n} = {x} {unit}"
    if variant == 0:
        q = _pick(
            rng,
            held_out_phrasing,
            [
                "{N} {v3} {rate} {unit} every {time}. How many {unit} does {he} {v} in {n} {time}s?",
                "{N} {v3} {rate} {unit} each {time}. How many {unit} does {he} {v} in {n} {time}s?",
            ],
            ["How many {unit} does {N} {v} in {n} {time}s? {He} {v3} {rate} {unit} every {time}."],
        )
        lines, r = [step1], x
    elif variant == 1:
        k = rng.randint(1, max(1, min(MAX_OPERAND, MAX_RESULT - x)))
        r = x + k
        q = _pick(
            rng,
            held_out_phrasing,
            [
                "{N} {v3} {rate} {unit} every {time} for {n} {time}s. Then {he} {v3} {k} more. "
                "How many {unit} does {he} {v} in all?"
            ],
            [
                "{N} {v3} {rate} {unit} every {time} for {n} {time}s and then {k} more. How many {unit} does {he} {v} in all?"
            ],
        )
        lines = [step1, f"{x} + {k} = {r} {unit}"]
    else:
        k = rng.randint(1, min(MAX_OPERAND, x))
        r = x - k
        q = _pick(
            rng,
            held_out_phrasing,
            [
                "{N} {v3} {rate} {unit} every {time} for {n} {time}s. Then {he} loses {k} of them. "
                "How many {unit} are left?"
            ],
            [
                "{N} {v3} {rate} {unit} each {time} for {n} {time}s and then loses {k} of them. How many {unit} are left?"
            ],
        )
        lines = [step1, f"{x} - {k} = {r} {unit}"]
    return q.format(**locals(), N=p.name, he=p.he, He=p.He), lines, r


def _sharing(rng: random.Random, held_out_phrasing: float, names: tuple[_Person, ...], two_step: bool):
    p = rng.choice(names)
    item = rng.choice(ITEMS)
    k = rng.randint(2, 5)
    if not two_step:
        each = rng.randint(2, MAX_OPERAND // k)
        a = k * each
        if rng.random() < 0.5:
            q = _pick(
                rng,
                held_out_phrasing,
                [
                    "{N} has {a} {item} and shares them equally among {k} friends. "
                    "How many {item} does each friend get?"
                ],
                ["{N} shares {a} {item} equally among {k} friends. How many {item} does each friend get?"],
            )
            lines = [f"{a} / {k} = {each} {item}"]
        else:
            q = _pick(
                rng,
                held_out_phrasing,
                ["{N} puts {a} {item} into bags of {k}. How many bags does {he} fill?"],
                ["{N} has {a} {item} and puts them into bags of {k}. How many bags does {he} fill?"],
            )
            lines = [f"{a} / {k} = {each} bags"]
        return q.format(**locals(), N=p.name, he=p.he), lines, each
    each = rng.randint(2, (2 * MAX_OPERAND) // k)
    total = k * each
    a = rng.randint(max(1, total - MAX_OPERAND), min(MAX_OPERAND, total - 1))
    b = total - a
    q = _pick(
        rng,
        held_out_phrasing,
        [
            "{N} has {a} {item} and buys {b} more. {He} shares them equally among {k} friends. "
            "How many {item} does each friend get?"
        ],
        [
            "{N} has {a} {item} and then finds {b} more. {He} shares them equally among {k} friends. How many {item} does each friend get?"
        ],
    )
    lines = [f"{a} + {b} = {total} {item}", f"{total} / {k} = {each} {item}"]
    return q.format(**locals(), N=p.name, he=p.he, He=p.He), lines, each


def _gain_loss(rng: random.Random, held_out_phrasing: float, names: tuple[_Person, ...], two_step: bool):
    p, m = _two(rng, names)
    item = rng.choice(ITEMS)
    a = rng.randint(2, MAX_OPERAND)
    if not two_step:
        if rng.random() < 0.5:
            b = rng.randint(1, MAX_OPERAND)
            r = a + b
            q = _pick(
                rng,
                held_out_phrasing,
                [
                    "{N} has {a} {item}. {He} gets {b} more. How many {item} does {he} have now?",
                    "{N} has {a} {item} and buys {b} more. How many {item} does {he} have now?",
                ],
                ["{N} has {a} {item} and then finds {b} more. How many {item} does {he} have now?"],
            )
            lines = [f"{a} + {b} = {r} {item}"]
        else:
            b = rng.randint(1, a)
            r = a - b
            q = _pick(
                rng,
                held_out_phrasing,
                [
                    "{N} has {a} {item}. {He} gives {b} to {M}. How many {item} does {N} have left?",
                    "{N} has {a} {item} and loses {b} of them. How many {item} are left?",
                ],
                ["{N} has {a} {item} and gives {b} of them to {M}. How many {item} does {N} have left?"],
            )
            lines = [f"{a} - {b} = {r} {item}"]
    else:
        b = rng.randint(1, a)
        x = a - b
        c = rng.randint(1, MAX_OPERAND)
        r = x + c
        q = _pick(
            rng,
            held_out_phrasing,
            [
                "{N} has {a} {item}. {He} gives away {b} and then finds {c} more. "
                "How many {item} does {he} have now?",
                "{N} has {a} {item}. {He} loses {b} and then buys {c} more. How many {item} does {he} have now?",
            ],
            [
                "{N} has {a} {item} and gives {b} to {M}. Then {he} buys {c} more. How many {item} does {N} have now?"
            ],
        )
        lines = [f"{a} - {b} = {x} {item}", f"{x} + {c} = {r} {item}"]
    return q.format(**locals(), N=p.name, M=m.name, he=p.he, He=p.He), lines, r


def _compare(rng: random.Random, held_out_phrasing: float, names: tuple[_Person, ...], two_step: bool):
    p, m = _two(rng, names)
    item = rng.choice(ITEMS)
    a = rng.randint(2, MAX_OPERAND)
    if not two_step:
        if rng.random() < 0.5:
            b = rng.randint(1, MAX_OPERAND)
            r = a + b
            q = _pick(
                rng,
                held_out_phrasing,
                ["{N} has {a} {item}. {M} has {b} more {item} than {N}. How many {item} does {M} have?"],
                ["{M} has {b} more {item} than {N}. {N} has {a} {item}. How many {item} does {M} have?"],
            )
            lines = [f"{a} + {b} = {r} {item}"]
        else:
            b = rng.randint(1, a)
            r = a - b
            q = _pick(
                rng,
                held_out_phrasing,
                ["{N} has {a} {item} and {M} has {b}. How many more {item} does {N} have than {M}?"],
                ["{M} has {b} {item} and {N} has {a}. How many more {item} does {N} have than {M}?"],
            )
            lines = [f"{a} - {b} = {r} {item}"]
    else:
        more = rng.random() < 0.5
        b = rng.randint(1, MAX_OPERAND) if more else rng.randint(1, a)
        x = a + b if more else a - b
        r = a + x
        rel = "more" if more else "fewer"
        q = _pick(
            rng,
            held_out_phrasing,
            ["{N} has {a} {item}. {M} has {b} {rel} than {N}. How many {item} do they have together?"],
            ["{N} has {a} {item} and {M} has {b} {rel} than {N}. How many {item} do they have together?"],
        )
        lines = [f"{a} {'+' if more else '-'} {b} = {x} {item}", f"{a} + {x} = {r} {item}"]
    return q.format(**locals(), N=p.name, M=m.name), lines, r


WORD_FAMILIES: dict[str, _WordGen] = {
    "shopping": _shopping,
    "ages": _ages,
    "rates": _rates,
    "sharing": _sharing,
    "gain_loss": _gain_loss,
    "compare": _compare,
}


# --------------------------------------------------------------------------------------------
# Warm-up skills. They return (question, answer, final) without a split; the caller partitions
# them by a hash of the question text.


def _arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    kind = rng.random()
    if kind < 0.4:
        r = a + b
        return f"What is {a} + {b}?", _solution([f"{a} + {b} = {r}"], r), str(r)
    if kind < 0.7:
        a, b = max(a, b), min(a, b)
        r = a - b
        return f"What is {a} - {b}?", _solution([f"{a} - {b} = {r}"], r), str(r)
    x = a + b
    c = rng.randint(0, min(x, MAX_OPERAND))
    r = x - c
    return f"What is {a} + {b} - {c}?", _solution([f"{a} + {b} = {x}", f"{x} - {c} = {r}"], r), str(r)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(MAX_OPERAND + 1), rng.choice([3, 4]))
    s = sorted(nums)
    final = ", ".join(map(str, s))
    question = "Sort from smallest to largest: " + ", ".join(map(str, nums))
    return question, _solution([" < ".join(map(str, s))], final), final


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.choice([3, 4]))
    final = " ".join(reversed(words))
    return "Reverse the words: " + " ".join(words), _solution([], final), final


def _copy(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.choice([3, 4, 5]))]
    final = " ".join(words)
    return "Copy the words: " + final, _solution([], final), final


WARMUP_SKILLS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arith": _arith,
    "sort": _sort,
    "reverse": _reverse,
    "copy": _copy,
}
# The default mix is what the shipped demo models are trained and scored on. Sorting, reversing
# and copying need position arithmetic that a CPU-trained bidirectional model learns slowly (the
# first 45-minute runs scored 0% on them), so they are a small share of the default mix.
WARMUP_WEIGHTS = {"arith": 0.7, "sort": 0.1, "reverse": 0.1, "copy": 0.1}
WORD_PROBLEM_FRACTION = 0.9
# The mix a new demo tokenizer is trained on: every skill well represented, and independent of the
# training mix. (A warm start keeps its checkpoint's tokenizer instead, see demo/train.py.)
TOKENIZER_MIX = {
    "word_problem_fraction": 0.7,
    "two_step_fraction": 0.25,
    "skill_weights": {"arith": 0.4, "sort": 0.2, "reverse": 0.2, "copy": 0.2},
}


_SYLLABLES = (
    "ba be bi bo da de di do fa fe ka ke ki ko la le li lo ma me mi mo na ne ni no pa pe pi po "
    "ra re ri ro sa se si so ta te ti to va ve vi wa we ya yo za zo ar el in or an en on ul"
).split()
_HELD_OUT = {p.name for p in TEST_NAMES} | {p.name for p in TRAIN_NAMES}


def _pseudo_person(rng: random.Random) -> _Person:
    """A made-up name of 2-3 syllables (never a train or test name)."""
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in _HELD_OUT:
            return _Person(name, rng.choice(("he", "she")))


def _is_test_question(question: str) -> bool:
    # A fixed hash (not Python's salted hash()) so the partition is the same in every process.
    return zlib.crc32(question.encode("utf-8")) % 4 == 0


# --------------------------------------------------------------------------------------------
# Public API


def generate_problems(
    n: int,
    split: Split = "train",
    seed: int = 0,
    *,
    word_problem_fraction: float = WORD_PROBLEM_FRACTION,
    two_step_fraction: float = 0.1,  # short chains: what a CPU-trained tiny model can learn
    skill_weights: dict[str, float] | None = None,
    pseudo_name_fraction: float = 0.0,
    held_out_phrasing: float = 0.0,
) -> list[Problem]:
    """``n`` tiny-GSM problems of ``split``, a deterministic function of (split, seed).

    ``word_problem_fraction`` of them are word problems (families chosen uniformly), the rest
    warm-up skills drawn with ``skill_weights`` (default `WARMUP_WEIGHTS`);
    ``two_step_fraction`` of the word problems take two arithmetic steps. Test
    questions are unique within the split (a fixed held-out set should not count a problem
    twice); train questions may repeat.

    ``pseudo_name_fraction`` (train split only) of the word problems use made-up names built from
    syllables instead of the train names. The tokenizer splits an unseen name into several pieces;
    without such names in training a small model learns fixed token offsets and fails on every
    test problem (whose names are held out). Made-up names never coincide with a test name.

    ``held_out_phrasing`` (test split only) of the word problems use a phrasing reserved for
    testing, which no train problem uses.
    """
    _check_split(split, pseudo_name_fraction)
    if held_out_phrasing and split != "test":
        raise ValueError("held_out_phrasing applies to the test split only")
    fractions = (word_problem_fraction, two_step_fraction, pseudo_name_fraction, held_out_phrasing)
    if not all(0.0 <= f <= 1.0 for f in fractions):
        raise ValueError("fractions must lie in [0, 1]")
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes.
    rng = random.Random(f"tiny-gsm/{split}/{seed}")
    names = TEST_NAMES if split == "test" else TRAIN_NAMES
    families = sorted(WORD_FAMILIES)
    skills = sorted(WARMUP_SKILLS)
    weights = WARMUP_WEIGHTS if skill_weights is None else skill_weights
    if set(weights) != set(skills):
        raise ValueError(f"skill_weights must give a weight to each of {', '.join(skills)}")
    skill_weights_list = [weights[s] for s in skills]
    want_test = split == "test"

    def draw() -> Problem | None:
        if rng.random() < word_problem_fraction:
            family = rng.choice(families)
            two_step = rng.random() < two_step_fraction
            people = names
            # (the rng is drawn from only when enabled, so the default stream stays unchanged)
            if pseudo_name_fraction and rng.random() < pseudo_name_fraction:
                people = tuple(_pseudo_person(rng) for _ in range(4))
                if len({p.name for p in people}) < 2:
                    return None
            question, lines, value = WORD_FAMILIES[family](rng, held_out_phrasing, people, two_step)
            return Problem(question, _solution(lines, value), str(value), family)
        family = rng.choices(skills, weights=skill_weights_list)[0]
        # Redraw within the skill until the question belongs to this split, so the
        # partition does not change the mix of families.
        while True:
            question, answer, final = WARMUP_SKILLS[family](rng)
            if _is_test_question(question) == want_test:
                return Problem(question, answer, final, family)

    return _collect(n, split, draw)


def _check_split(split: str, pseudo_name_fraction: float) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if pseudo_name_fraction and split != "train":
        raise ValueError("pseudo_name_fraction applies to the train split only")


def _collect(n: int, split: Split, draw: Callable[[], Problem | None]) -> list[Problem]:
    """``n`` problems from ``draw`` (None: a draw to discard). Test questions are kept unique."""
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} unique {split} problems")
        problem = draw()
        if problem is None:
            continue
        if split == "test":
            if problem.question in seen:
                continue
            seen.add(problem.question)
        problems.append(problem)
    return problems


# --------------------------------------------------------------------------------------------
# Pair problems: several answers are right, and the two numbers must agree


PAIR_FAMILY = "pair"


def _pair(rng: random.Random, names: tuple[_Person, ...]) -> Problem:
    p = rng.choice(names)
    item = rng.choice(ITEMS)
    # Totals up to MAX_OPERAND: the second number is then a subtraction fact the model knows well.
    total = rng.randint(3, MAX_OPERAND)
    a = rng.randint(1, total - 1)
    b = total - a
    q = rng.choice(
        [
            "{N} puts {total} {item} into two boxes, at least one in each. How many {item} can go in each box?",
            "{N} splits {total} {item} into two piles with at least one in each. How many {item} can be in each pile?",
        ]
    )
    final = f"{a}, {b}"
    return Problem(
        q.format(**locals(), N=p.name), _solution([f"{a} + {b} = {total} {item}"], final), final, PAIR_FAMILY
    )


def generate_pair_problems(
    n: int, split: Split = "train", seed: int = 0, *, pseudo_name_fraction: float = 0.0
) -> list[Problem]:
    """``n`` pair problems of ``split``: split a total into two positive parts (``final`` is one
    right answer, "a, b"; any two positive numbers with the right sum are right, see `pair_is_right`).

    Unlike the other problems, the answer is not a function of the question: the first number is a
    free choice and the second must agree with it. A model that decides every position in one pass
    picks each from its own marginal and mostly breaks the sum; iterative decoding commits one, then
    the other in its light. This makes accuracy depend on decoding order and on how stale a cache's
    view of the committed tokens is. Names are held out per split as in `generate_problems`.
    """
    _check_split(split, pseudo_name_fraction)
    rng = random.Random(f"tiny-gsm-pairs/{split}/{seed}")
    names = TEST_NAMES if split == "test" else TRAIN_NAMES

    def draw() -> Problem:
        if pseudo_name_fraction and rng.random() < pseudo_name_fraction:
            return _pair(rng, (_pseudo_person(rng),))
        return _pair(rng, names)

    return _collect(n, split, draw)


def pair_is_right(prediction: str | None, total: int) -> bool:
    """Whether an extracted answer names two positive whole numbers that add up to ``total``."""
    if prediction is None:
        return False
    parts = [x.strip() for x in prediction.split(",")]
    if len(parts) != 2 or not all(x.isdigit() for x in parts):
        return False
    a, b = int(parts[0]), int(parts[1])
    return a >= 1 and b >= 1 and a + b == total


def training_corpus(problems: Iterable[Problem]) -> Iterator[str]:
    """The texts to train a tokenizer on: each problem's question, then its answer."""
    for p in problems:
        yield p.question
        yield p.answer


def names_corpus(repeat: int = 100) -> list[str]:
    """Every name of both splits, at a sentence start and mid-sentence, ``repeat`` times each.

    Optional extra tokenizer text. Without it, the reserved test names (never in the train text)
    split into 3-6 byte-level pieces, so test questions are ~4 tokens longer per name than train
    ones; with it, each name is one token in both positions (an embedding the model never trains,
    but test sequences keep the train layout). It reveals names only, never a test problem.
    """
    texts = [f"{p.name} and {p.name}" for p in TRAIN_NAMES + TEST_NAMES]
    return [t for t in texts for _ in range(repeat)]
