"""The knobs of the LatentSeek loop, with the original implementation's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from latentseek_ext import IMPLS, Impl

from .errors import ConfigError
from .static_decode import DECODES, Decode

#: The update length L never exceeds this many latents, whatever rho and the answer length (the original's cap).
MAX_UPDATE_LENGTH = 300

#: What LatentSeek does with a problem whose prompt plus the tokens that may follow it exceed the model's context.
ContextPolicy = Literal["error", "truncate-question", "clamp-new-tokens"]
CONTEXT_POLICIES: tuple[str, ...] = get_args(ContextPolicy)


@dataclass
class LatentSeekConfig:
    """Hyper-parameters of :class:`latentseek.LatentSeek` (defaults are those of the paper's code).

    Attributes:
        rho: fraction of the initial answer's tokens whose latents are optimised:
            ``L = min(int(rho * n), MAX_UPDATE_LENGTH)`` for an answer of n generated tokens (stop token included).
        lr: Adam learning rate on the latents z.
        max_steps: most optimiser steps per problem.
        reward_threshold: a problem is solved, and its loop stops, once its reward R is strictly above this.
        start_index: first answer token whose latent is optimised; the answer's tokens before it are kept.
        max_new_tokens: most tokens each generation produces (the first answer, and each continuation after the
            optimised prefix).
        grad_clip: clip each problem's gradient to this L2 norm before the Adam step (None: no clipping).
        keep_best: return the best-rewarded answer seen instead of the last one (the earliest among equals).
        impl: implementation of the fused LM-head op (``latentseek_ext.lm_head_policy_grad``): ``"ext"`` (the
            compiled kernel), ``"reference"`` (pure torch), or ``"auto"`` (the kernel where it is built).
        decode: how generation runs its decode steps (:func:`latentseek.generation.extend`): ``"eager"`` (the
            reference), ``"graph"`` (static shapes, captured in CUDA graphs on CUDA) or ``"compiled"`` (the static
            step through ``torch.compile``, CPU only); None: the device's default
            (:func:`latentseek.static_decode.default_decode`, eager everywhere until a GPU has verified the graph path).
        samples: K, the token sequences drawn from the latents per step. 1 (the default) is the paper's algorithm:
            x = argmax lm_head(z), the update ``-R * sum_t log p(x_t | z_t)``. K > 1 draws K prefixes per step with
            the op's Gumbel-max sampler and updates with REINFORCE and a mean baseline (see :mod:`latentseek.loop`).
        seed: the sampler's seed for K > 1 (an int in [0, 2**63)); a problem's draws depend only on it, the
            problem's prompt, the step, the sample and the position, never on the batch.
        context_policy: what to do, before any model work, with a problem that cannot fit in the model's context
            (its prompt, plus up to :func:`answer_token_bound` answer tokens; and each verifier prompt of a reward
            that runs the model, plus its own max_new_tokens): ``"error"`` raises
            :class:`~latentseek.errors.ContextLengthError`; ``"truncate-question"`` cuts tokens from the middle of
            the question (the last user message) until everything fits, keeping its first and last halves joined by
            ``" [...] "`` (:func:`latentseek.context.truncate_middle`); ``"clamp-new-tokens"`` lowers that
            problem's max_new_tokens to the most that fits. Either way the result records what was done
            (``Result.question_tokens_cut``, ``Result.max_new_tokens``), and a problem that cannot be made to fit
            still raises.
    """

    rho: float = 0.2
    lr: float = 0.03
    max_steps: int = 10
    reward_threshold: float = -0.2
    start_index: int = 0
    max_new_tokens: int = 1024
    grad_clip: float | None = None
    keep_best: bool = False
    impl: Impl = "auto"
    decode: Decode | None = None
    context_policy: ContextPolicy = "error"
    samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.rho <= 1.0):
            raise ConfigError(f"LatentSeekConfig.rho must lie in [0, 1], got {self.rho}")
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise ConfigError(f"LatentSeekConfig.lr must be a positive finite number, got {self.lr}")
        if self.max_steps < 0:
            raise ConfigError(f"LatentSeekConfig.max_steps must be >= 0, got {self.max_steps}")
        if not math.isfinite(self.reward_threshold):
            raise ConfigError(f"LatentSeekConfig.reward_threshold must be finite, got {self.reward_threshold}")
        if self.start_index < 0:
            raise ConfigError(f"LatentSeekConfig.start_index must be >= 0, got {self.start_index}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"LatentSeekConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.grad_clip is not None and not (self.grad_clip > 0.0):
            raise ConfigError(f"LatentSeekConfig.grad_clip must be None or > 0, got {self.grad_clip}")
        if self.impl not in IMPLS:
            raise ConfigError(f"LatentSeekConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if self.decode is not None and self.decode not in DECODES:
            raise ConfigError(f"LatentSeekConfig.decode must be None or one of {DECODES}, got {self.decode!r}")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ConfigError(f"LatentSeekConfig.samples must be an int >= 1, got {self.samples!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ConfigError(f"LatentSeekConfig.seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.samples > 1 and (self.max_steps + 1) * self.samples * MAX_UPDATE_LENGTH >= 2**32:
            raise ConfigError(
                f"LatentSeekConfig: max_steps * samples must stay below {2**32 // MAX_UPDATE_LENGTH} (each draw's "
                f"offset counts (step, sample, position) in 32 bits), got {self.max_steps} * {self.samples}"
            )
        if self.context_policy not in CONTEXT_POLICIES:
            raise ConfigError(
                f"LatentSeekConfig.context_policy must be one of {CONTEXT_POLICIES}, got {self.context_policy!r}"
            )


def update_length(answer_length: int, rho: float, start_index: int) -> int:
    """L, the number of latents optimised for an initial answer of ``answer_length`` generated tokens.

    ``min(int(rho * answer_length), MAX_UPDATE_LENGTH)`` as in the original, then clipped to the latents that
    exist after ``start_index`` (the original indexed past the end there). 0 means the answer is returned unchanged.
    """
    return max(0, min(int(rho * answer_length), MAX_UPDATE_LENGTH, answer_length - start_index))


def answer_token_bound(max_new_tokens: int, rho: float, start_index: int, max_steps: int) -> int:
    """The most tokens an answer of the LatentSeek loop can have, so the most that can follow its prompt.

    The first answer has n <= max_new_tokens tokens. Each later one is its first ``start_index`` tokens, the L
    decoded latents, and a continuation of at most max_new_tokens; ``start_index + L <= n``, and L grows with n, so
    the bound is ``max_new_tokens + start_index + L(max_new_tokens)`` when there are steps and L > 0.
    """
    L = update_length(max_new_tokens, rho, start_index)
    return max_new_tokens + (start_index + L if max_steps > 0 and L > 0 else 0)
