"""Editing GGUF files for tests: where each header field lies (Layout), a
file rebuilt from edited parts (Header), and llama.cpp loading files in child
processes, where an abort kills only the child (load_in_llama_cpp).

Used by tests/test_gguf_file.py (hostile headers by name) and
tests/test_fuzz_gguf.py (seeded mutations). Run as a script, it is that child.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

CHILD_TIMEOUT = 20  # seconds per file in llama.cpp

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B", U64: "<Q",
       I64: "<q", F64: "<d"}


class Layout:
    """Where each field of a well-formed GGUF header lies, and its parts for a rebuild."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 24
        self.ints: list[tuple[int, str, str]] = []  # (offset, struct format, role) of integer fields
        self.floats: list[tuple[int, str]] = []
        self.kvs: list[list] = []  # [key, type, element type or None, value bytes]
        self.tensors: list[list] = []  # [name, shape, ggml type, offset]
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
        self.ints += [(4, "<I", "version"), (8, "<Q", "count"), (16, "<Q", "count")]
        for _ in range(n_kv):
            key = self._string()
            vtype = self._int("<I", "type")
            etype, start = None, self.pos
            if vtype == ARR:
                etype = self._int("<I", "type")
                count = self._int("<Q", "count")
                for i in range(count):
                    self._value(etype, i < 8)
            else:
                self._value(vtype, True)
            self.kvs.append([key, vtype, etype, data[start:self.pos] if vtype != ARR else data[start + 12:self.pos]])
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._int("<I", "n_dims")
            shape = [self._int("<q", "dim") for _ in range(n_dims)]
            ttype = self._int("<i", "ggml type")
            offset = self._int("<Q", "offset")
            self.tensors.append([name, shape, ttype, offset])
        self.end = self.pos
        self.alignment = 32
        self.data_start = -(-self.end // self.alignment) * self.alignment

    def _int(self, fmt: str, role: str, record: bool = True) -> int:
        if record:
            self.ints.append((self.pos, fmt, role))
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def _string(self, record: bool = True) -> bytes:
        n = self._int("<Q", "length", record)
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s

    def _value(self, vtype: int, record: bool) -> None:
        if vtype == STR:
            self._string(record)
        elif vtype in (F32, F64):
            if record:
                self.floats.append((self.pos, FMT[vtype]))
            self.pos += struct.calcsize(FMT[vtype])
        else:
            self._int(FMT[vtype], "value", record)

    def tensor_data(self, i: int) -> bytes:
        """The bytes of tensor i (up to the next tensor's, padding included)."""
        start = self.data_start + self.tensors[i][3]
        end = self.data_start + self.tensors[i + 1][3] if i + 1 < len(self.tensors) else len(self.data)
        return self.data[start:end]


def encode_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def encode_value(vtype: int, value) -> bytes:
    if vtype == STR:
        return encode_string(value if isinstance(value, bytes) else str(value).encode())
    fmt = FMT[vtype]
    if vtype in (F32, F64):
        return struct.pack(fmt, float(value))
    bits = struct.calcsize(fmt) * 8
    value = int(value) % (1 << bits)  # wrap into the field, as a hostile writer would
    if fmt[1].islower() and value >= 1 << (bits - 1):
        value -= 1 << bits
    return struct.pack(fmt, value)


def rebuild(kvs, tensors, datas: list[bytes], alignment: int = 32) -> bytes:
    """A GGUF file from parts: tensor offsets and padding recomputed from `datas`."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kvs))]
    for key, vtype, etype, value in kvs:
        out.append(encode_string(key) + struct.pack("<I", vtype))
        if vtype == ARR:
            count = array_count(etype, value)
            out.append(struct.pack("<IQ", etype, count))
        out.append(value)
    offset = 0
    for (name, shape, ttype, _), data in zip(tensors, datas):
        out.append(encode_string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<q", d) for d in shape)
                   + struct.pack("<iQ", ttype, offset))
        offset += -(-len(data) // alignment) * alignment
    header = b"".join(out)
    body = b"".join(d + bytes(-len(d) % alignment) for d in datas)
    return header + bytes(-len(header) % alignment) + body


def array_count(etype: int, value: bytes) -> int:
    if etype != STR:
        return len(value) // struct.calcsize(FMT[etype])
    n, pos = 0, 0
    while pos < len(value):
        pos += 8 + struct.unpack_from("<Q", value, pos)[0]
        n += 1
    return n


def array(etype: int, values) -> bytes:
    return b"".join(encode_value(etype, v) for v in values)


def nbytes(tensor) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES.get(GGMLQuantizationType(tensor[2]), (1, 1))
    n = 1
    for d in tensor[1]:
        n *= d
    return n // block * size


def resized(data: bytes, n: int) -> bytes:
    return data[:n] if len(data) >= n else data + bytes(n - len(data))


class Header:
    """A GGUF file as editable parts: metadata, tensor infos and data."""

    def __init__(self, data: bytes):
        layout = Layout(data)
        self.kvs = [list(kv) for kv in layout.kvs]
        self.tensors = [[name, list(shape), ttype, offset] for name, shape, ttype, offset in layout.tensors]
        self.datas = [layout.tensor_data(i)[:nbytes(t)] for i, t in enumerate(layout.tensors)]

    def set(self, key: str, vtype: int, value, etype: int | None = None) -> "Header":
        """key = value (an array of etype elements when vtype is ARR), replacing any old value."""
        raw = array(etype, value) if vtype == ARR else encode_value(vtype, value)
        self.delete(key)
        self.kvs.append([key.encode(), vtype, etype, raw])
        return self

    def delete(self, key: str) -> "Header":
        self.kvs = [kv for kv in self.kvs if kv[0] != key.encode()]
        return self

    def tensor(self, name: str) -> int:
        return next(i for i, t in enumerate(self.tensors) if t[0] == name.encode())

    def retype(self, name: str, ggml_type: int) -> "Header":
        """The tensor in another type, its data cut or zero-padded to fit."""
        i = self.tensor(name)
        self.tensors[i][2] = int(ggml_type)
        self.datas[i] = resized(self.datas[i], nbytes(self.tensors[i]))
        return self

    def strings(self, key: str) -> list[bytes]:
        raw = next(kv[3] for kv in self.kvs if kv[0] == key.encode())
        out, pos = [], 0
        while pos < len(raw):
            n = struct.unpack_from("<Q", raw, pos)[0]
            out.append(raw[pos + 8:pos + 8 + n])
            pos += 8 + n
        return out

    def to_bytes(self) -> bytes:
        return rebuild(self.kvs, self.tensors, self.datas)

    def write(self, path: Path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)


def load_in_llama_cpp(files: list[tuple[bytes, memoryview]], tmp_path: Path, chunk: int = 50) -> list[str]:
    """Outcome per file: 'ok', 'refused: ...' (a clean failure), 'abort: ...'
    (the child died; its last assert line) or 'hang'. A child runs the files
    of a chunk in turn; where one dies, a new child goes on after it."""
    outcomes: list[str] = []
    for start in range(0, len(files), chunk):
        paths = []
        for i, (head, tail) in enumerate(files[start:start + chunk]):
            p = tmp_path / f"accepted-{i}.gguf"
            with p.open("wb") as f:
                f.write(head)
                f.write(tail)
            paths.append(str(p))
        outcomes += _load_chunk(paths)
        for p in paths:
            os.unlink(p)
    return outcomes


def _load_chunk(paths: list[str]) -> list[str]:
    outcomes: list[str] = []
    env = dict(os.environ, GGML_NO_BACKTRACE="1",  # ggml would run gdb for a backtrace at every abort
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH")])))
    while len(outcomes) < len(paths):
        rest = paths[len(outcomes):]
        try:
            p = subprocess.run([sys.executable, __file__, *rest], capture_output=True, text=True, env=env,
                               timeout=CHILD_TIMEOUT * len(rest))
            out, err, died = p.stdout, p.stderr, p.returncode != 0
        except subprocess.TimeoutExpired as exc:
            out, err, died = (exc.stdout or b"").decode(), "", None
        outcomes += [line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("END ")]
        if len(outcomes) < len(paths):
            if died is None:
                outcomes.append("hang")
            else:  # ggml_abort's "file.cpp:line: message", or the signal
                where = [line.rsplit("/", 1)[-1] for line in err.splitlines() if re.search(r"\.(c|cpp|h):\d+: ", line)]
                outcomes.append(f"abort: {(where or [f'signal {-p.returncode}'])[-1][:160]}")
    return outcomes


def child(paths: list[str]) -> None:
    """Load each file in llama.cpp as the engine does, create a context, run
    every token through detokenization and a short prompt through a decode."""
    import ctypes

    import llama_cpp

    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, None)
    for i, path in enumerate(paths):
        print(f"BEGIN {i}", flush=True)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers, mp.use_extra_bufts = 0, False
        model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not model:
            print(f"END {i} refused: load", flush=True)
            continue
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 64, 16, 16, 1, 1
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            llama_cpp.llama_model_free(model)
            print(f"END {i} refused: context", flush=True)
            continue
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        buf = ctypes.create_string_buffer(64)
        for t in range(n_vocab):
            llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
        text = b"Hello world, 123!"
        toks = (llama_cpp.llama_token * 64)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), toks, 64, True, True)
        ids = [t for t in toks[:max(n, 0)] if 0 <= t < n_vocab][:8] or [0]
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids)))
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
        print(f"END {i} {'ok' if rc == 0 else f'refused: decode {rc}'}", flush=True)




if __name__ == "__main__":
    child(sys.argv[1:])
