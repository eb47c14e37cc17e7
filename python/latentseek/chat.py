"""Chat formatting: a question (or chat messages) to prompt token ids, and the tokens that end an answer.

:func:`build_prompt_ids` formats a question with the tokenizer's chat template and :func:`stop_token_ids` finds the
tokens that end an answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .errors import ModelLoadError
from .model import ModelAdapter

Messages = Sequence[Mapping[str, str]]
# A question as text, or chat messages (role / content) to send as they are.
Prompt = str | Messages


def as_messages(problem: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """A question string becomes ``[{"role": "user", ...}]``; a message list is checked and copied.

    Raises ValueError on an empty question, an empty message list, or a message without ``role`` / ``content``.
    """
    if isinstance(problem, str):
        if not problem.strip():
            raise ValueError("the question is empty")
        messages = [{"role": "user", "content": problem}]
    else:
        messages = [dict(m) for m in problem]
        if not messages:
            raise ValueError("the message list is empty")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must have string 'role' and 'content' fields, got {m!r}")
        if not question_text(messages).strip():
            raise ValueError("the question (the last user message) is empty")
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def question_text(problem: Prompt) -> str:
    """The question a reward sees: the string itself, or the content of the last user message."""
    if isinstance(problem, str):
        return problem
    users = [m["content"] for m in problem if m.get("role") == "user"]
    if not users:
        raise ValueError("the message list has no user message")
    return users[-1]


def build_prompt_ids(tokenizer, question_or_messages: Prompt, system: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the template's assistant header.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        question_or_messages: a question (sent as one user message) or a list of ``{"role", "content"}`` dicts.
        system: an optional system message put first.

    Raises:
        ValueError: empty question or malformed messages; ModelLoadError (a ValueError): a tokenizer without a
            chat template.
    """
    messages = as_messages(question_or_messages, system)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"{type(tokenizer).__name__} has no chat template; use a chat (instruct) model's tokenizer, set "
            "tokenizer.chat_template, or pass token ids to latentseek.generation.generate directly"
        )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def _end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message (``<|im_end|>``, ...)."""
    mark = "LATENTSEEKMARK"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}], tokenize=False
        )
    except Exception:  # a template may refuse this conversation in any way; it then has no end-of-turn to find
        return None
    tail = text[text.find(mark) + len(mark) :] if mark in text else ""
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    special.discard(tokenizer.unk_token_id)
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer, model: torch.nn.Module | ModelAdapter | None = None) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS, the model's ``generation_config.eos_token_id`` (one or a
    list), and the chat template's end-of-turn token. Raises ValueError when there is none."""
    found: list[int] = []

    def add(value) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in found:
                found.append(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    if isinstance(model, ModelAdapter):
        model = model.model
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        add(generation_config.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        add(_end_of_turn_id(tokenizer))
    if not found:
        raise ValueError("found no stop token: the tokenizer has no eos_token and the model no eos_token_id")
    return found
