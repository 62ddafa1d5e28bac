"""Evaluation tasks: problems with their prompts, and how a model's output is scored.

| task | data (see `dllm_cache.eval.data`) | prompt | scored by |
| --- | --- | --- | --- |
| tiny-gsm | generated (seed 1234, split test: held-out names) | the question | GSM8K answer rules (`answers.py`) |
| tiny-gsm-paraphrase | the same, every word problem in a phrasing reserved for testing | the question | GSM8K answer rules |
| tiny-gsm-pairs | generated pair problems (seed 1234, split test): split a total in two | the question | any two positive numbers with that sum |
| gsm8k | gsm8k/test.jsonl (+ train.jsonl for shots) | chat: zero-shot; base: 4-shot | the number after ``####``, else the last number |
| math500 | math500/test.jsonl | chat: zero-shot, ``\\boxed{}``; base: 4-shot (Minerva) | last ``\\boxed{}``, LaTeX equivalence (`math_answers.py`) |
| humaneval | humaneval/HumanEval.jsonl.gz | chat: complete the function in a code block; base: the raw prompt | pass@1: the tests run on prompt + completion (`execution.py`) |
| mbpp | mbpp/mbpp.jsonl (tasks 11-510; shots from 2, 3, 4, ...) | "You are an expert Python programmer..." (base: 3-shot, [BEGIN]/[DONE]) | pass@1: the three asserts |

Chat or base prompts: a model whose tokenizer has a chat template gets zero-shot chat prompts, one
without gets the task's few-shot raw prompts; ``fewshot=N`` forces N-shot raw prompts (N = 0: raw
zero-shot on a base model, chat zero-shot on a chat model).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dllm_cache.demo.tasks import generate_pair_problems, generate_problems, pair_is_right
from dllm_cache.errors import DllmCacheError
from dllm_cache.eval.answers import answers_match, extract_answer
from dllm_cache.eval.data import data_file, read_jsonl
from dllm_cache.eval.execution import extract_code, run_program, truncate_at
from dllm_cache.eval.math_answers import extract_math_answer, last_boxed, math_equal

# The fixed held-out tiny-GSM sets: split "test" of the generator with this seed, and the share of
# word problems in a phrasing reserved for testing (see `dllm_cache.demo.tasks`).
TINY_GSM_SEED = 1234
TINY_GSM_PHRASING = {"tiny-gsm": 0.0, "tiny-gsm-paraphrase": 1.0}
DEFAULT_EXEC_TIMEOUT_S = 10.0


@dataclass
class Problem:
    id: str
    prompt: str
    gold: str
    kind: str = "gsm"  # how an output is scored: gsm | pair | math | humaneval | mbpp
    chat: bool = True  # wrap the prompt in the model's chat template
    stop: tuple[str, ...] = ()  # the output is cut at the first of these before scoring
    meta: dict[str, Any] = field(default_factory=dict)  # code tasks: tests, entry point, timeout


@dataclass
class Score:
    prediction: str | None  # the extracted answer (or code)
    correct: bool
    detail: str | None = None  # code tasks: "passed", "failed: ...", "timed out after Ns"


@dataclass(frozen=True)
class TaskInfo:
    files: tuple[str, ...]  # data files, relative to the data folder
    base_fewshot: int  # shots for a model without a chat template
    max_fewshot: int


TASKS: dict[str, TaskInfo] = {
    "tiny-gsm": TaskInfo((), 0, 0),
    "tiny-gsm-paraphrase": TaskInfo((), 0, 0),
    "tiny-gsm-pairs": TaskInfo((), 0, 0),
    "gsm8k": TaskInfo(("gsm8k/test.jsonl", "gsm8k/train.jsonl"), 4, 7473),
    "math500": TaskInfo(("math500/test.jsonl",), 4, 4),
    "humaneval": TaskInfo(("humaneval/HumanEval.jsonl.gz",), 0, 0),
    "mbpp": TaskInfo(("mbpp/mbpp.jsonl",), 3, 10),
}


def task_info(task: str) -> TaskInfo:
    if task not in TASKS:
        raise DllmCacheError(f"unknown task {task!r} (available: {', '.join(TASKS)})")
    return TASKS[task]


def check_task_data(task: str, data_dir: str | None = None) -> None:
    """Fail early (before a model is loaded) with the name of a missing data file."""
    for f in task_info(task).files:
        data_file(f, data_dir)


def resolve_prompting(task: str, fewshot: int | None, chat_model: bool) -> tuple[int, bool]:
    """(shots, chat) for a task: chat models zero-shot chat, others the task's few-shot default."""
    info = task_info(task)
    if fewshot is None:
        fewshot = 0 if chat_model else info.base_fewshot
    if fewshot < 0:
        raise DllmCacheError(f"--fewshot must be >= 0, got {fewshot}")
    if fewshot > info.max_fewshot:
        raise DllmCacheError(f"{task} has at most {info.max_fewshot} few-shot examples, asked for {fewshot}")
    return fewshot, chat_model and fewshot == 0


