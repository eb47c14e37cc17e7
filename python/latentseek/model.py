"""The model adapter: what LatentSeek needs from a transformers causal LM, found once and checked.

LatentSeek optimises the vectors z that the LM head reads, so it must be true that ``logits = W z + b`` with z the
base model's ``last_hidden_state`` (the output of the final norm). :class:`ModelAdapter` finds the base model and
the LM head (tied or untied), refuses models whose logits are transformed after the LM head (Gemma-2 style
final-logit softcapping, Cohere's logit scale, Granite's logit scaling, ...), and checks the identity numerically
on a short input when it is built.
"""

from __future__ import annotations

import json
import os
import re
import struct

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .errors import ModelLoadError
from .gguf_header import GGUF_MAGIC, read_gguf_header
from .quant import WEIGHTS, Weights, decode_head, quantize_weights

# Config attributes of transformers models that change the logits after the LM head, with their neutral values.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None, 0, 0.0),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
}

# The identity check's tolerance relative to the largest logit: both sides run the same matmul, so fp32 agrees to
# rounding; 16-bit dtypes get their own precision.
_CHECK_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}
_CHECK_TOKENS = 8


class ModelAdapter:
    """A causal LM seen as ``base`` (tokens -> post-norm hidden states) and an LM head ``logits = W h + b``.

    Args:
        model: a transformers causal LM (``*ForCausalLM``) with an ``lm_head``-style output embedding.
        check: run the numerical check that the model's logits equal ``W h + b`` (recommended; a few ms).

    Raises:
        ModelLoadError (a ValueError): the model has no LM head, is an encoder-decoder, or changes its logits after
            the LM head.
    """

    def __init__(self, model: torch.nn.Module, *, check: bool = True) -> None:
        config = getattr(model, "config", None)
        if config is None:
            raise ModelLoadError(f"LatentSeek needs a transformers model with a config, got {type(model).__name__}")
        if getattr(config, "is_encoder_decoder", False):
            raise ModelLoadError(
                f"LatentSeek needs a decoder-only causal LM, got encoder-decoder {type(model).__name__}"
            )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ModelLoadError(
                f"{type(model).__name__} has no LM head (get_output_embeddings() returned {type(head).__name__}): "
                "LatentSeek optimises the hidden states an LM head reads, so load the model with "
                "AutoModelForCausalLM, not AutoModel"
            )
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        for name, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(text_config, name, None)
            if value not in neutral:
                raise ModelLoadError(
                    f"{type(model).__name__} sets {name}={value}: its logits are not lm_head(h), so the LatentSeek "
                    "gradient (which differentiates W h + b) would be wrong for it; use a model whose logits are lm_head(h) "
                    "(Qwen2/2.5/3, Llama, Mistral, SmolLM2, ...)"
                )
        self.model = model
        self.base = model.get_decoder()
        self.weight = weight.detach()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach()
        embeddings = model.get_input_embeddings()
        self.tied = embeddings is not None and embeddings.weight.data_ptr() == weight.data_ptr()
        # the quantised copy of the head that latentseek.quant.quantize_weights gave the model, or None
        self.decode_head = decode_head(model)
        if check:
            self.check_logits()

    @classmethod
    def of(cls, model: torch.nn.Module | ModelAdapter) -> ModelAdapter:
        """The adapter of ``model``: ``model`` itself when it is one already, else a new (checked) adapter.

        Functions that take "a model or its adapter" call this once; passing the adapter avoids rebuilding it (the
        build runs the logits check, a short forward).
        """
        return model if isinstance(model, ModelAdapter) else cls(model)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def num_layers(self) -> int:
        config = self.model.config
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return text_config.num_hidden_layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits generation picks tokens from, for hidden states ``[*, H]`` in the model's dtype: ``W h + b``,
        or where the model's weights were quantised (:func:`latentseek.quant.quantize_weights`) its quantised copy
        of the head. The LatentSeek op always uses the dense ``W`` (:attr:`weight`)."""
        if self.decode_head is not None:
            return self.decode_head(hidden)
        return F.linear(hidden, self.weight, self.bias)

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """The base model's ``last_hidden_state`` ``[B, T, H]`` (post final norm), extending ``cache`` if given."""
        out = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    @torch.no_grad()
    def check_logits(self) -> None:
        """Raise ModelLoadError unless ``model(ids).logits == W h + b`` with h the base model's last hidden state."""
        ids = torch.arange(1, _CHECK_TOKENS + 1, device=self.device)[None] % self.vocab_size
        expected = self.model(input_ids=ids).logits.float()
        got = F.linear(self.hidden(ids), self.weight, self.bias).float()
        if expected.shape != got.shape:
            raise ModelLoadError(
                f"{type(self.model).__name__}'s logits have shape {list(expected.shape)} but its LM head gives "
                f"{list(got.shape)}: LatentSeek needs logits = lm_head(last hidden state)"
            )
        err = (expected - got).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        tol = _CHECK_RTOL.get(self.dtype, 1e-2) * scale
        if not err <= tol:
            raise ModelLoadError(
                f"{type(self.model).__name__}'s logits differ from lm_head(last hidden state) by up to {err:.3g} "
                f"(tolerance {tol:.3g}): the model transforms its logits after the LM head (softcapping, scaling, "
                "...), which LatentSeek cannot differentiate; use a model whose logits are lm_head(h) (Qwen2/2.5/3, "
                "Llama, Mistral, SmolLM2, ...)"
            )


