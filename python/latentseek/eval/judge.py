"""Final-answer extraction from model responses, and judging an answer against the gold one.

Extraction (`extract_answer`) understands both solver prompt styles of `latentseek.eval.prompts` and what models do
instead of following them, in this order:

1. the final-answer field of a JSON object (P2), even inside code fences or followed by end-of-turn text;
2. the last ``\\boxed{...}`` or ``\\fbox{...}`` (P1), nested braces included;
3. the last "The (final) answer is X" / "Answer: X" / "#### X";
4. the last number in the text.

Judging (`is_equivalent`) compares two plain numbers exactly as rationals after stripping what a word problem
adds around them ("$1,000.00", "033", "18 apples", "15%"), and everything else (LaTeX, fractions, intervals, sets,
matrices, expressions) by mathematical equivalence with the `math-verify` package.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, NamedTuple

from latentseek.eval.prompts import JSON_ANSWER_KEY

# Seconds math-verify may spend parsing or comparing one expression (sympy can hang on adversarial input).
MATH_VERIFY_TIMEOUT_S = 5


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")


def _balanced_group(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at ``text[start] == "{"`` and the index after it; None if unclosed.

    Escaped braces (``\\{`` in a set) do not count, so ``\\boxed{\\{1, 2\\}}`` yields ``\\{1, 2\\}``.
    """
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The contents of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``), or None."""
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            group = _balanced_group(text, rest)
            if group is not None:
                return group[0].strip()
        elif rest > match.end():  # "\boxed 5": TeX takes the next token
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


# Keys a model uses for the final answer: ours first, then what other prompts (the paper's "final answer") ask for.
_ANSWER_KEYS = tuple(dict.fromkeys(k.lower().replace("_", " ") for k in (JSON_ANSWER_KEY, "final answer", "answer")))
_JSON_OBJECT_START = re.compile(r"\{\s*\"")
_JSON_KEY_VALUE = re.compile(
    r"\"(final[ _]?answer|answer)\"\s*:\s*(\"(?:[^\"\\]|\\.)*\"|[^,}\n]+)", flags=re.IGNORECASE | re.DOTALL
)


def _latex_safe_json(text: str) -> str:
    """Doubles every backslash that is not already an escaped backslash or quote.

    Models write LaTeX into JSON strings unescaped; strict JSON would read ``\\frac`` as a form feed and ``\\times``
    as a tab, so a lone backslash is taken literally.
    """
    return re.sub(r"\\(.)", lambda m: m.group(0) if m.group(1) in '\\"' else "\\\\" + m.group(1), text, flags=re.DOTALL)


def _json_value_text(value: Any) -> str | None:
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ", ".join(t for t in (_json_value_text(v) for v in value) if t is not None)
    return str(value).strip()


def _answer_from_mapping(obj: dict) -> str | None:
    by_key = {str(k).strip().lower().replace("_", " "): v for k, v in obj.items()}
    for key in _ANSWER_KEYS:
        if key in by_key:
            return _json_value_text(by_key[key])
    return None


def extract_json_answer(text: str) -> str | None:
    """The final-answer field of the last JSON object in `text` that has one, or None.

    Surrounding prose, code fences and end-of-turn markers are ignored. If no object parses (a truncated or
    malformed reply), the last ``"final_answer": value`` pair is read directly.
    """
    safe = _latex_safe_json(text)
    decoder = json.JSONDecoder()
    found: str | None = None
    for start in _JSON_OBJECT_START.finditer(safe):
        try:
            obj, _ = decoder.raw_decode(safe, start.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            answer = _answer_from_mapping(obj)
            if answer is not None:
                found = answer
    if found is not None:
        return found
    pairs = list(_JSON_KEY_VALUE.finditer(safe))
    if not pairs:
        return None
    raw = pairs[-1].group(2).strip()
    if raw.startswith('"'):
        try:
            return str(json.loads(raw)).strip()
        except json.JSONDecodeError:
            return raw.strip('"').strip()
    return raw


_NUMBER_TOKEN = re.compile(r"[-−]?(?:\\?\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\\?%)?|[-−]?\.\d+(?:\\?%)?")
_ANSWER_PHRASE = re.compile(
    r"(?:(?:final\s+)?answer\s*(?:is|:|=|would be|will be)|^\s*####)\s*:?\s*(?P<rest>[^\n]+)",
    flags=re.IGNORECASE | re.MULTILINE,
)


def _answer_from_phrase(rest: str) -> str | None:
    """The answer in the text after "The answer is": a leading number (with its $ / %), else up to the sentence end."""
    rest = rest.replace("*", "").strip()
    number = _NUMBER_TOKEN.match(rest)
    if number:
        return number.group(0).strip()
    inline_math = re.match(r"\$([^$]+)\$|\\\((.+?)\\\)", rest)
    if inline_math:
        return (inline_math.group(1) or inline_math.group(2)).strip()
    sentence = re.split(r"\.\s|\.$", rest, maxsplit=1)[0].strip()
    return sentence or None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a model response (see the module docstring for the order), or None."""
    for extractor in (extract_json_answer, extract_boxed):
        answer = extractor(text)
        if answer:
            boxed_inside = extract_boxed(answer)
            return boxed_inside if boxed_inside else answer
    phrases = list(_ANSWER_PHRASE.finditer(text))
    for phrase in reversed(phrases):
        answer = _answer_from_phrase(phrase.group("rest"))
        if answer:
            return answer
    numbers = _NUMBER_TOKEN.findall(text)
    return numbers[-1].strip() if numbers else None