def load_task(
    task: str,
    limit: int | None = None,
    *,
    data_dir: str | None = None,
    fewshot: int | None = None,
    chat: bool = True,
    exec_timeout_s: float = DEFAULT_EXEC_TIMEOUT_S,
) -> list[Problem]:
    """The first `limit` problems of `task` (all when None; the generated tiny-gsm tasks: 500).

    `chat`: whether the model has a chat template (and chat prompts are wanted); with `fewshot`
    (None: the default for chat / base models) it decides the prompt format, see the module docstring.
    """
    if limit is not None and limit < 1:
        raise DllmCacheError(f"--limit must be positive, got {limit}")
    shots, use_chat = resolve_prompting(task, fewshot, chat)
    check_task_data(task, data_dir)
    if task in TINY_GSM_PHRASING:
        n = limit or 500
        problems = generate_problems(n, "test", TINY_GSM_SEED, held_out_phrasing=TINY_GSM_PHRASING[task])
        return [Problem(f"{task}/{i}", p.question, p.final, chat=chat) for i, p in enumerate(problems)]
    if task == "tiny-gsm-pairs":
        return [
            Problem(
                f"{task}/{i}", p.question, p.final, kind="pair", chat=chat, meta={"total": _pair_sum(p.final)}
            )
            for i, p in enumerate(generate_pair_problems(limit or 500, "test", TINY_GSM_SEED))
        ]
    loader: Callable[..., list[Problem]] = _LOADERS[task]
    return loader(limit, data_dir, shots, use_chat, exec_timeout_s)


# ---------------------------------------------------------------- GSM8K

GSM8K_CHAT_SUFFIX = (
    '\nSolve the problem step by step, then give the final number on a last line "#### <number>".'
)
_CALC_RE = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "2*3=<<2*3=6>>6"


def _gsm8k(limit: int | None, data_dir: str | None, shots: int, chat: bool, _t: float) -> list[Problem]:
    rows = read_jsonl(data_file("gsm8k/test.jsonl", data_dir))[:limit]
    prefix = ""
    if shots:
        train = read_jsonl(data_file("gsm8k/train.jsonl", data_dir))[:shots]
        prefix = "".join(
            f"Question: {ex['question']}\nAnswer: {_CALC_RE.sub('', ex['answer'])}\n\n" for ex in train
        )
    problems = []
    for i, row in enumerate(rows):
        gold = extract_answer(row["answer"])
        if gold is None:
            raise DllmCacheError(f"gsm8k/test.jsonl row {i + 1}: no '####' answer")
        if chat:
            prompt, stop = row["question"] + GSM8K_CHAT_SUFFIX, ()
        else:
            prompt, stop = f"{prefix}Question: {row['question']}\nAnswer:", ("Question:", "\n\n\n")
        problems.append(Problem(f"gsm8k/{i}", prompt, gold, "gsm", chat, stop))
    return problems


