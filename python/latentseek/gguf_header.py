"""A GGUF file checked against its own header before any tensor is read.

A GGUF file is a header, then the tensor data (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type: u32, value)        string = length u64 + UTF-8 bytes
    tensor_count x (name: string, n_dims: u32, dims: n_dims x u64, ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32) | tensor data

Tensor ``i`` occupies ``[data_offset + offset_i, data_offset + offset_i + nbytes_i)`` with
``nbytes = n_elements / block_size * type_size`` from the ggml type's block table (``gguf.GGML_QUANT_SIZES``).
:func:`read_gguf_header` parses the header with bounds checks (no tensor is touched) and checks that the file is long
enough for every tensor, so a truncated download or a corrupt file gives one :class:`ModelLoadError` line instead of
a reshape error from deep inside the loader. Little- and big-endian files, versions 2 and 3, are read.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF metadata value types (the spec's gguf_metadata_value_type) that are fixed-size scalars: struct formats.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the header: ``dims`` in GGUF order (fastest-varying first), ``offset`` relative to
    the data section, ``nbytes`` from its ggml type's block size and type size."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the header of a GGUF file says.

    ``metadata`` holds the scalar and string values (``general.architecture``, ``general.alignment``,
    ``tokenizer.chat_template``, ``<arch>.context_length``, ...); arrays (the vocabulary, merges) are skipped.
    """

    path: str
    version: int
    byte_order: str  # "<" little-endian, ">" big-endian
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo] = field(repr=False)
    alignment: int
    data_offset: int
    file_size: int

    @property
    def data_end(self) -> int:
        """The byte after the last tensor's data: the least size of a complete file."""
        return self.data_offset + max((t.offset + t.nbytes for t in self.tensors), default=0)


class _OutOfBounds(Exception):
    def __init__(self, needed: int) -> None:
        self.needed = needed


class _Cursor:
    """Reads little- or big-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buffer, size: int, order: str) -> None:
        self.buffer, self.size, self.order, self.pos = buffer, size, order, 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _OutOfBounds(start + n)
        self.pos = start + n
        return start

    def unpack(self, fmt: str) -> Any:
        s = struct.Struct(self.order + fmt)
        return s.unpack_from(self.buffer, self.take(s.size))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        start = self.take(n)
        return bytes(self.buffer[start : start + n]).decode("utf-8", errors="replace")

    def value(self, value_type: int, keep: bool = True) -> Any:
        """A metadata value; arrays are skipped (returned as None), scalars of an array not even decoded."""
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in _SCALAR_FORMATS:
                self.take(count * struct.calcsize(_SCALAR_FORMATS[item_type]))
            else:
                for _ in range(count):
                    self.value(item_type, keep=False)
            return None
        raise ValueError(f"unknown metadata value type {value_type}")


def _ggml_block_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf import GGML_QUANT_SIZES
    except ImportError:
        raise ModelLoadError("reading a GGUF file needs the `gguf` package: pip install gguf") from None
    return {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse the header of the GGUF file at `path` and check that the file holds every tensor it lists.

    Raises:
        ModelLoadError: the file does not start with the GGUF magic, has an unsupported version, or is truncated or
            corrupt (its header runs past the end of the file, names an unknown tensor type, has a misaligned
            tensor offset, or lists tensors whose data would end after the file's last byte).
    """
    path = os.fspath(path)
    redo = "download or convert it again"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 4 or f.read(4) != GGUF_MAGIC:
                f.seek(0)
                raise ModelLoadError(f"{path} is not a GGUF file: it starts with {f.read(8)!r}, not {GGUF_MAGIC!r}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _parse(path, buffer, size, redo)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e


def _parse(path: str, buffer, size: int, redo: str) -> GGUFHeader:
    cursor = _Cursor(buffer, size, "<")
    cursor.take(4)
    try:
        version = cursor.unpack("I")
        if version & 0xFFFF == 0:  # written big-endian (version is small, so its low bytes are zero once swapped)
            cursor.order, cursor.pos = ">", 4
            version = cursor.unpack("I")
        if version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(
                f"{path}: GGUF version {version} is not supported (versions {SUPPORTED_VERSIONS} are); "
                "convert the model again with a current llama.cpp"
            )
        tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            value_type = cursor.unpack("I")
            try:
                value = cursor.value(value_type)
            except ValueError as e:
                raise ModelLoadError(f"{path} is corrupt: metadata key {key!r} has {e}; {redo}") from None
            if value is not None:
                metadata[key] = value
        raw_tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.unpack("I")
            if n_dims > MAX_DIMS:
                raise ModelLoadError(
                    f"{path} is corrupt: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS}); {redo}"
                )
            dims = tuple(cursor.unpack("Q") for _ in range(n_dims))
            raw_tensors.append((name, dims, cursor.unpack("I"), cursor.unpack("Q")))
        header_end = cursor.pos
    except _OutOfBounds as e:
        raise ModelLoadError(
            f"{path} is truncated or corrupt: its header runs to byte {e.needed} but the file has {size} bytes; {redo}"
        ) from None

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise ModelLoadError(f"{path} is corrupt: general.alignment is {alignment!r}; {redo}")
    data_offset = -(-header_end // alignment) * alignment
    sizes = _ggml_block_sizes()
    tensors = []
    for name, dims, ggml_type, offset in raw_tensors:
        if ggml_type not in sizes:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has ggml type {ggml_type}, which the installed gguf package does not know; "
                f"the file is corrupt or newer than it (pip install -U gguf)"
            )
        block_size, type_size = sizes[ggml_type]
        elements = 1
        for d in dims:
            elements *= d
        if elements % block_size:
            raise ModelLoadError(
                f"{path} is corrupt: tensor {name!r} has {elements} elements, not a multiple of its type's block of "
                f"{block_size}; {redo}"
            )
        if offset % alignment:
            raise ModelLoadError(
                f"{path} is corrupt: tensor {name!r} starts at offset {offset}, not a multiple of the alignment "
                f"{alignment}; {redo}"
            )
        tensors.append(GGUFTensorInfo(name, dims, ggml_type, offset, elements // block_size * type_size))
    byte_order = cursor.order
    header = GGUFHeader(path, version, byte_order, metadata, tensors, alignment, data_offset, size)
    if header.data_end > size:
        raise ModelLoadError(
            f"{path} is truncated: its {len(tensors)} tensors end at byte {header.data_end} but the file has {size} "
            f"bytes ({header.data_end - size} missing); {redo}"
        )
    return header
