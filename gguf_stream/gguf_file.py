"""Read a GGUF file's tensor map: what each layer weighs and where it lies.

Only the header is parsed, with the ``gguf`` package's type tables; tensor
data is never read here.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int | None  # None for shared tensors (token_embd, output, ...)
    qtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass(frozen=True)
class ModelFile:
    path: Path
    arch: str
    n_layer: int
    tensors: tuple[TensorInfo, ...]
    layer_bytes: tuple[int, ...]  # per layer, sum of its tensors
    hparams: dict

    @property
    def shared_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.layer is None)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        return [t for t in self.tensors if t.layer == layer]


class _Header:
    """Minimal GGUF header walk over an mmap.

    The gguf package's GGUFReader builds a numpy view per array element; for a
    262k-token vocabulary that takes ~20 s. Here big string arrays are skipped
    (only their length is kept), numeric arrays are read with numpy, and the
    gguf package supplies the type tables.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in self._SCALARS:
            return self.take(self._SCALARS[vtype])
        if vtype == self._STRING:
            return self.string()
        if vtype == self._ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == self._STRING:
                if count > 64:  # vocabularies: keep the length only
                    for _ in range(count):
                        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                    if self.pos > len(self.buf):
                        raise struct.error("string array runs past the end of the file")
                    return _LongArray(count)
                return [self.string() for _ in range(count)]
            if etype in self._SCALARS:
                size = struct.calcsize(self._SCALARS[etype])
                if self.pos + size * count > len(self.buf):
                    raise struct.error("array runs past the end of the file")
                arr = [v[0] for v in struct.iter_unpack(self._SCALARS[etype], self.buf[self.pos:self.pos + size * min(count, 64)])]
                self.pos += size * count
                return arr if count <= 64 else _LongArray(count)
            raise ValueError(f"unknown GGUF array element type {etype}")
        raise ValueError(f"unknown GGUF value type {vtype}")


class _LongArray(int):
    """Length of an array too long to be worth decoding."""


def _parse(path: Path, buf) -> tuple[dict, list[TensorInfo]]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    h = _Header(buf)
    if h.take("<I") != 0x46554747:  # b"GGUF"
        raise ModelFileError(f"{path} is not a GGUF file")
    version = h.take("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors, n_kv = h.take("<Q"), h.take("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise ModelFileError(f"{path}: implausible header ({n_tensors} tensors, {n_kv} keys)")
    fields = {}
    for _ in range(n_kv):
        key = h.string()
        fields[key] = h.value(h.take("<I"))
    raw = []
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.take("<I")
        if n_dims > 4:
            raise ModelFileError(f"{path}: tensor {name} has {n_dims} dimensions")
        shape = tuple(h.take("<Q") for _ in range(n_dims))
        raw.append((name, shape, h.take("<I"), h.take("<Q")))
    align = int(fields.get("general.alignment", 32))
    data_start = (h.pos + align - 1) // align * align
    tensors = []
    for name, shape, qtype, offset in raw:
        try:
            qt = GGMLQuantizationType(qtype)
        except ValueError:
            raise ModelFileError(f"{path}: tensor {name} has unknown type {qtype}") from None
        block, type_size = GGML_QUANT_SIZES[qt]
        n = 1
        for d in shape:
            n *= d
        m = _LAYER_NAME.match(name)
        tensors.append(TensorInfo(name, int(m.group(1)) if m else None, qt.name, shape,
                                  data_start + offset, n // block * type_size))
    return fields, tensors


def read_model(path: str | os.PathLike) -> ModelFile:
    """Parse ``path``; raise ModelFileError naming the problem if it is unusable."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (give a GGUF path or a models.toml name)")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")

    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            fields, tensors = _parse(path, buf)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(f"{path} is truncated or corrupt: cannot parse its GGUF header ({exc})") from exc

    arch = fields.get("general.architecture")
    if not arch:
        raise ModelFileError(f"{path} has no general.architecture key")
    n_layer = fields.get(f"{arch}.block_count")
    if not n_layer:
        raise ModelFileError(f"{path} has no {arch}.block_count key")
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if end > size:
        raise ModelFileError(
            f"{path} is truncated: tensor data ends at byte {end} but the file has {size} bytes"
        )
    layer_bytes = [0] * int(n_layer)
    for t in tensors:
        if t.layer is not None:
            if t.layer >= n_layer:
                raise ModelFileError(f"{path}: tensor {t.name} names layer {t.layer} of {n_layer}")
            layer_bytes[t.layer] += t.nbytes

    def num(key, default=0):
        v = fields.get(f"{arch}.{key}", default)
        return int(max(v) if isinstance(v, list) else v)  # per-layer arrays: the largest

    n_embd, n_head = num("embedding_length"), num("attention.head_count")
    head_dim = n_embd // n_head if n_head else 0
    tokens = fields.get("tokenizer.ggml.tokens")
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    hparams = {
        "n_embd": n_embd,
        "n_ff": num("feed_forward_length"),
        "n_head": n_head,
        "n_head_kv": num("attention.head_count_kv", n_head),
        "key_length": num("attention.key_length", head_dim),
        "value_length": num("attention.value_length", head_dim),
        "n_vocab": len(tokens) if isinstance(tokens, list) else int(tokens) if tokens else (embd.shape[1] if embd else 0),
        "n_ctx_train": num("context_length"),
        "name": fields.get("general.name", path.stem),
    }
    return ModelFile(path, str(arch), int(n_layer), tuple(tensors), tuple(layer_bytes), hparams)