# ---------------------------------------------------------------- MATH-500

MATH_CHAT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
# The four fixed examples of Minerva (Lewkowycz et al., 2022), the usual MATH few-shot prompt.
MATH_FEWSHOT: tuple[tuple[str, str], ...] = (
    (
        "Find the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so "
        "$x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, "
        "so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
        "Final Answer: The final answer is $[2,5)$. I hope it is correct.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
        "$\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = "
        "(2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, "
        "how many times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ "
        "pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total "
        "of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:"
        "\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
        "Final Answer: The final answer is $16$. I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a "
        "solution $(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is "
        "nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$"
        "Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}="
        "\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is "
        "correct.",
    ),
)


def _math500(limit: int | None, data_dir: str | None, shots: int, chat: bool, _t: float) -> list[Problem]:
    rows = read_jsonl(data_file("math500/test.jsonl", data_dir))[:limit]
    prefix = "".join(f"Problem:\n{q}\n\nSolution:\n{a}\n\n" for q, a in MATH_FEWSHOT[:shots])
    problems = []
    for i, row in enumerate(rows):
        gold = last_boxed(row["answer"])
        if gold is None:
            raise DllmCacheError(f"math500/test.jsonl row {i + 1}: no \\boxed{{}} answer")
        if chat:
            prompt, stop = row["question"] + MATH_CHAT_SUFFIX, ()
        else:
            prompt, stop = f"{prefix}Problem:\n{row['question']}\n\nSolution:\n", ("\nProblem:",)
        problems.append(Problem(f"math500/{i}", prompt, gold, "math", chat, stop))
    return problems


# ---------------------------------------------------------------- HumanEval

HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
HUMANEVAL_CHAT = (
    "Complete the following Python function. Reply with the complete function in one ```python code "
    "block.\n\n```python\n{prompt}```"
)


def _humaneval(
    limit: int | None, data_dir: str | None, shots: int, chat: bool, timeout_s: float
) -> list[Problem]:
    rows = read_jsonl(data_file("humaneval/HumanEval.jsonl.gz", data_dir))[:limit]
    problems = []
    for row in rows:
        meta = {
            "prompt": row["prompt"],
            "test": row["test"],
            "entry_point": row["entry_point"],
            "timeout_s": timeout_s,
        }
        if chat:
            prompt, stop = HUMANEVAL_CHAT.format(prompt=row["prompt"]), ()
        else:
            prompt, stop = row["prompt"], HUMANEVAL_STOPS
        problems.append(
            Problem(row["task_id"], prompt, row["canonical_solution"], "humaneval", chat, stop, meta)
        )
    return problems


def humaneval_program(problem: Problem, output: str) -> tuple[str, str]:
    """(the code taken from the output, the program that tests it)."""
    m = problem.meta
    entry = m["entry_point"]
    if problem.chat or "```" in output:
        code = extract_code(output, entry)
    else:
        code = output
    if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        # A whole function: after the prompt (its imports and helpers), so it replaces the stub.
        body = m["prompt"] + "\n\n" + code
    else:  # a continuation of the prompt (the function body)
        body = m["prompt"] + code
    return code, f"{body}\n\n{m['test']}\n\ncheck({entry})\n"


# ---------------------------------------------------------------- MBPP

MBPP_TEST_IDS = range(11, 511)
MBPP_SHOT_IDS = (2, 3, 4, 1, 5, 6, 7, 8, 9, 10)  # the usual 3-shot prompt uses tasks 2, 3, 4
_NOT_ENTRY = {"set", "sorted", "math", "isclose", "abs", "round", "list", "tuple", "str", "int", "float"}


def mbpp_prompt(text: str, tests: list[str]) -> str:
    """The standard MBPP prompt (Austin et al., 2021)."""
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n"
    )