# ---------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------


class ParsedNumber(NamedTuple):
    """A plain number read from an answer string; `percent` when it was written with a % sign."""

    value: Fraction
    percent: bool


_MATH_DELIMITERS = re.compile(r"^(?:\$+|\\\(|\\\[)\s*(.*?)\s*(?:\$+|\\\)|\\\])$", flags=re.DOTALL)
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\s*\{(.*)\}$", flags=re.DOTALL)
_PARENTHESES = re.compile(r"^\(([^(),]*)\)$")  # "(073)"; a comma would make it a tuple or an interval
_LATEX_SPACING = re.compile(r"\\[!,;:> ]|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_CURRENCY = re.compile(r"\\\$|\$|€|£|¥|USD|usd")
_PERCENT = re.compile(r"\s*(?:\\%|%|\s+percent)$")
# Units after a number: LaTeX text groups ("5\text{ cm}") or words of two or more letters ("18 apples per day").
# One-letter words are not units but variables ("5 x").
_TRAILING_UNITS = re.compile(r"(?:\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\})+$|\s+[A-Za-z][A-Za-z.]+(?:\s+[A-Za-z.]+)*$")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?$|^[+-]?\.\d+$")
_SIMPLE_FRACTION = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")


def parse_number(text: str) -> ParsedNumber | None:
    """`text` as a plain number, or None when it is anything else (an expression, LaTeX, a set, ...).

    Accepts thousands separators ("1,000", LaTeX "1{,}000" and "1,\\!000"), leading zeros ("033"), trailing zeros
    ("5.00"), currency signs, degree signs, a percent sign, trailing unit words, and simple fractions "3/4".
    """
    s = text.strip().replace("−", "-")
    for _ in range(3):  # "$\text{18 apples}$", "\textbf{(073)}": delimiters and wrappers nest
        unwrapped = _MATH_DELIMITERS.sub(r"\1", s)
        unwrapped = _TEXT_WRAPPER.sub(r"\1", unwrapped).strip()
        unwrapped = _PARENTHESES.sub(r"\1", unwrapped).strip()
        if unwrapped == s:
            break
        s = unwrapped
    s = _LATEX_SPACING.sub("", s).replace("{,}", ",")
    s = _DEGREES.sub("", s)
    s = _CURRENCY.sub("", s).strip()
    percent = bool(_PERCENT.search(s))
    s = _PERCENT.sub("", s)
    s = _TRAILING_UNITS.sub("", s).strip().rstrip(".").replace(" ", "")
    if _PLAIN_NUMBER.match(s):
        try:
            return ParsedNumber(Fraction(Decimal(s.replace(",", ""))), percent)
        except InvalidOperation:
            return None
    fraction = _SIMPLE_FRACTION.match(s)
    if fraction and int(fraction.group(2)) != 0:
        return ParsedNumber(Fraction(int(fraction.group(1)), int(fraction.group(2))), percent)
    return None


def _numbers_equal(prediction: ParsedNumber, gold: ParsedNumber) -> bool:
    """Exact equality, where a number written with % may also be read as a fraction of 100.

    "15%" matches both 15 (GSM8K asks "what percent ...") and 0.15; a bare 0.15 does not match a bare 15.
    """

    def readings(n: ParsedNumber) -> set[Fraction]:
        return {n.value, n.value / 100} if n.percent else {n.value}

    return bool(readings(prediction) & readings(gold))


# ---------------------------------------------------------------------------------------------------------------
# Mathematical equivalence (math-verify)
# ---------------------------------------------------------------------------------------------------------------


def _math_verify_timeout() -> int | None:
    """math-verify enforces its timeout with signal.alarm, which only the main thread may use.

    Elsewhere (a thread pool, a data loader worker thread) the timeout is off; worker processes have their own main
    thread and keep it.
    """
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_math(text: str, timeout_s: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse(f"${text}$", parsing_timeout=timeout_s))


def math_equal(prediction: str, gold: str) -> bool:
    """Mathematical equivalence of two answer strings (LaTeX or plain) by math-verify; False if either fails to parse."""
    from math_verify import verify

    timeout_s = _math_verify_timeout()
    gold_parsed = _parse_math(_strip_delimiters(gold), timeout_s)
    pred_parsed = _parse_math(_strip_delimiters(prediction), timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout_s)


def _strip_delimiters(text: str) -> str:
    s = text.strip()
    while True:
        unwrapped = _MATH_DELIMITERS.sub(r"\1", s).strip()
        if unwrapped == s:
            return s
        s = unwrapped


def _normalized_text(text: str) -> str:
    return re.sub(r"\s+", "", _strip_delimiters(text)).rstrip(".").lower()


# ---------------------------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------------------------


def is_equivalent(prediction: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer.

    Two plain numbers compare exactly (see `parse_number`); otherwise math-verify decides. An identical string
    (ignoring spaces, case and math delimiters) is always a match, which also covers answers math-verify cannot
    parse, such as names.
    """
    if prediction is None or not prediction.strip():
        return False
    if _normalized_text(prediction) == _normalized_text(gold):
        return True
    pred_number, gold_number = parse_number(prediction), parse_number(gold)
    if pred_number is not None and gold_number is not None:
        return _numbers_equal(pred_number, gold_number)
    return math_equal(prediction, gold)


def answers_match(response_text: str, gold: str) -> bool:
    """Whether a model response (in either prompt style, or free form) states the gold answer as its final answer."""
    return is_equivalent(extract_answer(response_text), gold)
