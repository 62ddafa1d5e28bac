r"""MATH-500 answers: the last ``\boxed{...}`` of a solution, and equivalence of LaTeX answers.

Two answers are equal when their normalised forms are equal, when both are the same number
(exact rational comparison: ``\frac{1}{2}``, ``1/2``, ``0.5``, ``\dfrac12`` and ``1\frac{4}{5}``-style
mixed numbers), or when both are tuples / intervals / matrices / lists whose elements are equal
one by one. Normalisation (`normalize_math`) removes what does not change the answer:

* ``$``, ``\left`` / ``\right``, spacing commands (``\!``, ``\,``, ``\quad``), spaces;
* ``\dfrac`` / ``\tfrac`` -> ``\frac``, brace-less ``\frac12`` / ``\sqrt2`` get braces;
* degrees (``^\circ``), percent (``\%``), dollars (``\$``), trailing ``.0``;
* units in ``\text{...}`` / ``\mbox{...}`` after a value (``5.4 \text{ cents}`` -> ``5.4``), and
  unit words after a plain number (``15 degrees``); other ``\text{X}`` become ``X``;
* a leading ``x =`` or ``x \in`` (``x = 5`` -> ``5``);
* thousands separators (``10,\!080``, ``58,500``);
* a multiple-choice letter in parentheses (``(C)`` -> ``C``); words compare case-insensitively.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _group_end(s: str, start: int) -> int | None:
    """Index just past the brace group opening at s[start] == '{', or None if unbalanced."""
    depth = 0
    for i in range(start, len(s)):
        c = s[i]
        if c == "\\":  # an escaped brace (\{ or \}) does not count
            continue
        if c == "{" and (i == 0 or s[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or s[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``, or ``\boxed 5``), nested braces kept."""
    best = max(text.rfind(c) for c in _BOX_COMMANDS)
    if best < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, best))
    rest_at = best + len(cmd)
    rest = text[rest_at:]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):  # "\boxed 5"
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1).rstrip(".") if m else None
    brace = text.find("{", rest_at)
    if brace < 0 or text[rest_at:brace].strip():
        return None
    end = _group_end(text, brace)
    if end is None:  # unbalanced (a truncated generation): take what there is
        return text[brace + 1 :].strip() or None
    return text[brace + 1 : end - 1].strip()


_FINAL_ANSWER_RE = re.compile(
    r"(?:final answer is|the answer is)[:\s]*\$?([^$\n]+?)\$?\s*(?:\.(?=\s|$)|\n|I hope|$)",
    re.IGNORECASE,
)


def extract_math_answer(text: str) -> str | None:
    r"""A model's final answer: the last ``\boxed{}``, else "The (final) answer is X", else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _FINAL_ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def _brace_arg(s: str, i: int) -> tuple[str, int] | None:
    """The argument of a LaTeX command starting at s[i]: a {group}, or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        end = _group_end(s, i)
        if end is None:
            return None
        return s[i + 1 : end - 1], end
    if s[i] == "\\":  # a command as the argument: \frac\pi2
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def _fix_command_args(s: str, command: str, n_args: int) -> str:
    r"""``\frac12`` / ``\frac{270}7`` -> ``\frac{1}{2}`` / ``\frac{270}{7}``; ``\sqrt2`` -> ``\sqrt{2}``."""
    out, i = [], 0
    while (j := s.find(command, i)) >= 0:
        k = j + len(command)
        out.append(s[i:k])
        i = k
        if k < len(s) and s[k].isalpha():  # a longer command name (\sqrtsign), not ours
            continue
        if command == "\\sqrt" and s.startswith("[", k):  # \sqrt[3]{x}
            close = s.find("]", k)
            if close > 0:
                out.append(s[k : close + 1])
                k = close + 1
        for _ in range(n_args):
            arg = _brace_arg(s, k)
            if arg is None:
                break
            out.append("{" + _fix_command_args(arg[0], command, n_args) + "}")
            k = arg[1]
        i = k
    out.append(s[i:])
    return "".join(out)


def _unwrap(s: str, command: str) -> str:
    r"""``\text{X}`` -> ``X`` for every occurrence (nested braces kept)."""
    while True:
        j = s.find(command + "{")
        if j < 0:
            return s
        brace = j + len(command)
        end = _group_end(s, brace)
        if end is None:
            return s[:j] + s[brace + 1 :]
        s = s[:j] + s[brace + 1 : end - 1] + s[end:]


_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\mbox", "\\mathrm", "\\mathbf", "\\textnormal")
_UNIT_AFTER_VALUE_RE = re.compile(
    r"^(?P<value>.*?\S)\s*\\(?:text|mbox|mathrm|textnormal)\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\^\{?\d\}?)?$"
)
_PLAIN_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_UNIT_WORDS_RE = re.compile(
    rf"^(?P<value>{_PLAIN_NUMBER}|\\frac\{{\d+\}}\{{\d+\}})\s*(?:[a-zA-Z]{{2,}}\.?\s*)+(?:\^\{{?\d\}}?)?$"
)
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LHS_RE = re.compile(r"^(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)$")


