"""Final-answer extraction and comparison in GSM8K's `#### <answer>` format.

Shared by the tiny-GSM demo task and the real GSM8K evaluation, so both are scored by exactly the
same rules:

* the answer is what follows the *last* ``####`` marker (GSM8K solutions end with ``#### 72``);
* a number there is normalised (thousands commas, ``$`` and a trailing ``.`` dropped);
* a non-numeric answer (tiny-GSM's sort / reverse / copy skills) is returned as text;
* without a marker, fall back to the last number in the text (models often end with
  "The answer is 72.").
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number as models and GSM8K write it: optional sign and `$`, thousands separators only in
# groups of three (so "3, 9, 14" is a list, not the number 3914), optional decimals.
_NUMBER = r"-?\$?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
# The text after the marker is a number if it is exactly one, possibly followed by a full stop
# or by unit words ("#### 18 dollars").
_NUMERIC_ANSWER_RE = re.compile(rf"({_NUMBER})\.?(?:\s+[A-Za-z][A-Za-z\s]*\.?)?")
_MARKER = "####"
# What `normalize_number` accepts: like GSM8K's own extractor, any commas are dropped
# ("1,00" -> "100"), but inner spaces are not, so "3, 9, 14" stays a list.
_LOOSE_NUMBER_RE = re.compile(r"-?\$?-?[\d,]*\d(?:\.\d+)?\.?")


def normalize_number(s: str) -> str:
    """Canonical string for a number: "1,000" -> "1000", "3.0" -> "3", "$-2." -> "-2".

    Raises ValueError when ``s`` is not a number.
    """
    stripped = s.strip()
    if _LOOSE_NUMBER_RE.fullmatch(stripped) is None:
        raise ValueError(f"not a number: {s!r}")
    cleaned = stripped.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation as exc:
        raise ValueError(f"not a number: {s!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not a finite number: {s!r}")
    if value == value.to_integral_value():
        # int() also turns "-0" into "0".
        return str(int(value))
    # Drop trailing zeros ("0.50" -> "0.5") without switching to exponent notation.
    return format(value.normalize(), "f")


def _try_normalize(s: str) -> str | None:
    try:
        return normalize_number(s)
    except ValueError:
        return None


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution or model output, or None when there is none.

    Numbers come back normalised (see `normalize_number`); a non-numeric text after the last
    ``####`` (e.g. "3, 9, 14" or "sun cat red") comes back stripped, with whitespace collapsed.
    """
    idx = text.rfind(_MARKER)
    if idx >= 0:
        rest = text[idx + len(_MARKER) :].lstrip("#").split("\n", 1)[0].strip()
        if rest:
            m = _NUMERIC_ANSWER_RE.fullmatch(rest)
            if m is not None:
                return normalize_number(m.group(1))
            return " ".join(rest.split())
        # An empty marker line (a truncated generation): use the last number before it, as
        # the no-marker fallback would.
        return _last_number(text[:idx])
    return _last_number(text)


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether an extracted prediction equals the gold answer (numerically when both are numbers)."""
    if pred is None:
        return False
    pred_num, gold_num = _try_normalize(pred), _try_normalize(gold)
    if pred_num is not None and gold_num is not None:
        return pred_num == gold_num
    return " ".join(pred.split()) == " ".join(gold.split())
