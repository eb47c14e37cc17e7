r"""SLOT (Hu et al. 2025, "SLOT: Sample-specific Language Model Optimization at Test-time", arXiv 2505.12392).

One vector delta (``[H]``) per problem is added to the final hidden states, the post-norm h that the LM head reads
(``logits = W (h + delta) + b``), fitted for a few optimiser steps to the problem's own prompt, then kept while the
answer is generated. For each problem, with prompt tokens x_0 .. x_{n-1}:

1. **read the prompt**: the model reads x_0 .. x_{n-2} once; their hidden states h_0 .. h_{n-2} (h_t predicts
   x_{t+1}) and the KV cache are kept. The model is not run again during the optimisation.
2. **optimise delta** (zero at the start) for ``steps`` AdamW steps on the prompt's mean next-token loss

   .. math::

       \mathcal{L}(\delta) = -\frac{1}{n-1} \sum_{t=0}^{n-2} \log \mathrm{softmax}\big(W (h_t + \delta) + b\big)_{x_{t+1}},
       \qquad
       \nabla_\delta \mathcal{L} = \sum_{t=0}^{n-2} \mathrm{grad}_t,

   where grad_t is ``latentseek_ext.lm_head_policy_grad(h_t + delta, W, reward=1/(n-1), tokens=x_{t+1})``'s
   gradient row, ``-(1/(n-1)) * d log p(x_{t+1}) / dz`` at z = h_t + delta. One pass over the vocabulary per step
   for all prompt positions of all problems, no ``[positions, V]`` logits and no autograd.
3. **generate** greedily after the cached prompt from x_{n-1}, the problem's delta added to every hidden state the
   LM head reads, the last prompt token's included (:func:`latentseek.generation.extend`'s ``offset``).

Defaults, from the authors' code (github.com/maple-research-lab/SLOT: ``run.sh`` runs "SLOT with iters=5" with
``times=5``, ``lr=0.1``; the forward patch in its README builds ``delta = 0 * randn([1, 1, H])`` and
``AdamW([delta], lr, weight_decay=1e-8, eps=1e-5)`` and minimises ``CrossEntropyLoss`` of the shifted prompt):
5 steps, learning rate 0.1, delta initialised to zero, AdamW with weight decay 1e-8 and eps 1e-5; the loss is the
mean over the prompt's positions. Where this differs from that code:

- **every problem of a batch has its own delta** (a ``[B, H]`` parameter; each row's gradient is the sum over its
  own positions only). The public code holds one ``[1, 1, H]`` delta for the whole batch, so a problem's answer
  depends on the other problems it is batched with; here the deltas, and so the answers, are those of solving each
  problem alone (AdamW acts element-wise, so one ``[B, H]`` parameter is B independent optimisers).
- the loss averages over each prompt's own tokens; padding positions are not part of it.
- delta is kept in float32 whatever the model's dtype (the public code casts it to the model's dtype); it is cast to
  the model's dtype where it is added to h.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import latentseek_ext
from latentseek_ext import IMPLS, Impl, acc_dtype

from .chat import Prompt, as_messages, build_prompt_ids, stop_token_ids
from .config import LatentSeekConfig
from .context import ContextNeed, model_context_length
from .errors import ConfigError
from .generation import extend
from .kv_cache import PrefixCache, new_cache, take_prefix
from .model import ModelAdapter
from .progress import enter_phase
from .static_decode import DECODES, Decode

#: AdamW's weight decay and eps, the authors' (not knobs: they fix them in their code too).
WEIGHT_DECAY = 1e-8
ADAM_EPS = 1e-5

PHASES = ("prompt", "optimise", "generate")


@dataclass
class SlotConfig:
    """Hyper-parameters of :class:`Slot` (defaults: the authors', see the module docstring).

    Attributes:
        steps: AdamW steps on delta per problem; 0 generates with delta = 0 (the plain greedy answer).
        lr: AdamW learning rate on delta.
        max_new_tokens: most tokens of each answer.
        impl: implementation of the fused LM-head op (``"auto"``, ``"ext"``, ``"reference"``).
        decode: the generation's decode steps (``"eager"`` / ``"graph"`` / ``"compiled"``; None: the device's default).
    """

    steps: int = 5
    lr: float = 0.1
    max_new_tokens: int = LatentSeekConfig.max_new_tokens
    impl: Impl = "auto"
    decode: Decode | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"SlotConfig.steps must be >= 0, got {self.steps}")
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise ConfigError(f"SlotConfig.lr must be a positive finite number, got {self.lr}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"SlotConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.impl not in IMPLS:
            raise ConfigError(f"SlotConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if self.decode is not None and self.decode not in DECODES:
            raise ConfigError(f"SlotConfig.decode must be None or one of {DECODES}, got {self.decode!r}")


@dataclass
class SlotResult:
    """SLOT on one problem.

    Attributes:
        answer: the generated answer's text; ``answer_ids`` its tokens (stop token included when one came).
        stopped: whether the answer ended on a stop token (False: it reached ``max_new_tokens``).
        delta: the fitted ``[H]`` vector (float32; float64 for a float64 model).
        losses: the prompt's mean next-token loss at the delta each step started from (``steps`` values; the
            first is the model's own loss, delta = 0).
        prompt_tokens: length of the chat-formatted prompt; ``generated_tokens``: ``len(answer_ids)``.
        time: wall seconds per phase ("prompt", "optimise", "generate"), a batch's shared equally.
    """

    answer: str
    answer_ids: list[int]
    stopped: bool
    delta: torch.Tensor
    losses: list[float]
    prompt_tokens: int
    generated_tokens: int
    time: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def total_time(self) -> float:
        return sum(self.time.values())


class Slot:
    """SLOT over a transformers causal LM (the model's weights are never changed).

    Example::

        model, tokenizer = latentseek.load_model("/models/qwen2.5-0.5b-instruct-q4.gguf")
        result = latentseek.slot.Slot(model, tokenizer).solve("Tom has 3 apples and buys 5 more. How many?")
        print(result.answer, result.losses)
    """

    def __init__(self, model: torch.nn.Module | ModelAdapter, tokenizer, config: SlotConfig | None = None) -> None:
        self.adapter = ModelAdapter.of(model)
        self.tokenizer = tokenizer
        self.config = config or SlotConfig()
        self.stop_ids = stop_token_ids(tokenizer, self.adapter)
        self.context = model_context_length(self.adapter, tokenizer)
        if self.config.impl == "ext" and not latentseek_ext.extension_available(self.adapter.device):
            raise ConfigError(
                f"SlotConfig.impl='ext' but latentseek_ext has no compiled kernel for {self.adapter.device}; "
                "build it (pip install --no-build-isolation -e .) or use impl='auto' / 'reference'"
            )

    def solve(self, problem: Prompt) -> SlotResult:
        """SLOT on one question (a string, or a list of chat messages)."""
        return self.solve_batch([problem])[0]

    def prompt_ids(self, problems: Sequence[Prompt]) -> list[list[int]]:
        """Each problem's chat prompt, checked before any model work: ContextLengthError (``problem`` = its index)
        when the prompt plus ``max_new_tokens`` exceeds the model's context; ValueError for a prompt of one token
        (the loss needs a next token)."""
        prompts = []
        for i, problem in enumerate(problems):
            ids = build_prompt_ids(self.tokenizer, as_messages(problem))
            if len(ids) < 2:
                raise ValueError(f"problem {i}: SLOT needs a prompt of at least 2 tokens, got {len(ids)}")
            need = ContextNeed("prompt", len(ids), self.config.max_new_tokens, self.context, "max_new_tokens")
            need.check(i, "shorten the question or lower max_new_tokens")
            prompts.append(ids)
        return prompts

    def solve_batch(self, problems: Sequence[Prompt]) -> list[SlotResult]:
        """SLOT on several problems at once, each with its own delta: the results equal those of :meth:`solve` one
        by one (up to the rounding of batched matrix products)."""
        if isinstance(problems, str) or not isinstance(problems, Sequence):
            raise TypeError(f"solve_batch takes a list of problems, got {type(problems).__name__}")
        if not problems:
            raise ValueError("solve_batch got no problems")
        prompts = self.prompt_ids(problems)
        times = [dict.fromkeys(PHASES, 0.0) for _ in prompts]
        with self._timed(times, "prompt"):
            hidden, prefixes = self.read_prompts(prompts)
        with self._timed(times, "optimise"):
            delta, losses = self.optimise(hidden, prompts)
        with self._timed(times, "generate"):
            gen = extend(
                self.adapter,
                [(prefix, ids[-1:]) for prefix, ids in zip(prefixes, prompts, strict=True)],
                self.config.max_new_tokens,
                self.stop_ids,
                decode=self.config.decode,
                offset=delta,
            )
        return [
            SlotResult(
                answer=self.tokenizer.decode(tokens, skip_special_tokens=True),
                answer_ids=tokens,
                stopped=stopped,
                delta=d,
                losses=loss,
                prompt_tokens=len(ids),
                generated_tokens=len(tokens),
                time=t,
            )
            for tokens, stopped, d, loss, ids, t in zip(
                gen.tokens, gen.stopped, delta, losses, prompts, times, strict=True
            )
        ]

    # --- the steps ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def read_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[PrefixCache]]:
        """Step 1: each prompt but its last token through the model, left-padded in one batch.

        Returns the hidden states ``[len - 1, H]`` of each prompt (model dtype; row t predicts token t + 1) and the
        KV cache of those tokens, from which :func:`extend` continues with the last prompt token.
        """
        heads = [list(ids[:-1]) for ids in prompts]
        n, T = len(heads), max(len(h) for h in heads)
        mask = torch.zeros(n, T, dtype=torch.long)
        input_ids = torch.zeros(n, T, dtype=torch.long)
        for i, head in enumerate(heads):
            mask[i, T - len(head) :] = 1
            input_ids[i, T - len(head) :] = torch.as_tensor(head, dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        device = self.adapter.device
        mask, input_ids, positions = mask.to(device), input_ids.to(device), positions.to(device)
        cache = new_cache(self.adapter, T)
        h = self.adapter.hidden(input_ids, mask, positions, cache)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        hidden = [h[i, T - len(head) :].clone() for i, head in enumerate(heads)]
        prefixes = [take_prefix(kv, mask, i, len(head)) for i, head in enumerate(heads)]
        return hidden, prefixes

    def optimise(
        self, hidden: Sequence[torch.Tensor], prompts: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, list[list[float]]]:
        """Step 2: ``config.steps`` AdamW steps on each problem's delta against its prompt's mean next-token loss.

        Args:
            hidden: per problem, the ``[len - 1, H]`` hidden states of :meth:`read_prompts`.
            prompts: per problem, the prompt's token ids (the targets are ``prompt[1:]``).

        Returns:
            the deltas ``[B, H]`` (float32; float64 for a float64 model) and, per problem, the loss at the delta
            each step started from.
        """
        cfg, adapter = self.config, self.adapter
        sizes = [h.shape[0] for h in hidden]
        for i, (size, ids) in enumerate(zip(sizes, prompts, strict=True)):
            if size != len(ids) - 1:
                raise ValueError(
                    f"problem {i}: hidden has {size} rows for a prompt of {len(ids)} tokens (want len - 1)"
                )
        h = torch.cat(list(hidden))  # [M, H]: every prompt position of every problem
        targets = torch.cat([torch.as_tensor(list(ids[1:]), dtype=torch.long) for ids in prompts]).to(h.device)
        delta = torch.nn.Parameter(
            torch.zeros(len(sizes), adapter.hidden_size, dtype=acc_dtype(adapter.dtype), device=h.device)
        )
        optimizer = torch.optim.AdamW([delta], lr=cfg.lr, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
        losses: list[list[float]] = [[] for _ in sizes]
        for _ in range(cfg.steps):
            loss, delta.grad = prompt_loss_grad(adapter, h, delta.detach(), targets, sizes, impl=cfg.impl)
            for i, value in enumerate(loss.tolist()):
                losses[i].append(value)
            optimizer.step()
        return delta.detach(), losses

    @contextmanager
    def _timed(self, times: list[dict[str, float]], phase: str) -> Iterator[None]:
        """Add the phase's wall time, shared equally, to each problem (CUDA work included)."""
        enter_phase(phase, problems=len(times), max_steps=self.config.steps)
        t0 = time.perf_counter()
        yield
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)
        share = (time.perf_counter() - t0) / len(times)
        for t in times:
            t[phase] += share


