"""The errors a user can fix: bad data, a model that cannot be loaded, a run directory, a prompt too long.

Every error here means "the input or the environment is not what LatentSeek needs, and the user can change it",
never "LatentSeek has a bug". Each carries a one-line message that says what was wrong and what to do, so a command
line can print it as it is (``latentseek: error: MESSAGE``, exit status 2) and let every other exception show its
traceback. Each subclass also derives from the builtin it replaced (ValueError or RuntimeError), so code that
caught those still works.

    LatentSeekError
    +-- ConfigError          a setting out of range, or one this machine cannot honour (ValueError)
    +-- DatasetError         a problem set that cannot be found, read or understood (ValueError)
    +-- ModelLoadError       a model path, file, tokenizer or architecture LatentSeek cannot use (ValueError)
    +-- ContextLengthError   a prompt plus the tokens to generate exceeds the model's context (ValueError)
    +-- RunError             a run directory that cannot be used as asked (RuntimeError)
"""

from __future__ import annotations

import re

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


class LatentSeekError(Exception):
    """A user's mistake or an environmental condition the user can fix; ``str(error)`` is one line."""

    def __init__(self, message: str) -> None:
        # One line whatever the message quotes (a file's first bytes, a library's multi-line error text).
        super().__init__(_LINE_BREAKS.sub(" ", str(message).strip()))


class ConfigError(LatentSeekError, ValueError):
    """A setting out of range (``LatentSeekConfig``, a method's knob) or one this machine cannot honour."""


class DatasetError(LatentSeekError, ValueError):
    """A problem set that cannot be found, read, or understood; the message names the file, record and field."""


class ModelLoadError(LatentSeekError, ValueError):
    """A model LatentSeek cannot use: no such path, neither a model folder nor a GGUF file, a truncated or corrupt
    file, a tokenizer without a chat template, no LM head, or logits transformed after the LM head."""


class RunError(LatentSeekError, RuntimeError):
    """A run directory that cannot be used as asked."""


class ContextLengthError(LatentSeekError, ValueError):
    """A prompt plus the tokens that may be generated after it exceeds the model's context.

    Attributes (None when the error was rebuilt from its message alone, e.g. after pickling without them):
        problem: index of the problem in the batch the call was given (None for a single prompt).
        what: which prompt ("prompt", "verifier prompt").
        prompt_tokens: the prompt's length in tokens.
        new_tokens: the most tokens that may follow it (max_new_tokens, plus LatentSeek's optimised prefix).
        context: the model's context in tokens.
    """

    def __init__(
        self,
        message: str,
        *,
        problem: int | None = None,
        what: str | None = None,
        prompt_tokens: int | None = None,
        new_tokens: int | None = None,
        context: int | None = None,
    ) -> None:
        super().__init__(message)
        self.problem = problem
        self.what = what
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens
        self.context = context
