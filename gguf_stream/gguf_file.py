"""Read a GGUF file's tensor map: what each layer weighs and where it lies.

Only the header is parsed, with the ``gguf`` package's type tables; tensor
data is never read here. The file may be careless or hostile: every count and
length is checked against llama.cpp's own limits (ggml/src/gguf.cpp) and the
bytes left in the file before anything that large is built, and every problem
is a ModelFileError naming the value and the limit. validate.py then checks
what llama.cpp's model loader would abort on.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from . import validate
from .errors import ModelFileError

_LAYER_NAME = re.compile(r"^blk\.(\d+)\.")

# ggml/src/gguf.cpp and ggml.h
MAX_STRING_BYTES = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_ARRAY_ELEMENTS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME, less the NUL
# Ours: no real key comes near this, and strings longer than DECODED_STRING
# (chat templates at most) are not decoded here, only skipped.
MAX_KEY_BYTES = 4096
DECODED_STRING = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
INT64_MAX = (1 << 63) - 1
_U64 = struct.Struct("<Q")
# Arrays longer than this (vocabularies, scores) keep only their length:
# per-layer arrays (at most LLAMA_MAX_LAYERS) are decoded whole.
DECODED_ARRAY = 1024

# GGUF value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALARS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
            BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
TYPE_NAMES = {UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16", UINT32: "uint32", INT32: "int32",
              FLOAT32: "float32", BOOL: "bool", STRING: "string", ARRAY: "array", UINT64: "uint64",
              INT64: "int64", FLOAT64: "float64"}
# smallest encodings, to bound counts by the bytes left: a key-value pair
# (key length, a 0-byte key, type, a 1-byte value) and a tensor info
# (name length, n_dims, type, offset)
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


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

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo | None:
        return self._by_name.get(name)

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        return [t for t in self.tensors if t.layer == layer]

    @cached_property
    def is_moe(self) -> bool:
        """A mixture-of-experts model: its layers hold expert tensors."""
        return any(is_expert_tensor(t.name) for t in self.tensors)

    @cached_property
    def stream_bytes(self) -> tuple[int, ...]:
        """Per layer, the bytes placement moves: a mixture-of-experts layer's
        routed expert tensors (its attention, norms, router and shared experts
        are read by every token, and stay resident), or the whole layer."""
        if not self.is_moe:
            return self.layer_bytes
        out = [0] * self.n_layer
        for t in self.tensors:
            if t.layer is not None and is_expert_tensor(t.name):
                out[t.layer] += t.nbytes
        return tuple(out)

    @cached_property
    def has_shared_experts(self) -> bool:
        """Whether layers have a shared expert (ffn_*_shexp: qwen2moe's, glm4moe's, deepseek2's), added to the routed ones' sum."""
        return any(t.layer is not None and "_shexp." in t.name for t in self.tensors)

    @cached_property
    def fixed_layer_bytes(self) -> tuple[int, ...]:
        """Per layer, the bytes that stay resident whatever the plan."""
        return tuple(a - b for a, b in zip(self.layer_bytes, self.stream_bytes))


# ffn_{gate,up,down}_exps, ffn_gate_up_exps (fused); not the shared experts
# (ffn_*_shexp), which every token reads.
_EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.")


def is_expert_tensor(name: str) -> bool:
    return _EXPERT_TENSOR.match(name) is not None


class KV(NamedTuple):
    """A metadata value with its GGUF type (and element type for arrays)."""
    type: int
    value: Any
    element_type: int | None = None

    @property
    def type_name(self) -> str:
        if self.type == ARRAY:
            return f"array of {TYPE_NAMES.get(self.element_type, self.element_type)}"
        return TYPE_NAMES.get(self.type, str(self.type))


class LongArray(int):
    """Length of an array too long to be worth decoding."""


class LongString(int):
    """Length of a string too long to be worth decoding."""


class StringArray(LongArray):
    """Length of a long string array; `duplicate` is a repeated element
    (llama.cpp aborts on a vocabulary with one) where it was looked for."""
    duplicate: bytes | None = None


class _Header:
    """GGUF header walk over an mmap, every read bounded by the bytes left.

    The gguf package's GGUFReader builds a numpy view per array element; for a
    262k-token vocabulary that takes ~20 s. Here long arrays are skipped (only
    their length is kept) and the gguf package supplies the type tables.
    """

    def __init__(self, buf, where: str):
        self.buf, self.pos, self.size, self.where = buf, 0, len(buf), where

    def fail(self, msg: str):
        raise ModelFileError(f"{self.where}: {msg}")

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes but only {left} are left "
                      "(truncated or corrupt file)")

    def take(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def raw_string(self, what: str, limit: int = MAX_STRING_BYTES, whose: str = "llama.cpp's") -> bytes:
        n = self.take("<Q", f"length of {what}")
        if n > limit:
            self.fail(f"{what} has length {n}, over {whose} limit of {limit} bytes")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def string(self, what: str) -> str | LongString:
        """A string value: decoded (backslashreplace: distinct bytes stay
        distinct, messages printable), or only its length when it is long."""
        n = self.take("<Q", f"length of {what}")
        if n > MAX_STRING_BYTES:
            self.fail(f"{what} has length {n}, over llama.cpp's limit of {MAX_STRING_BYTES} bytes")
        self.need(n, what)
        start, self.pos = self.pos, self.pos + n
        if n > DECODED_STRING:
            return LongString(n)
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="backslashreplace")

    def key(self, index: int) -> str:
        return self.raw_string(f"key {index}", MAX_KEY_BYTES, "gguf-stream's").decode("utf-8", "backslashreplace")

    def value(self, vtype: int, key: str) -> KV:
        if vtype in _SCALARS:
            return KV(vtype, self.take(_SCALARS[vtype], f"value of {key!r}"))
        if vtype == STRING:
            return KV(vtype, self.string(f"value of {key!r}"))
        if vtype == ARRAY:
            etype = self.take("<I", f"element type of {key!r}")
            count = self.take("<Q", f"length of {key!r}")
            if count > MAX_ARRAY_ELEMENTS:
                self.fail(f"array {key!r} has {count} elements, over llama.cpp's limit of {MAX_ARRAY_ELEMENTS}")
            if etype == STRING:
                return KV(vtype, self._string_array(key, count), etype)
            if etype in _SCALARS:
                return KV(vtype, self._scalar_array(key, etype, count), etype)
            self.fail(f"array {key!r} has element type {etype}, which GGUF arrays cannot hold")
        self.fail(f"key {key!r} has value type {vtype}, which GGUF does not define (0..12)")

    def _scalar_array(self, key: str, etype: int, count: int):
        fmt = _SCALARS[etype]
        size = struct.calcsize(fmt) * count
        self.need(size, f"array {key!r} of {count} {TYPE_NAMES[etype]}")
        start, self.pos = self.pos, self.pos + size
        if count > DECODED_ARRAY:
            return LongArray(count)
        return [v[0] for v in struct.iter_unpack(fmt, self.buf[start:self.pos])]

    def _string_array(self, key: str, count: int):
        self.need(8 * count, f"array {key!r} of {count} strings")  # a length each, at least
        vocabulary = key == validate.VOCABULARY_KEY
        if count <= DECODED_ARRAY and not vocabulary:
            return [self.string(f"element {i} of {key!r}") for i in range(count)]
        # a tight loop: vocabularies have 10^5 elements; llama.cpp aborts on one
        # that holds a string twice, so the vocabulary's are compared as bytes
        buf, start, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        seen, pos = set(), start
        for i in range(count):
            n = unpack(buf, pos)[0] if pos + 8 <= size else size
            if n > size - pos - 8:
                self.pos = pos
                self.need(8 + n, f"element {i} of {key!r}")  # fails, naming the element
            if vocabulary:
                seen.add(buf[pos + 8:pos + 8 + n] or b"[EMPTY_%d]" % i)  # llama.cpp's stand-in for ""
            pos += 8 + n
        self.pos = pos
        result = StringArray(count)
        if vocabulary and len(seen) < count:
            result.duplicate = _first_duplicate(buf, start, count)
        return result


def _first_duplicate(buf, pos: int, count: int) -> bytes | None:
    """The first string seen twice in a (well-formed) string array at pos."""
    seen = set()
    for i in range(count):
        n = _U64.unpack_from(buf, pos)[0]
        s = buf[pos + 8:pos + 8 + n] or b"[EMPTY_%d]" % i
        if s in seen:
            return s
        seen.add(s)
        pos += 8 + n
    return None


def _tensor_info(h: _Header, index: int, seen: set) -> tuple[str, tuple[int, ...], int, int]:
    """(name, shape, ggml type, relative offset) of the index-th tensor info,
    with gguf.cpp's checks."""
    raw = h.raw_string(f"name of tensor {index}", MAX_TENSOR_NAME_BYTES, "ggml's")
    name = raw.decode("utf-8", errors="backslashreplace")
    if raw in seen:
        h.fail(f"tensor {name!r} appears twice")
    seen.add(raw)
    n_dims = h.take("<I", f"n_dims of tensor {name!r}")
    if n_dims > MAX_DIMS:
        h.fail(f"tensor {name!r} has {n_dims} dimensions, over ggml's limit of {MAX_DIMS}")
    shape = tuple(h.take("<q", f"shape of tensor {name!r}") for _ in range(n_dims))
    if any(d < 0 for d in shape):
        h.fail(f"tensor {name!r} has a negative dimension in its shape {shape}")
    if math.prod(shape) > INT64_MAX:
        h.fail(f"tensor {name!r} has shape {shape}: {math.prod(shape)} elements, over ggml's limit of {INT64_MAX}")
    qtype = h.take("<i", f"type of tensor {name!r}")
    offset = h.take("<Q", f"data offset of tensor {name!r}")
    return name, shape, qtype, offset


def _tensor_bytes(h: _Header, name: str, shape: tuple[int, ...], qtype: int) -> tuple[str, int]:
    """(type name, bytes) of a tensor; its type must be one ggml knows and its
    rows a whole number of blocks."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qt = GGMLQuantizationType(qtype)
        block, type_size = GGML_QUANT_SIZES[qt]
    except (ValueError, KeyError):
        h.fail(f"tensor {name!r} has type {qtype}, which is not a ggml type this gguf package knows")
    row = shape[0] if shape else 1
    if block <= 0 or row % block:
        h.fail(f"tensor {name!r} of type {qt.name} has rows of {row} elements, not a multiple of its "
               f"block size {block}")
    return qt.name, math.prod(shape) // block * type_size


def _alignment(h: _Header, kv: dict[str, KV]) -> int:
    field = kv.get("general.alignment")
    if field is None:
        return DEFAULT_ALIGNMENT
    if field.type != UINT32:
        h.fail(f"general.alignment is a {field.type_name}; GGUF requires a uint32")
    a = field.value
    if a <= 0 or a & (a - 1):
        h.fail(f"general.alignment is {a}; it must be a power of 2")
    return a


def _parse(h: _Header) -> tuple[dict[str, KV], list[TensorInfo]]:
    if h.take("<I", "magic") != 0x46554747:  # b"GGUF"
        h.fail("not a GGUF file")
    version = h.take("<I", "version")
    if version not in (2, 3):
        h.fail(f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors, n_kv = h.take("<Q", "tensor count"), h.take("<Q", "key count")
    left = h.size - h.pos
    if n_kv > left // _MIN_KV_BYTES or n_tensors > left // _MIN_TENSOR_INFO_BYTES:
        h.fail(f"implausible header: {n_tensors} tensors and {n_kv} keys cannot fit in the {left} bytes left "
               "(truncated or corrupt file)")
    kv: dict[str, KV] = {}
    for i in range(n_kv):
        key = h.key(i)
        if not key:
            h.fail(f"key {i} is empty")
        if key in kv:
            h.fail(f"key {key!r} appears twice")
        kv[key] = h.value(h.take("<I", f"type of {key!r}"), key)
    align = _alignment(h, kv)
    seen: set = set()
    raw = [_tensor_info(h, i, seen) for i in range(n_tensors)]
    data_start = -(-h.pos // align) * align
    tensors, expected = [], 0
    for name, shape, qtype, offset in raw:
        type_name, nbytes = _tensor_bytes(h, name, shape, qtype)
        if offset != expected:  # gguf.cpp: tensors lie in order, each padded to the alignment
            h.fail(f"tensor {name!r} has data offset {offset}, expected {expected} (tensor data must be "
                   f"contiguous, in order, aligned to {align})")
        expected += -(-nbytes // align) * align
        m = _LAYER_NAME.match(name)
        tensors.append(TensorInfo(name, int(m.group(1)) if m else None, type_name, shape,
                                  data_start + offset, nbytes))
    return kv, tensors


def read_model(path: str | os.PathLike) -> ModelFile:
    """Parse ``path``; raise ModelFileError naming the problem if it is unusable."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (give a GGUF path or a models.toml name)")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ModelFileError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                kv, tensors = _parse(_Header(buf, str(path)))
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc

    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if end > size:
        raise ModelFileError(
            f"{path} is truncated: tensor data ends at byte {end} but the file has {size} bytes"
        )
    arch, hparams = validate.hyperparameters(kv, str(path))
    n_layer = hparams["n_layer"]
    layer_bytes = [0] * n_layer
    for t in tensors:
        if t.layer is not None:
            if t.layer >= n_layer:
                raise ModelFileError(f"{path}: tensor {t.name} names layer {t.layer} of {n_layer}")
            layer_bytes[t.layer] += t.nbytes
    if 0 in layer_bytes:  # llama.cpp would miss its tensors; plans would divide by a zero-byte slot
        raise ModelFileError(f"{path}: layer {layer_bytes.index(0)} of the {n_layer} in {arch}.block_count "
                             "has no tensor data")
    validate.check_tensors(tensors, str(path))
    validate.check_vocabulary(kv, str(path))
    tokens = kv.get(validate.VOCABULARY_KEY)
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_vocab = int(tokens.value) if tokens is not None and isinstance(tokens.value, StringArray) else 0
    hparams["n_vocab"] = n_vocab or (embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0)
    name = kv.get("general.name")
    hparams["name"] = name.value if name is not None and isinstance(name.value, str) else path.stem
    return ModelFile(path, arch, n_layer, tuple(tensors), tuple(layer_bytes), hparams)
