"""How many tokens a model can attend to, and the check that a prompt plus what may follow it fits, made before any
model work so that a long problem is refused in milliseconds instead of running for minutes past the context.

The context of a model (:func:`model_context_length`) is the smaller of

- its config's ``max_position_embeddings`` (the text config of a multimodal model), raised to
  ``original_max_position_embeddings * factor`` when the config asks for YaRN rope scaling without having raised it
  (Qwen2.5's documented way to reach 128K positions); other rope scalings (llama3, linear, dynamic) are taken to be
  reflected in ``max_position_embeddings`` already, as their configs write them; sliding-window attention limits what a
  token sees, not how many positions there are, so it does not shorten the context;
- its tokenizer's ``model_max_length``, when that is set to a real number (transformers writes 1e30 for "no limit").

What follows a prompt is its ``max_new_tokens`` and, for LatentSeek, the optimised prefix an answer is continued
after (see :meth:`latentseek.loop.LatentSeek.check_context`). :class:`ContextNeed` holds one such sum and turns it
into a :class:`~latentseek.errors.ContextLengthError` with the numbers and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ContextLengthError
from .model import ModelAdapter

# A tokenizer's model_max_length at or above this is a "no limit" sentinel (transformers' VERY_LARGE_INTEGER is 1e30).
_NO_LIMIT = 10**9

#: What the text of a question cut by ``context_policy="truncate-question"`` has where its middle was.
TRUNCATION_MARK = " [...] "


def model_context_length(model: torch.nn.Module | ModelAdapter, tokenizer=None) -> int | None:
    """The most tokens (prompt and generated ones together) the model takes, or None when nothing says."""
    if isinstance(model, ModelAdapter):
        model = model.model
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        positions = None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if positions is not None and isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "yarn":
        original, factor = rope.get("original_max_position_embeddings"), rope.get("factor")
        if isinstance(original, int) and isinstance(factor, (int, float)) and factor > 1 and positions <= original:
            positions = int(original * factor)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        positions = limit if positions is None else min(positions, limit)
    return positions


@dataclass(frozen=True)
class ContextNeed:
    """A prompt of ``prompt_tokens`` tokens after which up to ``new_tokens`` more may come, on a model whose context
    is ``context`` tokens (None: unknown, never too long).

    ``what`` names the prompt in messages ("prompt", "verifier prompt"); ``detail`` says where ``new_tokens`` (or
    the prompt's length, when it is a bound) comes from.
    """

    what: str
    prompt_tokens: int
    new_tokens: int
    context: int | None
    detail: str = ""

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def excess(self) -> int:
        """Tokens over the context (0 when it fits)."""
        return 0 if self.context is None else max(0, self.total - self.context)

    def error(self, problem: int | None, hint: str) -> ContextLengthError:
        where = "" if problem is None else f"problem {problem}: "
        detail = f" ({self.detail})" if self.detail else ""
        return ContextLengthError(
            f"{where}the {self.what} has {self.prompt_tokens} tokens and up to {self.new_tokens} more may follow it"
            f"{detail}, {self.total} in all, but the model's context is {self.context} tokens; {hint}",
            problem=problem,
            what=self.what,
            prompt_tokens=self.prompt_tokens,
            new_tokens=self.new_tokens,
            context=self.context,
        )

    def check(self, problem: int | None, hint: str) -> None:
        """Raise :meth:`error` unless the prompt and its new tokens fit in the context."""
        if self.excess > 0:
            raise self.error(problem, hint)


def truncate_middle(tokenizer, text: str, drop: int) -> tuple[str, int] | None:
    """`text` with at least `drop` of its tokens cut from the middle: the first ``ceil(k / 2)`` and the last
    ``floor(k / 2)`` of its tokens kept, joined by :data:`TRUNCATION_MARK` (whitespace at the cut dropped), where k
    is its token count less `drop` less the mark's tokens. Returns ``(new text, tokens cut)``, or None when nothing of the text would be left."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    mark = len(tokenizer.encode(TRUNCATION_MARK, add_special_tokens=False))
    keep = len(ids) - drop - mark
    if keep < 2:
        return None
    head, tail = (keep + 1) // 2, keep // 2
    cut = tokenizer.decode(ids[:head]).rstrip() + TRUNCATION_MARK + tokenizer.decode(ids[len(ids) - tail :]).lstrip()
    return cut, len(ids) - keep
