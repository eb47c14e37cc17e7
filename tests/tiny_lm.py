"""Tiny random causal LMs and a word-level chat tokenizer built in-process, for the engine's tests (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "system user assistant the a is of and to what how many much answer so we then total each has have are "
    "apples books cars dogs eggs pens step first next final value true false verdict check it right wrong not yes no "
    "x y z"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


QUESTIONS = ["what is 2 + 3 ?", "how many apples has each dog ?", "x", "the total of 12 pens and 7 books ?"]


def tiny_tokenizer(eos_token: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over SPECIAL + WORDS + digits + punctuation, with a ChatML-style template."""
    symbols = list("0123456789+-*/=?.,:!()$\\{}") + ["\n", " ", "Verdict", "True", "False", "boxed"]
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + symbols + ["[UNK]"])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|[0-9]|[^\sA-Za-z0-9]"), behavior="isolated")
    model.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model,
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIAL,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(
    arch: str = "qwen2", *, vocab_size: int, tie: bool = False, seed: int = 0, device: str = "cpu", **overrides
):
    """A 2-layer random causal LM in float32 on `device` (the weights drawn on the CPU: the same on every device),
    eval mode, no grad.

    The weights are drawn with std 0.2 (not the usual 0.02) so that the logits are far from uniform: greedy
    decoding then has clear margins (no near-ties that rounding could flip) and emits EOS at varied lengths.
    """
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
        initializer_range=0.2,
    )
    common.update(overrides)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    model.float().eval().requires_grad_(False)
    return model.to(device)
