"""The two solver prompt styles of the LatentSeek paper, in our own words, as chat messages.

- ``"boxed"`` (the paper's P1): reason step by step, then put the final answer in ``\\boxed{}``.
- ``"json"`` (the paper's P2): reply with one JSON object holding the reasoning and the final answer.

Both go into a single user turn, with no system message, because some chat templates (Gemma's, for one) reject
a system role. `latentseek.eval.judge.extract_answer` reads answers written in either style.
"""

from __future__ import annotations

from typing import Literal, get_args

PromptStyle = Literal["boxed", "json"]
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)

# How the gold answers of a data set are written: "number" for GSM8K and AIME (a bare number is asked for),
# "math" for MATH-500 (any LaTeX expression).
AnswerKind = Literal["number", "math"]
ANSWER_KINDS: tuple[str, ...] = get_args(AnswerKind)

# The keys of the P2 JSON object; the judge reads the answer from JSON_ANSWER_KEY.
JSON_REASONING_KEY = "reasoning"
JSON_ANSWER_KEY = "final_answer"

_ANSWER_FORM: dict[str, str] = {
    "number": "The final answer is a single number: write only its digits, with no units, symbols or words.",
    "math": "Write the final answer in LaTeX, simplified, without surrounding $ signs.",
}


def _check(style: str, answer_kind: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if answer_kind not in ANSWER_KINDS:
        raise ValueError(f"answer_kind must be one of {ANSWER_KINDS}, got {answer_kind!r}")


def solver_prompt(question: str, style: PromptStyle = "boxed", answer_kind: AnswerKind = "math") -> str:
    """The user-turn text that asks a model to solve `question` in the given style.

    `answer_kind` only changes the P2 wording: there the answer field must be a bare number for GSM8K and AIME.
    """
    _check(style, answer_kind)
    if style == "boxed":
        return (
            "Solve the math problem below. Work through it step by step, showing each calculation, and end with "
            "the final answer written as \\boxed{ANSWER}.\n\n"
            f"Problem: {question.strip()}"
        )
    return (
        "Solve the math problem below. Reply with a single JSON object and nothing else. It has two keys: "
        f'"{JSON_REASONING_KEY}", a string with your step-by-step working, and "{JSON_ANSWER_KEY}", the answer '
        f"alone. {_ANSWER_FORM[answer_kind]}\n"
        f'Format: {{"{JSON_REASONING_KEY}": "...", "{JSON_ANSWER_KEY}": "..."}}\n\n'
        f"Problem: {question.strip()}"
    )


def solver_messages(
    question: str, style: PromptStyle = "boxed", answer_kind: AnswerKind = "math"
) -> list[dict[str, str]]:
    """Chat messages for ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``."""
    return [{"role": "user", "content": solver_prompt(question, style, answer_kind)}]
