r"""The LatentSeek loop (arXiv 2505.13308): test-time policy gradient on the hidden states an LM head reads.

For each problem (the semantics of the paper's code, ``opt_generation.py``):

1. **generate** a greedy answer from the chat prompt, keeping the post-norm hidden state h_t behind every token;
   stop at EOS / end-of-turn or after ``max_new_tokens``. The answer's length n counts its stop token.
2. **reward** it: R = reward(question, answer). If R > ``reward_threshold`` the answer is returned.
3. The latents z = h[start : start + L], ``L = min(int(rho * n), 300)`` (computed once, from the first answer),
   are the parameters of an Adam optimiser (lr). L = 0 returns the answer unchanged.
4. Up to ``max_steps`` times, while R <= threshold:

   - **update**: with x = argmax lm_head(z), one Adam step on the loss ``-R * sum_t log p(x_t | z_t)``
     (gradient clipped per problem when ``grad_clip`` is set);
   - **decode**: the new prefix x' = argmax lm_head(z'); the model continues greedily after
     prompt + answer[:start] + x' (at most ``max_new_tokens`` more tokens);
   - **reward** the new answer answer[:start] + x' + continuation; its reward becomes R.

   The same z and Adam state are carried across steps. The last answer is returned (``keep_best``: the best
   rewarded one).

**K samples** (``samples = K > 1``; K = 1 is the algorithm above, unchanged). Each step draws K prefixes from the
current latents with the op's Gumbel-max sampler (``lm_head_policy_grad(z, sample=True, seed, offsets)``, one call
for all K draws of all problems, which also gives each draw's ``-d log p(x^k | z) / dz``), then:

- **decode**: each draw's answer is answer[:start] + x^k + the greedy continuation after it (cut at a stop token as
  below); draws with equal prefixes share one continuation and one reward (the greedy continuation is a function
  of the prefix);
- **reward**: R_k for each draw's answer, all draws of all problems in one reward call;
- **keep**: the step's answer is the best-rewarded draw (the earliest among equals); its reward is the step's
  reward R (the threshold, ``keep_best`` and the record read it), and ``Result.sample_rewards`` keeps all K;
- **update** (only if the problem goes on): one Adam step on REINFORCE with the mean baseline,
  ``loss = -(1/K) sum_k (R_k - mean_j R_j) sum_t log p(x^k_t | z_t)``, at the z the draws came from.

So the first step samples around the greedy answer's latents, and a step whose draws all get the same reward
leaves the gradient zero (Adam's momentum still moves z). Draw k of step s at position t of a problem uses the
counter ``offset = key << 32 | ((s * K + k) * MAX_UPDATE_LENGTH + t)`` with ``key`` 31 bits of a hash of the
problem's prompt ids: its noise depends on (seed, problem, step, sample, position) only, so batched == one by one.

The stop token rule: if the new prefix x' contains a stop token, the answer ends at the first one (inclusive) and
nothing is generated after it: the model would end its turn there, and text after an end-of-turn is not part of
the answer. (The original kept decoding past it.)

Hidden-state rewards (:class:`~latentseek.rewards.HiddenStateReward`, e.g. the confidence reward) get, for each
answer, the state behind each of its tokens: the first generation's for answer[:start], the latents z for the
optimised prefix (x = argmax or a draw of lm_head(z)), the continuation's own; no model work is added for them.

What is not wasted here. The gradient is ``latentseek_ext.lm_head_policy_grad`` (one pass over the vocabulary, no
autograd through the model or the LM head). Since the gradient is linear in R, the op runs once per step at the
updated z' with reward 1: its argmax is the new prefix x', and its ``-d log p / dz'`` times the next R is the next
step's gradient, so each step makes a single pass over the LM head. The KV cache of prompt + answer[:start] is
taken from the first generation and reused by every step; generation is KV-cached. ``solve_batch`` runs all
problems through each phase together (batched generation, one fused-op call for all active latents, one reward
call), and a problem leaves the batch as soon as it is solved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import latentseek_ext
from latentseek_ext import acc_dtype

from .chat import Prompt, as_messages, build_prompt_ids, question_text, stop_token_ids
from .config import MAX_UPDATE_LENGTH, LatentSeekConfig, answer_token_bound, update_length
from .context import ContextNeed, model_context_length, truncate_middle
from .errors import ConfigError, ContextLengthError
from .generation import Generation, counter_key, extend
from .kv_cache import PrefixCache
from .model import ModelAdapter
from .progress import ProgressCallback, enter_phase, reporting
from .rewards import HiddenStateReward, RewardLike, Score, as_reward, evaluate

PHASES = ("generate", "reward", "update")

# on_answer(problem index, step, answer text, reward): see LatentSeek.solve_batch.
AnswerCallback = Callable[[int, int, str, float], None]


@dataclass
class Result:
    """The outcome of LatentSeek on one problem.

    Attributes:
        question: the question text the reward saw.
        answers: every answer, the first (greedy) one first, then one per optimiser step.
        answer_ids: their token ids (stop token included when one was generated).
        rewards: the reward of each answer; ``reward_details``: the reward's per-answer details.
        final_index: which answer is returned (the last, or the best with ``keep_best``).
        steps: optimiser steps taken; ``update_length``: L, the number of optimised latents.
        solved: whether the returned answer's reward is above the threshold.
        prompt_tokens: length of the chat-formatted prompt.
        generated_tokens: tokens the model generated (first answer and every continuation).
        prefill_tokens: tokens fed without being generated (the prompt once, each step's new prefix).
        time: wall seconds per phase ("generate", "reward", "update"); a batched phase is shared equally by
            the problems that took part in it.
        max_new_tokens: the cap on each generation of this problem (the config's, unless
            ``context_policy="clamp-new-tokens"`` lowered it to fit the model's context).
        question_tokens_cut: tokens cut from the middle of the question by ``context_policy="truncate-question"``
            (0: the question is whole).
        sample_rewards: with ``samples = K > 1``, the K draws' rewards of each step (``rewards[i]`` is the best of
            ``sample_rewards[i - 1]``); empty for K = 1.
        scored_details: the details of every answer the reward scored, in order (for K = 1 the same as
            ``reward_details``; for K > 1 each distinct draw's too), e.g. to count verifier tokens.
        generated_by_step: ``generated_tokens`` as it stood when each answer was complete (the last equals it).
        scored_by_step: how many of ``scored_details`` existed when each answer was complete.
    """

    question: str
    answers: list[str]
    answer_ids: list[list[int]]
    rewards: list[float]
    reward_details: list[Mapping[str, Any]]
    final_index: int
    steps: int
    update_length: int
    solved: bool
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens: int
    time: dict[str, float]
    max_new_tokens: int
    question_tokens_cut: int
    sample_rewards: list[list[float]] = field(default_factory=list)
    scored_details: list[Mapping[str, Any]] = field(default_factory=list)
    generated_by_step: list[int] = field(default_factory=list)
    scored_by_step: list[int] = field(default_factory=list)

    @property
    def initial_answer(self) -> str:
        return self.answers[0]

    @property
    def final_answer(self) -> str:
        return self.answers[self.final_index]

    @property
    def initial_reward(self) -> float:
        return self.rewards[0]

    @property
    def final_reward(self) -> float:
        return self.rewards[self.final_index]

    @property
    def total_time(self) -> float:
        return sum(self.time.values())


@dataclass
class _Search:
    """One problem's state through the loop."""

    question: str
    gold: str | None
    prompt: list[int]
    max_new: int  # the cap on each generation (the config's, or what context_policy left of it)
    cut: int = 0  # question tokens cut by context_policy="truncate-question"
    answers: list[list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    details: list[Mapping[str, Any]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # answer[:start]
    cache: PrefixCache | None = None  # KV of prompt + answer[:start]
    z: torch.nn.Parameter | None = None
    prefix: list[int] = field(default_factory=list)  # x = argmax lm_head(z)
    direction: torch.Tensor | None = None  # -d log p(x | z) / dz, [L, H]
    steps: int = 0
    generated: int = 0
    prefilled: int = 0
    time: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    first_hidden: torch.Tensor | None = None  # the first answer's hidden states (hidden-state rewards only)
    draws: list[list[int]] = field(default_factory=list)  # K > 1: the K prefixes drawn from z
    draw_directions: torch.Tensor | None = None  # K > 1: -d log p(x^k | z) / dz, [K, L, H]
    sample_rewards: list[list[float]] = field(default_factory=list)
    scored_details: list[Mapping[str, Any]] = field(default_factory=list)
    generated_by_step: list[int] = field(default_factory=list)
    scored_by_step: list[int] = field(default_factory=list)


class LatentSeek:
    """LatentSeek over a transformers causal LM.

    Args:
        model: a causal LM (Qwen2/2.5/3, Llama, Mistral, ...; tied or untied LM head) in eval mode.
        tokenizer: its tokenizer, with a chat template.
        reward: a :class:`~latentseek.rewards.BatchReward` or a callable ``f(question, answer[, gold]) -> float``.
        config: the hyper-parameters (default :class:`LatentSeekConfig`).

    Example::

        model, tokenizer = latentseek.load_model("/models/qwen2.5-0.5b-instruct-q4.gguf")
        reward = latentseek.rewards.SelfReward(model, tokenizer)
        seek = latentseek.LatentSeek(model, tokenizer, reward, latentseek.LatentSeekConfig(rho=0.2, lr=0.03))
        result = seek.solve("Tom has 3 apples and buys 5 more. How many apples does he have?")
        print(result.final_answer, result.rewards, result.steps)
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, reward: RewardLike, config: LatentSeekConfig | None = None
    ) -> None:
        self.adapter = ModelAdapter.of(model)
        self.tokenizer = tokenizer
        self.reward = as_reward(reward)
        self.config = config or LatentSeekConfig()
        self.stop_ids = stop_token_ids(tokenizer, self.adapter)
        self.context = model_context_length(self.adapter, tokenizer)
        self.needs_hidden = isinstance(self.reward, HiddenStateReward)
        if self.config.impl == "ext" and not latentseek_ext.extension_available(self.adapter.device):
            raise ConfigError(
                f"LatentSeekConfig.impl='ext' but latentseek_ext has no compiled kernel for {self.adapter.device}; "
                "build it (pip install --no-build-isolation -e .) or use impl='auto' / 'reference'"
            )

    def solve(self, problem: Prompt, gold: str | None = None) -> Result:
        """LatentSeek on one question (a string, or a list of chat messages)."""
        if not isinstance(problem, str) and problem and all(isinstance(p, str) for p in problem):
            raise TypeError("solve takes one problem (a string or a list of messages); use solve_batch for a list")
        return self.solve_batch([problem], None if gold is None else [gold])[0]

    def solve_batch(
        self,
        problems: Sequence[Prompt],
        golds: Sequence[str | None] | None = None,
        *,
        progress: bool | Callable[[int, int], None] = False,
        on_answer: AnswerCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[Result]:
        """LatentSeek on several problems at once; the results equal those of :meth:`solve` one by one.

        Args:
            problems: questions (strings) or chat message lists.
            golds: reference answers for rewards that use them (one per problem, or None).
            progress: True shows a tqdm bar; a callable gets ``(problems finished, total)`` after every phase.
            on_answer: called as ``on_answer(problem index, step, answer text, reward)`` for every rewarded answer
                (step 0 is the initial answer), e.g. to stream a search as it goes.
            on_progress: gets a :class:`~latentseek.progress.ProgressEvent` at every phase and, while a generation
                runs, at most every :data:`~latentseek.progress.INTERVAL` seconds (phase, step, tokens so far),
                so that a slow batch can be told from a hung one. The same events go to an enclosing
                :func:`latentseek.progress.reporting` block when this is None.

        Raises:
            ContextLengthError: before any model work, for the first problem that cannot fit in the model's context
                under ``config.context_policy`` (its ``problem`` attribute is that problem's index); see
                :meth:`check_context` to find every such problem of a batch beforehand.
        """
        if on_progress is not None:
            with reporting(on_progress):
                return self.solve_batch(problems, golds, progress=progress, on_answer=on_answer)
        if isinstance(problems, str) or not isinstance(problems, Sequence):
            raise TypeError("solve_batch takes a list of problems")
        if not problems:
            raise ValueError("solve_batch got no problems")
        golds = [None] * len(problems) if golds is None else list(golds)
        if len(golds) != len(problems):
            raise ValueError(f"got {len(golds)} gold answers for {len(problems)} problems")
        searches = [self._fit(i, p, g) for i, (p, g) in enumerate(zip(problems, golds, strict=True))]
        report = _progress_reporter(progress, len(searches))
        announce = _answer_announcer(on_answer, searches, self.tokenizer)

        self._generate(searches)
        self._reward(searches)
        announce(searches)
        report(sum(not self._searching(s) for s in searches))
        active = self._init_latents(searches)
        optimizer = torch.optim.Adam([s.z for s in active], lr=self.config.lr) if active else None
        while active:
            if self.config.samples == 1:
                self._update(active, optimizer)
                self._reward(active, self._decode(active))
            else:
                self._draw(active)
                self._decode_draws(active)
            announce(active)
            report(sum(not self._searching(s) for s in searches))
            active = [s for s in active if self._searching(s)]
            if active and self.config.samples > 1:
                self._update_draws(active, optimizer)
        report(len(searches), close=True)
        return [self._result(s) for s in searches]

    def check_context(self, problems: Sequence[Prompt]) -> list[ContextLengthError | None]:
        """Per problem, the :class:`ContextLengthError` that :meth:`solve_batch` would raise for it (its ``problem``
        attribute is its index in `problems`), or None when it fits (after ``config.context_policy``, if needed).

        Tokenizes only; no model work. A problem fits when its prompt plus :func:`~latentseek.config.answer_token_bound`
        tokens, and (for a reward with ``context_need``, such as :class:`~latentseek.rewards.SelfReward`) each
        verifier prompt with an answer of that many tokens plus the verifier's max_new_tokens, fit in the context.
        """
        errors: list[ContextLengthError | None] = []
        for i, problem in enumerate(problems):
            try:
                self._fit(i, problem, None)
            except ContextLengthError as e:
                errors.append(e)
            else:
                errors.append(None)
        return errors

    # --- fitting the context -------------------------------------------------------------------------------------

    def _needs(self, prompt: list[int], question: str, max_new: int) -> list[ContextNeed]:
        """What the problem asks of the context with generations capped at `max_new` tokens."""
        cfg = self.config
        bound = answer_token_bound(max_new, cfg.rho, cfg.start_index, cfg.max_steps)
        detail = f"max_new_tokens {max_new}"
        if bound > max_new:
            detail += f" after up to {bound - max_new} kept and optimised answer tokens"
        needs = [ContextNeed("prompt", len(prompt), bound, self.context, detail)]
        reward_need = getattr(self.reward, "context_need", None)
        if reward_need is not None:
            needs.append(reward_need(question, bound))
        return needs

    def _fit(self, index: int, problem: Prompt, gold: str | None) -> _Search:
        """The problem's search, its prompt made to fit the model's context by ``config.context_policy``.

        Raises ContextLengthError (``problem=index``) when it does not fit and the policy cannot make it.
        """
        cfg = self.config
        messages = as_messages(problem)
        prompt = build_prompt_ids(self.tokenizer, messages)
        question = question_text(messages)
        needs = self._needs(prompt, question, cfg.max_new_tokens)
        over = next((n for n in needs if n.excess > 0), None)
        if over is None:
            return _Search(question, gold, prompt, cfg.max_new_tokens)
        if cfg.context_policy == "clamp-new-tokens":
            if any(n.excess for n in self._needs(prompt, question, 1)):
                raise over.error(index, "even max_new_tokens 1 does not fit: shorten the question or truncate it")
            lo, hi = 1, cfg.max_new_tokens  # the most that fits lies in [lo, hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if any(n.excess for n in self._needs(prompt, question, mid)) else (mid, hi)
            return _Search(question, gold, prompt, lo)
        if cfg.context_policy == "truncate-question":
            drop = 0
            for _ in range(_TRUNCATION_TRIES):  # the text re-tokenizes a little differently once cut: try again
                drop += max(n.excess for n in needs)
                truncated = truncate_middle(self.tokenizer, question, drop)
                if truncated is None:
                    raise over.error(index, "even with its whole question cut it does not fit: lower max_new_tokens")
                cut_messages = _with_question(messages, truncated[0])
                prompt = build_prompt_ids(self.tokenizer, cut_messages)
                needs = self._needs(prompt, truncated[0], cfg.max_new_tokens)
                if not any(n.excess for n in needs):
                    return _Search(truncated[0], gold, prompt, cfg.max_new_tokens, cut=truncated[1])
        raise over.error(index, _CONTEXT_HINT)

    # --- the steps ---------------------------------------------------------------------------------------------

    def _extend(self, searches: list[_Search], rows: list, **kwargs: Any) -> Generation:
        """:func:`extend` with each problem's own ``max_new``: one call per distinct cap (a row's generation does not
        depend on the other rows of its batch, so the grouping changes no result). ``rows[i]`` is ``searches[i]``'s.
        """
        caps = sorted({s.max_new for s in searches})
        if len(caps) == 1:
            return extend(self.adapter, rows, caps[0], self.stop_ids, decode=self.config.decode, **kwargs)
        n, keep_prefix = len(rows), kwargs.pop("keep_prefix", None)
        out = Generation([[]] * n, [False] * n, [None] * n if kwargs.get("return_hidden") else None, [None] * n, 0)
        for cap in caps:
            index = [i for i, s in enumerate(searches) if s.max_new == cap]
            keep = None if keep_prefix is None else [keep_prefix[i] for i in index]
            gen = extend(
                self.adapter,
                [rows[i] for i in index],
                cap,
                self.stop_ids,
                keep_prefix=keep,
                decode=self.config.decode,
                **kwargs,
            )
            for j, i in enumerate(index):
                out.tokens[i], out.stopped[i], out.prefixes[i] = gen.tokens[j], gen.stopped[j], gen.prefixes[j]
                if out.hidden is not None:
                    out.hidden[i] = gen.hidden[j]
            out.prefill_tokens += gen.prefill_tokens
        return out

    def _searching(self, s: _Search) -> bool:
        return s.z is not None and s.rewards[-1] <= self.config.reward_threshold and s.steps < self.config.max_steps

    def _generate(self, searches: list[_Search]) -> None:
        """Step 1: the greedy answers, their hidden states, and the KV cache of prompt + answer[:start]."""
        start = self.config.start_index
        with self._timed(searches, "generate"):
            gen = self._extend(
                searches,
                [(None, s.prompt) for s in searches],
                return_hidden=True,
                keep_prefix=[len(s.prompt) + start for s in searches],
            )
        for s, tokens, hidden, cache in zip(searches, gen.tokens, gen.hidden, gen.prefixes, strict=True):
            s.answers.append(tokens)
            s.generated += len(tokens)
            s.generated_by_step.append(s.generated)
            s.prefilled += len(s.prompt)
            if self.needs_hidden:
                s.first_hidden = hidden
            L = update_length(len(tokens), self.config.rho, start)
            if L > 0:
                s.kept, s.cache = tokens[:start], cache
                # z is float32 (float64 for float64 models) whatever the model dtype, so that Adam's small steps
                # are not rounded away in bfloat16; the LM head reads z cast to the model dtype.
                s.z = torch.nn.Parameter(hidden[start : start + L].to(acc_dtype(self.adapter.dtype)).clone())

    def _reward(self, searches: list[_Search], hidden: list[torch.Tensor] | None = None) -> None:
        """Step 2: R for the latest answer of each problem, all in one reward call (`hidden`: the answers' states,
        for a hidden-state reward; None: the first answers, whose states are kept in ``first_hidden``)."""
        if self.needs_hidden and hidden is None:
            hidden = [s.first_hidden for s in searches]
        scores = self._score(searches, searches, [s.answers[-1] for s in searches], hidden)
        for s, score in zip(searches, scores, strict=True):
            s.rewards.append(score.value)
            s.details.append(score.details)
            s.scored_by_step.append(len(s.scored_details))

    def _score(
        self,
        timed: list[_Search],
        owners: list[_Search],
        answers: list[list[int]],
        hidden: list[torch.Tensor] | None,
    ) -> list[Score]:
        """The scores of `answers` (``answers[i]`` belongs to ``owners[i]``) in one reward call, timed as the reward
        phase of the problems `timed`; every score is also kept in its owner's ``scored_details``."""
        with self._timed(timed, "reward"):
            texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            scores = evaluate(self.reward, [s.question for s in owners], texts, [s.gold for s in owners], hidden)
        for s, score in zip(owners, scores, strict=True):
            s.scored_details.append(score.details)
        return scores

    def _answer_hidden(self, s: _Search, prefix: int, continuation: torch.Tensor | None) -> torch.Tensor:
        """The states behind an answer answer[:start] + prefix tokens + continuation (see the module docstring)."""
        parts = [s.first_hidden[: len(s.kept)], s.z.detach()[:prefix].to(self.adapter.dtype)]
        if continuation is not None:
            parts.append(continuation)
        return torch.cat(parts)

    def _init_latents(self, searches: list[_Search]) -> list[_Search]:
        """Step 3: the problems that need optimising, with x = argmax lm_head(z) and its log-prob gradient."""
        active = [s for s in searches if self._searching(s)]
        if active and self.config.samples == 1:
            with self._timed(active, "update"):
                self._policy(active)
        return active

    def _policy(self, searches: list[_Search]) -> None:
        """One fused-op call over the latents of all ``searches``: x = argmax lm_head(z), -d log p(x | z) / dz."""
        z = torch.cat([s.z.detach() for s in searches]).to(self.adapter.dtype)
        x, _, direction = latentseek_ext.lm_head_policy_grad(
            z, self.adapter.weight, None, bias=self.adapter.bias, impl=self.config.impl
        )
        sizes = [s.z.shape[0] for s in searches]
        for s, xs, ds in zip(searches, x.split(sizes), direction.split(sizes), strict=True):
            s.prefix, s.direction = xs.tolist(), ds.to(s.z.dtype)

    def _update(self, searches: list[_Search], optimizer: torch.optim.Optimizer) -> None:
        """Step 4a: one Adam step on -R * sum_t log p(x_t | z_t) for each problem, then the new prefix x'."""
        with self._timed(searches, "update"):
            for s in searches:
                s.z.grad = s.rewards[-1] * s.direction
                if self.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([s.z], self.config.grad_clip)
            optimizer.step()  # problems that left the loop have no grad, so Adam leaves their z and state alone
            for s in searches:
                s.z.grad = None
                s.steps += 1
            self._policy(searches)

    def _decode(self, searches: list[_Search]) -> list[torch.Tensor] | None:
        """Step 4b: answer[:start] + x' + the greedy continuation after it (none if x' contains a stop token).
        Returns the new answers' hidden states for a hidden-state reward (else None)."""
        stop = set(self.stop_ids)
        rows, continued = [], []
        hidden: dict[int, torch.Tensor] = {}
        for s in searches:
            cut = next((i for i, t in enumerate(s.prefix) if t in stop), None)
            if cut is None:
                rows.append((s.cache, s.prefix))
                continued.append(s)
            else:
                s.answers.append(s.kept + s.prefix[: cut + 1])
                s.generated_by_step.append(s.generated)
                if self.needs_hidden:
                    hidden[id(s)] = self._answer_hidden(s, cut + 1, None)
        with self._timed(searches, "generate"):
            gen = self._extend(continued, rows, return_hidden=self.needs_hidden) if rows else None
        for i, s in enumerate(continued):
            s.answers.append(s.kept + s.prefix + gen.tokens[i])
            s.generated += len(gen.tokens[i])
            s.generated_by_step.append(s.generated)
            s.prefilled += len(s.prefix)
            if self.needs_hidden:
                hidden[id(s)] = self._answer_hidden(s, len(s.prefix), gen.hidden[i])
        return [hidden[id(s)] for s in searches] if self.needs_hidden else None

    # --- K samples -------------------------------------------------------------------------------------------------

    def _offsets(self, s: _Search) -> torch.Tensor:
        """The sampler's counter of every draw of the problem's next step, ``[K * L]`` (see the module docstring)."""
        K, L = self.config.samples, s.z.shape[0]
        key = counter_key(repr(s.prompt).encode())
        index = (s.steps * K + torch.arange(K)[:, None]) * MAX_UPDATE_LENGTH + torch.arange(L)[None, :]
        return (key << 32) + index.reshape(-1)

    def _draw(self, searches: list[_Search]) -> None:
        """K prefixes per problem from its latents, and -d log p / dz of each draw: one fused-op call for all."""
        K = self.config.samples
        with self._timed(searches, "update"):
            z = torch.cat([s.z.detach().repeat(K, 1) for s in searches]).to(self.adapter.dtype)
            offsets = torch.cat([self._offsets(s) for s in searches]).to(z.device)
            x, _, direction = latentseek_ext.lm_head_policy_grad(
                z,
                self.adapter.weight,
                None,
                bias=self.adapter.bias,
                sample=True,
                seed=self.config.seed,
                offsets=offsets,
                impl=self.config.impl,
            )
            sizes = [K * s.z.shape[0] for s in searches]
            for s, xs, ds in zip(searches, x.split(sizes), direction.split(sizes), strict=True):
                L = s.z.shape[0]
                s.draws = [xs[k * L : (k + 1) * L].tolist() for k in range(K)]
                s.draw_directions = ds.reshape(K, L, -1).to(s.z.dtype)

    def _decode_draws(self, searches: list[_Search]) -> None:
        """Each draw's answer (distinct prefixes decoded once, in one generation), their rewards (one call), and the
        step's answer: the best-rewarded draw, the earliest among equals."""
        stop = set(self.stop_ids)
        rows, row_owner, answers, owners, hidden = [], [], [], [], []
        which: dict[int, list[int]] = {}  # id(search) -> the distinct answer of each draw
        pending: list[tuple[_Search, int, int]] = []  # (search, distinct answer index, prefix length) to continue
        for s in searches:
            seen: dict[tuple[int, ...], int] = {}
            which[id(s)] = []
            for prefix in s.draws:
                cut = next((i for i, t in enumerate(prefix) if t in stop), None)
                prefix = prefix if cut is None else prefix[: cut + 1]
                if tuple(prefix) not in seen:
                    seen[tuple(prefix)] = len(answers)
                    answers.append(s.kept + prefix)
                    owners.append(s)
                    hidden.append(None)
                    if cut is None:
                        rows.append((s.cache, prefix))
                        row_owner.append(s)
                        pending.append((s, len(answers) - 1, len(prefix)))
                        s.prefilled += len(prefix)
                    elif self.needs_hidden:
                        hidden[-1] = self._answer_hidden(s, len(prefix), None)
                which[id(s)].append(seen[tuple(prefix)])
        with self._timed(searches, "generate"):
            gen = self._extend(row_owner, rows, return_hidden=self.needs_hidden) if rows else None
        for j, (s, a, n) in enumerate(pending):
            answers[a] = answers[a] + gen.tokens[j]
            s.generated += len(gen.tokens[j])
            if self.needs_hidden:
                hidden[a] = self._answer_hidden(s, n, gen.hidden[j])
        scores = self._score(searches, owners, answers, hidden if self.needs_hidden else None)
        for s in searches:
            draw_scores = [scores[a] for a in which[id(s)]]
            values = [d.value for d in draw_scores]
            best = max(range(len(values)), key=lambda k: (values[k], -k))
            s.answers.append(answers[which[id(s)][best]])
            s.rewards.append(values[best])
            s.details.append(draw_scores[best].details)
            s.sample_rewards.append(values)
            s.scored_by_step.append(len(s.scored_details))
            s.steps += 1
            s.generated_by_step.append(s.generated)

    def _update_draws(self, searches: list[_Search], optimizer: torch.optim.Optimizer) -> None:
        """One Adam step per problem on REINFORCE with the mean baseline over its K draws (see the module docstring)."""
        with self._timed(searches, "update"):
            for s in searches:
                s.z.grad = reinforce_gradient(s.sample_rewards[-1], s.draw_directions)
                if self.config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([s.z], self.config.grad_clip)
            optimizer.step()
            for s in searches:
                s.z.grad = None

    def _result(self, s: _Search) -> Result:
        final = max(range(len(s.rewards)), key=lambda i: (s.rewards[i], -i)) if self.config.keep_best else -1
        final %= len(s.rewards)
        return Result(
            question=s.question,
            answers=[self.tokenizer.decode(a, skip_special_tokens=True) for a in s.answers],
            answer_ids=s.answers,
            rewards=s.rewards,
            reward_details=s.details,
            final_index=final,
            steps=s.steps,
            update_length=0 if s.z is None else s.z.shape[0],
            solved=s.rewards[final] > self.config.reward_threshold,
            prompt_tokens=len(s.prompt),
            generated_tokens=s.generated,
            prefill_tokens=s.prefilled,
            time=s.time,
            max_new_tokens=s.max_new,
            question_tokens_cut=s.cut,
            sample_rewards=s.sample_rewards,
            scored_details=s.scored_details,
            generated_by_step=s.generated_by_step,
            scored_by_step=s.scored_by_step,
        )

    @contextmanager
    def _timed(self, searches: list[_Search], phase: str):
        """Add the phase's wall time, shared equally, to each problem taking part (CUDA work included); the phase is
        announced to :mod:`latentseek.progress` with the optimiser steps its problems have taken so far."""
        steps = max((s.steps for s in searches), default=0)
        enter_phase(phase, problems=len(searches), step=steps, max_steps=self.config.max_steps)
        t0 = time.perf_counter()
        yield
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)
        share = (time.perf_counter() - t0) / max(1, len(searches))
        for s in searches:
            s.time[phase] += share


def reinforce_gradient(rewards: Sequence[float], directions: torch.Tensor) -> torch.Tensor:
    """The gradient in z of REINFORCE with the mean baseline over K draws,
    ``loss = -(1/K) sum_k (R_k - mean_j R_j) sum_t log p(x^k_t | z_t)``, i.e. ``(1/K) sum_k (R_k - mean R) d_k``.

    Args:
        rewards: R_k, one per draw (K of them).
        directions: ``[K, L, H]``, ``d_k = -d log p(x^k | z) / dz`` (what the fused op returns with reward 1).

    Returns:
        ``[L, H]`` in the directions' dtype; zero when all K rewards are equal.
    """
    if directions.dim() != 3 or directions.shape[0] != len(rewards):
        raise ValueError(
            f"reinforce_gradient: directions must be [K, L, H] with K = {len(rewards)} rewards, "
            f"got shape {list(directions.shape)}"
        )
    r = torch.tensor(list(rewards), dtype=torch.float64)
    advantage = ((r - r.mean()) / len(rewards)).to(directions.dtype).to(directions.device)
    return torch.einsum("k,klh->lh", advantage, directions)


_CONTEXT_HINT = (
    "shorten the question, lower max_new_tokens (or the verifier's), or choose the context policy "
    "'truncate-question' or 'clamp-new-tokens'"
)
_TRUNCATION_TRIES = 8


def _with_question(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """A copy of `messages` whose last user message (the question) is `text`."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [dict(m, content=text) if i == last else dict(m) for i, m in enumerate(messages)]


def _progress_reporter(progress: bool | Callable[[int, int], None], total: int):
    """``report(done, close=False)``: forwards to the callback, or drives a tqdm bar."""
    if callable(progress):
        return lambda done, close=False: progress(done, total)
    if not progress:
        return lambda done, close=False: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="LatentSeek", unit="problem")

    def report(done: int, close: bool = False) -> None:
        bar.update(done - bar.n)
        if close:
            bar.close()

    return report


def _answer_announcer(on_answer: AnswerCallback | None, searches: list[_Search], tokenizer):
    """``announce(some searches)``: passes each one's latest answer and reward to `on_answer` (if any)."""
    if on_answer is None:
        return lambda subset: None
    index = {id(s): i for i, s in enumerate(searches)}

    def announce(subset: list[_Search]) -> None:
        for s in subset:
            text = tokenizer.decode(s.answers[-1], skip_special_tokens=True)
            on_answer(index[id(s)], s.steps, text, s.rewards[-1])

    return announce
