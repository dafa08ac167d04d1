"""A GGUF file's metadata and tensors, read without decoding its vocabulary.

The `gguf` package's reader builds a numpy view for every element of every metadata array: SmolLM2's
~100k tokenizer strings and merges took ~5 s of each model load. A model needs only the scalar
metadata and the tensor table (the tokenizer reads the vocabulary itself), so arrays are stepped over
here, and every tensor is a view of one read-only mapping of the file. Little-endian files (every
llama.cpp release writes those), versions 2 and 3.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct

import numpy as np

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: more is a corrupt file, not a model


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor of the file: `shape` in GGUF's order (the fastest dimension first, as ggml's ne[]),
    `type_id` GGML's type, `data` its bytes (a read-only view of the file)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    data: np.ndarray

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type_id).name.lower()

    def rows(self) -> np.ndarray:
        """The bytes as [rows, bytes per row] (a row: the first dimension's elements)."""
        return self.data.reshape(math.prod(self.shape[1:]), -1)


class _Cursor:
    def __init__(self, buffer: np.ndarray, path: str):
        self.view, self.at, self.path = memoryview(buffer), 0, path

    def unpack(self, fmt: str):
        """One value of struct format `fmt`."""
        try:
            (value,) = struct.unpack_from(fmt, self.view, self.at)
        except struct.error as exc:
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.at}") from exc
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.at + length > len(self.view):
            raise ValueError(f"{self.path}: truncated GGUF string at byte {self.at}")
        try:
            text = bytes(self.view[self.at:self.at + length]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path}: a GGUF string at byte {self.at} is not UTF-8") from exc
        self.at += length
        return text

    def skip_array(self, depth: int = 0) -> None:
        if depth > _MAX_NESTING:
            raise ValueError(f"{self.path}: GGUF arrays nested deeper than {_MAX_NESTING} at byte {self.at}")
        kind, count = self.unpack("<I"), self.unpack("<Q")
        if kind == _STRING:
            for _ in range(count):  # each string is its length then its bytes
                if self.at + 8 > len(self.view):
                    break  # reported below
                self.at += 8 + struct.unpack_from("<Q", self.view, self.at)[0]
        elif kind in _SCALARS:
            self.at += count * struct.calcsize(_SCALARS[kind])
        elif kind == _ARRAY:
            for _ in range(count):
                self.skip_array(depth + 1)
                if self.at > len(self.view):
                    break  # reported below
        else:
            raise ValueError(f"{self.path}: unknown GGUF array element type {kind}")
        if self.at > len(self.view):
            raise ValueError(f"{self.path}: truncated GGUF array")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            self.skip_array()
            return None  # vocabularies and merges: the tokenizer reads them itself
        if kind not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind} at byte {self.at}")
        return self.unpack(_SCALARS[kind])


def read_gguf(path: str) -> tuple[dict[str, object], list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF file: scalar and string values by key (arrays as None)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if os.path.getsize(path) < len(_MAGIC):
        raise ValueError(f"{path} is not a GGUF file (only {os.path.getsize(path)} bytes)")
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(buffer, path)
    if bytes(cursor.view[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {bytes(cursor.view[:4])!r})")
    cursor.at = 4
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3, little-endian, are)")
    num_tensors, num_values = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata = {}
    for _ in range(num_values):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = {}
    for _ in range(num_tensors):
        name = cursor.string()
        num_dims = cursor.unpack("<I")
        if not 1 <= num_dims <= _MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} has {num_dims} dimensions (1 to {_MAX_DIMS} are possible)")
        dims = tuple(cursor.unpack("<Q") for _ in range(num_dims))
        if min(dims) < 1:
            raise ValueError(f"{path}: tensor {name!r} has an empty dimension {dims}")
        if name in infos:
            raise ValueError(f"{path}: tensor {name!r} appears twice")
        infos[name] = (dims, cursor.unpack("<I"), cursor.unpack("<Q"))
    alignment = _alignment(metadata, path)
    start = -(-cursor.at // alignment) * alignment
    tensors = []
    for name, (dims, type_id, offset) in infos.items():
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {type_id}") from exc
        nbytes = math.prod(dims) // block * block_bytes  # Python ints: no overflow on a corrupt shape
        begin = start + offset
        if dims[0] % block or begin + nbytes > buffer.size:
            raise ValueError(f"{path}: tensor {name!r} {dims} of type {type_id} does not fit the file")
        tensors.append(GGUFTensor(name, dims, type_id, buffer[begin:begin + nbytes]))
    return metadata, tensors


def _alignment(metadata: dict, path: str) -> int:
    value = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise ValueError(f"{path}: general.alignment must be a positive power of two, got {value!r}")
    return value
