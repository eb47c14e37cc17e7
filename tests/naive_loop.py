"""A naive LatentSeek, written as the paper's code runs it: no KV cache (a full forward over the whole sequence
for every token) and autograd through the LM head. It is the reference of tests/test_loop.py and the baseline of
benchmarks/bench_loop.py."""

from __future__ import annotations

from collections import defaultdict

import torch

from latentseek import MAX_UPDATE_LENGTH, LatentSeekConfig
from latentseek.chat import build_prompt_ids, stop_token_ids


class Scripted:
    """Reward i of a question is ``script[i]`` (the last value repeats): the same sequence for every runner."""

    def __init__(self, script: list[float]) -> None:
        self.script = script
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, question: str, answer: str) -> float:
        i = self.calls[question]
        self.calls[question] += 1
        return self.script[min(i, len(self.script) - 1)]


def naive_generate(
    model, ids: list[int], max_new: int, stop: set[int], *, all_logits: bool = False
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with a full forward over the whole sequence for every token, as the original did.

    With ``all_logits`` the LM head runs over every position, as ``model(ids).logits`` does in the original (its
    cost, for the benchmark); the token is the last position's argmax either way.
    """
    tokens, hidden = [], []
    with torch.no_grad():
        for _ in range(max_new):
            states = model.model(torch.tensor([ids + tokens], device=model.device)).last_hidden_state[0]
            h = states[-1]
            logits = model.lm_head(states)[-1] if all_logits else model.lm_head(h)
            tokens.append(int(logits.argmax()))
            hidden.append(h)
            if tokens[-1] in stop:
                break
    return tokens, hidden


def naive_latentseek(
    model, tok, question: str, reward, cfg: LatentSeekConfig, *, all_logits: bool = False
) -> tuple[list[list[int]], list[float]]:
    """LatentSeek as the paper's code runs it (plus this project's stop-token-in-prefix rule); ``all_logits``: see
    :func:`naive_generate`."""
    stop = set(stop_token_ids(tok, model))
    prompt = build_prompt_ids(tok, question)
    answer, hidden = naive_generate(model, prompt, cfg.max_new_tokens, stop, all_logits=all_logits)
    answers, rewards = [answer], [reward(question, tok.decode(answer, skip_special_tokens=True))]
    start = cfg.start_index
    L = min(int(cfg.rho * len(answer)), MAX_UPDATE_LENGTH, len(answer) - start)
    if L <= 0:
        return answers, rewards
    z = torch.nn.Parameter(torch.stack(hidden[start : start + L]).clone())
    optimizer = torch.optim.Adam([z], lr=cfg.lr)
    for _ in range(cfg.max_steps):
        if rewards[-1] > cfg.reward_threshold:
            break
        optimizer.zero_grad()
        logits = model.lm_head(z)
        x = logits.argmax(-1)
        loss = -rewards[-1] * torch.log_softmax(logits, -1).gather(1, x[:, None]).sum()
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([z], cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            prefix = model.lm_head(z).argmax(-1).tolist()
        cut = next((i for i, t in enumerate(prefix) if t in stop), None)
        if cut is not None:
            new = answer[:start] + prefix[: cut + 1]
        else:
            new = answer[:start] + prefix
            new += naive_generate(model, prompt + new, cfg.max_new_tokens, stop, all_logits=all_logits)[0]
        answers.append(new)
        rewards.append(reward(question, tok.decode(new, skip_special_tokens=True)))
    return answers, rewards