def normalize_math(answer: str) -> str:
    """A canonical string for a final answer (see the module docstring for the rules)."""
    s = answer.strip()
    s = re.sub(r",\\!\s*", "", s.replace("\n", " "))  # 10,\!080: a thousands separator
    s = s.replace("\\!", "")
    for cmd in ("\\displaystyle", "\\,", "\\;", "\\:", "\\qquad", "\\quad", "~"):
        s = s.replace(cmd, " ")
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # a control space, not the end of a matrix row "\\ "
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    # Units: "\text{ cm}" after a value, then any remaining \text{X} -> X.
    while True:
        m = _UNIT_AFTER_VALUE_RE.match(s)
        if m is None:
            break
        s = m.group("value")
    for cmd in _TEXT_COMMANDS:
        s = _unwrap(s, cmd)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip()
    m = _UNIT_WORDS_RE.match(s)
    if m is not None:
        s = m.group("value")
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)  # "x \in [-2, 7]"
    if _THOUSANDS_RE.match(s.replace(" ", "")) and ", " not in s:
        s = s.replace(",", "")
    s = s.replace(" ", "")
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if _LHS_RE.match(lhs) and rhs:
            s = rhs
    s = _fix_command_args(s, "\\frac", 2)
    s = _fix_command_args(s, "\\sqrt", 1)
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m is not None:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = re.sub(r"(\d)\.0+(?!\d)", r"\1", s)  # 5.0 -> 5, 2.00 -> 2
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    m = re.fullmatch(r"\(([A-Za-z])\)", s)  # (C) -> C
    if m is not None:
        s = m.group(1)
    if re.fullmatch(r"[A-Za-z]{2,}", s) or re.fullmatch(r"[A-Za-z]", s):
        s = s.lower()
    return s


def to_fraction(s: str) -> Fraction | None:
    r"""The exact value of a normalised plain number, fraction or mixed number, else None."""
    num = r"-?\d+(?:\.\d+)?"
    try:
        if re.fullmatch(num, s):
            return Fraction(s)
        m = re.fullmatch(rf"(-?)\\frac\{{({num})\}}\{{({num})\}}", s)
        if m is not None:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) else value
        m = re.fullmatch(rf"({num})/({num})", s)
        if m is not None:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)  # 1\frac{4}{5}: a mixed number
        if m is not None:
            value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
            return -value if m.group(1) else value
    except ZeroDivisionError:
        return None
    return None


def _split_top_level(s: str, seps: str = ",") -> list[str]:
    """Split at separators outside (), [], {}."""
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c in seps and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


_MATRIX_RE = re.compile(r"\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}")


def _structure(s: str) -> tuple[str, list[str], str] | None:
    """(open, elements, close) of a tuple/interval "(a,b]", a matrix, or a bare list "a,b"."""
    m = _MATRIX_RE.fullmatch(s)
    if m is not None:
        cells = [c for row in m.group(2).split("\\\\") for c in row.split("&")]
        return "matrix", [c for c in cells if c != ""], ""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        depth = 0
        for c in inner:  # "(1,2)\cup(3,4)" is not one tuple
            depth += c in "([{"
            depth -= c in ")]}"
            if depth < 0:
                return None
        parts = _split_top_level(inner)
        if len(parts) >= 2:
            return s[0], parts, s[-1]
        return None
    parts = _split_top_level(s)
    if len(parts) >= 2:
        return "", parts, ""
    return None


def _equal_normalized(a: str, b: str, depth: int = 0) -> bool:
    if a == b:
        return True
    fa, fb = to_fraction(a), to_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    if depth > 4:
        return False
    sa, sb = _structure(a), _structure(b)
    if sa is None or sb is None:
        return False
    (oa, ea, ca), (ob, eb, cb) = sa, sb
    if (oa, ca) != (ob, cb) or len(ea) != len(eb):
        return False
    na = [normalize_math(x) for x in ea]
    nb = [normalize_math(x) for x in eb]
    if oa == "":  # a bare list of solutions: order does not matter
        if Counter(na) == Counter(nb):
            return True
        remaining = list(nb)
        for x in na:
            hit = next((i for i, y in enumerate(remaining) if _equal_normalized(x, y, depth + 1)), None)
            if hit is None:
                return False
            remaining.pop(hit)
        return True
    return all(_equal_normalized(x, y, depth + 1) for x, y in zip(na, nb, strict=True))


def math_equal(pred: str | None, gold: str) -> bool:
    """Whether a predicted final answer equals the gold one (see the module docstring)."""
    if pred is None:
        return False
    return _equal_normalized(normalize_math(pred), normalize_math(gold))