_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FOLDER_HINT = (
    "pass a folder saved with save_pretrained (config.json, model.safetensors, tokenizer files) or a .gguf file"
)


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX-BF16 tiles or AVX512-BF16 dot products), as
    torch reports it. Where it does, oneDNN runs torch's bf16 matmuls at about twice the fp32 rate; elsewhere (AVX2
    only) they are emulated and slower than fp32."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The weights' dtype when none is asked for (``load_model(dtype=None)``, ``--dtype auto``): bfloat16 on CUDA and
    on CPUs with bfloat16 matrix units (:func:`cpu_has_bf16_units`), float32 on other CPUs. The one place that choice
    is made. The latents z and Adam's state stay float32 whatever the weights' dtype."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16_units() else torch.float32


def load_model(
    path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    chat_template: str | None = None,
    weights: Weights = "dense",
):
    """Load ``(model, tokenizer)`` from a local transformers directory or a GGUF file, ready for LatentSeek.

    Args:
        path: a model directory, a GGUF file (recognised by its magic bytes; ``gguf_file`` is then taken from it),
            or a Hugging Face hub id ``owner/name`` (needs a network or the hub cache).
        gguf_file: the GGUF file name inside the directory ``path`` (transformers dequantises it on load).
        dtype: the weights' dtype; None: :func:`default_dtype` of the device (bfloat16 on CUDA and on CPUs with
            bfloat16 matrix units, else float32).
        device: where the model goes.
        chat_template: a Jinja chat template for a tokenizer that has none (LatentSeek prompts through the chat
            template); None keeps the tokenizer's own.
        weights: ``"dense"`` (as loaded, in ``dtype``), or ``"int8"`` / ``"int4"``: the decoder's linears and a
            decoding copy of the LM head quantised weight-only for torch's CPU kernels
            (:func:`latentseek.quant.quantize_weights`; CPU only). The dense LM head stays for the LatentSeek op.

    Returns:
        the causal LM in eval mode without parameter gradients, and its tokenizer.

    Raises:
        ModelLoadError: one line saying what is wrong and what to do, for: a path that does not exist; a file that
            is neither a model folder nor a GGUF file; a folder without config.json, weights or tokenizer files; a
            GGUF or safetensors file that is truncated or corrupt (checked against its own header before any tensor
            is read); a model that is not a causal LM; a tokenizer without a chat template, or with more tokens than
            the model's embedding has rows; a device this machine does not have.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = os.fspath(path)
    device = _checked_device(device)
    if weights not in WEIGHTS:
        raise ModelLoadError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights != "dense" and device.type != "cpu":
        raise ModelLoadError(
            f"weights={weights!r} runs on torch's CPU kernels, but device {str(device)!r} was asked for; "
            "use device='cpu' or weights='dense'"
        )
    directory, gguf_file = _locate(path, gguf_file)
    if gguf_file is not None:
        header = read_gguf_header(os.path.join(directory, gguf_file))
        if not isinstance(header.metadata.get("general.architecture"), str):
            raise ModelLoadError(f"{path} has no general.architecture in its metadata; convert it again")
        if chat_template is None and not header.metadata.get("tokenizer.chat_template"):
            raise _no_chat_template(path)  # before the weights are dequantised
        # transformers reads the config with the weights (reading it alone costs as much as the tokenizer); its
        # errors after the header check are about the file's contents (an architecture it cannot load, ...)
        kwargs = {"gguf_file": gguf_file}
    else:
        if os.path.isdir(directory):
            _check_model_folder(directory)
        config = _from_transformers(path, "config", AutoConfig.from_pretrained, directory)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ModelLoadError(
                f"{path} is a {getattr(config, 'model_type', type(config).__name__)!r} model, which is not a causal "
                "LM (AutoModelForCausalLM has no class for it); LatentSeek needs a decoder-only chat model"
            )
        kwargs = {"config": config}
    tokenizer = _from_transformers(path, "tokenizer", AutoTokenizer.from_pretrained, directory, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise _no_chat_template(path)
    if dtype is None:
        dtype = default_dtype(device)
    model = _from_transformers(path, "model", AutoModelForCausalLM.from_pretrained, directory, dtype=dtype, **kwargs)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"the tokenizer of {path} has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
            "the tokenizer belongs to another model; put the model's own tokenizer files beside its weights"
        )
    model = model.to(device)
    model.eval().requires_grad_(False)
    quantize_weights(model, weights)
    return model, tokenizer


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


def _from_transformers(path: str, what: str, load, *args, **kwargs):
    """``load(*args, **kwargs)``, with the file errors of transformers (OSError, ValueError) as ModelLoadError."""
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as e:
        hint = _FOLDER_HINT
        if not os.path.exists(path):
            hint = f"{path!r} is not a local path, so it was tried as a hub id; {_FOLDER_HINT}"
        raise ModelLoadError(f"cannot load the {what} of {path}: {_first_line(e)}; {hint}") from e


def _no_chat_template(path: str) -> ModelLoadError:
    return ModelLoadError(
        f"the tokenizer of {path} has no chat template, and LatentSeek prompts through one; use a chat (instruct) "
        "model, whose tokenizer_config.json or GGUF metadata carries tokenizer.chat_template, or pass chat_template"
    )


def _checked_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"device {str(device)!r} is not a device name ({e}); use cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {str(device)!r} was asked for but this torch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); use cpu, or a machine with a GPU and a CUDA build of torch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {str(device)!r} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def _locate(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)`` for a model path, or ModelLoadError."""
    if gguf_file is not None:
        if not os.path.isdir(path):
            raise ModelLoadError(
                f"gguf_file {gguf_file!r} names a file inside the model folder, but {path!r} is not a folder; "
                "pass the folder, or pass the .gguf file itself as the model without gguf_file"
            )
        if not os.path.isfile(os.path.join(path, gguf_file)):
            found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            raise ModelLoadError(f"there is no {gguf_file!r} in {path}; its GGUF files: {found}")
        return path, gguf_file
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                start = f.read(8)
        except OSError as e:
            raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e
        if start[:4] == GGUF_MAGIC:
            directory, name = os.path.split(os.path.abspath(path))
            return directory, name
        raise ModelLoadError(
            f"{path} is neither a model folder nor a GGUF file (it starts with {start!r}, not {GGUF_MAGIC!r}); "
            f"{_FOLDER_HINT}"
        )
    if os.path.isdir(path):
        return path, None
    if path.endswith(".gguf") or not _HUB_ID.fullmatch(path):
        raise ModelLoadError(f"{path}: no such file or folder; {_FOLDER_HINT}, or a hub id (owner/name)")
    return path, None  # a hub id; transformers fetches it, or says why it cannot


