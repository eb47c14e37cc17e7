"""Solver prompts: both styles, the answer-kind wording, and that a reply in the asked format is read back."""

import json

import pytest

from latentseek.eval.judge import answers_match, extract_answer
from latentseek.eval.prompts import (
    JSON_ANSWER_KEY,
    JSON_REASONING_KEY,
    PROMPT_STYLES,
    solver_messages,
    solver_prompt,
)

QUESTION = "Ana has 3 bags of 4 apples. How many apples does she have?"


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_messages_are_one_user_turn_holding_the_question(style):
    messages = solver_messages(QUESTION, style, "number")
    assert [m["role"] for m in messages] == ["user"]
    assert QUESTION in messages[0]["content"]


def test_boxed_style_asks_for_boxed():
    assert "\\boxed{" in solver_prompt(QUESTION, "boxed")


def test_json_style_names_both_keys_and_the_answer_form():
    number_prompt = solver_prompt(QUESTION, "json", "number")
    math_prompt = solver_prompt(QUESTION, "json", "math")
    for prompt in (number_prompt, math_prompt):
        assert f'"{JSON_REASONING_KEY}"' in prompt and f'"{JSON_ANSWER_KEY}"' in prompt
    assert "single number" in number_prompt and "LaTeX" in math_prompt


def reply_following(prompt: str, answer: str) -> str:
    """A model reply that does exactly what the prompt's format instruction shows."""
    if "Format: " in prompt:
        template = json.loads(prompt.split("Format: ", 1)[1].split("\n", 1)[0])
        return json.dumps({key: (answer if key == JSON_ANSWER_KEY else "3 * 4 = 12") for key in template})
    assert "\\boxed{ANSWER}" in prompt
    return "3 bags of 4 apples is 3 * 4 = 12 apples.\n\\boxed{" + answer + "}"


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_a_reply_in_the_asked_format_is_judged(style):
    reply = reply_following(solver_prompt(QUESTION, style, "number"), "12")
    assert extract_answer(reply) == "12"
    assert answers_match(reply, "12") and not answers_match(reply, "7")


@pytest.mark.parametrize(("style", "kind"), [("xml", "number"), ("boxed", "text")])
def test_unknown_style_or_kind_is_refused(style, kind):
    with pytest.raises(ValueError):
        solver_prompt(QUESTION, style, kind)