def prompt_loss_grad(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    delta: torch.Tensor,
    targets: torch.Tensor,
    sizes: Sequence[int],
    *,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each problem's mean next-token loss on its prompt and its gradient with respect to the problem's delta.

    Args:
        adapter: the model (its LM head W, b).
        hidden: ``[M, H]`` (model dtype): the prompt positions of all problems, problem after problem, ``sizes[i]``
            rows for problem i.
        delta: ``[B, H]`` (float32 or float64), one row per problem.
        targets: int64 ``[M]``: the token each position predicts.
        sizes: the rows of each problem (``sum(sizes) == M``, ``len(sizes) == B``).
        impl: the fused op's implementation.

    Returns:
        ``loss [B]``: ``-mean_t log p(targets_t | h_t + delta_i)`` over problem i's rows, and ``grad [B, H]``: its
        gradient with respect to ``delta_i``, the sum of ``lm_head_policy_grad``'s rows with reward ``1 / sizes[i]``;
        both in delta's dtype.
    """
    if delta.dim() != 2 or delta.shape[0] != len(sizes):
        raise ValueError(f"delta must have shape [{len(sizes)}, H] (one row per problem), got {list(delta.shape)}")
    if hidden.shape[0] != sum(sizes) or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden and targets must have sum(sizes) = {sum(sizes)} rows, got {hidden.shape[0]} and "
            f"{list(targets.shape)}"
        )
    counts = torch.tensor(list(sizes), device=hidden.device)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=hidden.device), counts)
    reward = (1.0 / counts.to(delta.dtype))[owner]
    z = hidden + delta.to(hidden.dtype)[owner]
    _, logp, grad = latentseek_ext.lm_head_policy_grad(
        z, adapter.weight, reward, tokens=targets, bias=adapter.bias, impl=impl
    )
    # per-problem sums, each over its own rows in order (no atomics: the same sums alone or batched)
    loss = torch.stack([x.sum() for x in (-logp.to(delta.dtype) * reward).split(list(sizes))])
    grad = torch.stack([g.sum(0) for g in grad.to(delta.dtype).split(list(sizes))])
    return loss, grad