def _check_model_folder(directory: str) -> None:
    """A transformers model folder has config.json (an object with a model_type), weights and tokenizer files."""
    files = set(os.listdir(directory))
    if "config.json" not in files:
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        if ggufs:
            raise ModelLoadError(
                f"{directory} has no config.json but holds GGUF files {ggufs}: pass one of them as the model "
                f"({os.path.join(directory, ggufs[0])}) or name it with gguf_file"
            )
        raise ModelLoadError(f"{directory} is not a model folder (no config.json) nor a GGUF file; {_FOLDER_HINT}")
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config_path} is not a readable JSON file ({e}); download the model again") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(
            f"{config_path} has no model_type, so it is not a transformers model config; {_FOLDER_HINT}"
        )
    weights = next((name for name in _WEIGHT_FILES if name in files), None)
    if weights is None:
        raise ModelLoadError(
            f"{directory} has config.json but no weights ({' or '.join(_WEIGHT_FILES[1::2])}); the download is "
            "incomplete: fetch the weights too"
        )
    if weights == "model.safetensors.index.json":
        shards = _safetensors_shards(os.path.join(directory, weights))
        missing = [s for s in shards if s not in files]
        if missing:
            raise ModelLoadError(
                f"{directory} lacks {len(missing)} of the {len(shards)} weight shards its "
                f"model.safetensors.index.json lists, e.g. {missing[0]}; the download is incomplete: fetch them"
            )
        for shard in shards:
            check_safetensors(os.path.join(directory, shard))
    elif weights == "model.safetensors":
        check_safetensors(os.path.join(directory, weights))
    if not files.intersection(_TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory} has no tokenizer files (one of {list(_TOKENIZER_FILES)}); save the tokenizer beside the "
            "model (tokenizer.save_pretrained) or download them too"
        )


def _safetensors_shards(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{index_path} is not a readable weight index ({e!r}); download it again") from e


def check_safetensors(path: str) -> None:
    """Raise ModelLoadError unless the safetensors file at `path` holds every tensor its header lists.

    The format: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data; offsets count from the end of the header.
    """
    redo = "download it again"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelLoadError(f"{path} is truncated: {size} bytes, shorter than its own header; {redo}")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise ModelLoadError(
                    f"{path} is truncated or corrupt: its header claims {n} bytes but the file has {size}; {redo}"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is corrupt: its header is not JSON ({e}); {redo}") from e
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path} is corrupt: a header entry has no data_offsets ({e!r}); {redo}") from e
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{path} is truncated: its tensors end at byte {8 + n + end} but the file has {size} bytes "
            f"({8 + n + end - size} missing); {redo}"
        )