def _mbpp_entry(tests: list[str]) -> str | None:
    for name in re.findall(r"(\w+)\s*\(", tests[0] if tests else ""):
        if name not in _NOT_ENTRY:
            return name
    return None


def _mbpp(limit: int | None, data_dir: str | None, shots: int, chat: bool, timeout_s: float) -> list[Problem]:
    rows = read_jsonl(data_file("mbpp/mbpp.jsonl", data_dir))
    by_id = {int(r["task_id"]): r for r in rows}
    missing = [i for i in (*MBPP_TEST_IDS, *MBPP_SHOT_IDS[:shots]) if i not in by_id]
    if missing:
        raise DllmCacheError(f"mbpp/mbpp.jsonl lacks task ids {missing[:5]} (expected the full 974)")
    prefix = "".join(
        mbpp_prompt(by_id[i]["text"], by_id[i]["test_list"])
        + "[BEGIN]\n"
        + by_id[i]["code"].replace("\r\n", "\n").strip()
        + "\n[DONE]\n\n"
        for i in MBPP_SHOT_IDS[:shots]
    )
    problems = []
    for task_id in list(MBPP_TEST_IDS)[:limit]:
        row = by_id[task_id]
        meta = {
            "tests": row["test_list"],
            "setup": row.get("test_setup_code") or "",
            "entry_point": _mbpp_entry(row["test_list"]),
            "timeout_s": timeout_s,
        }
        base = mbpp_prompt(row["text"], row["test_list"])
        if chat:
            prompt, stop = base, ()
        else:
            prompt, stop = prefix + base + "[BEGIN]\n", ("[DONE]",)
        gold = row["code"].replace("\r\n", "\n")
        problems.append(Problem(f"mbpp/{task_id}", prompt, gold, "mbpp", chat, stop, meta))
    return problems


def mbpp_program(problem: Problem, output: str) -> tuple[str, str]:
    m = problem.meta
    if problem.chat or "```" in output:
        code = extract_code(output, m.get("entry_point"))
    else:
        code = output.replace("[BEGIN]", "")
    return code, f"{m['setup']}\n{code}\n\n" + "\n".join(m["tests"]) + "\n"


_LOADERS: dict[str, Callable[..., list[Problem]]] = {
    "gsm8k": _gsm8k,
    "math500": _math500,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
}


# ---------------------------------------------------------------- scoring


def _pair_sum(final: str) -> int:
    return sum(int(x) for x in final.split(","))


def score(problem: Problem, output: str) -> Score:
    """Extract the answer from a model output (cut at the problem's stop sequences) and grade it."""
    text = truncate_at(output, problem.stop)
    if problem.kind == "gsm":
        pred = extract_answer(text)
        return Score(pred, answers_match(pred, problem.gold))
    if problem.kind == "pair":  # several answers are right: two positive numbers with the sum
        pred = extract_answer(text)
        return Score(pred, pair_is_right(pred, problem.meta["total"]))
    if problem.kind == "math":
        pred = extract_math_answer(text)
        return Score(pred, math_equal(pred, problem.gold))
    if problem.kind in ("humaneval", "mbpp"):
        build = humaneval_program if problem.kind == "humaneval" else mbpp_program
        code, program = build(problem, text)
        result = run_program(program, problem.meta.get("timeout_s", DEFAULT_EXEC_TIMEOUT_S))
        return Score(code, result.passed, result.status)
    raise DllmCacheError(f"unknown problem kind {problem.kind!r}")


def score_batch(problems: list[Problem], outputs: list[str], workers: int | None = None) -> list[Score]:
    """Score a batch; code is executed in parallel subprocesses (one thread waits on each)."""
    if not any(p.kind in ("humaneval", "mbpp") for p in problems) or len(problems) == 1:
        return [score(p, o) for p, o in zip(problems, outputs, strict=True)]
    import os

    n = workers or min(len(problems), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        return list(pool.map(score, problems, outputs))
