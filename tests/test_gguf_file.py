import struct
from pathlib import Path

import pytest

from gguf_edit import ARR, F32, I32, STR, U32, U64, Header, Layout, load_in_llama_cpp
from gguf_stream import ModelFileError, read_model


def test_tiny_tensor_map_matches_gguf_reader(tiny_path):
    from gguf import GGUFReader

    m = read_model(tiny_path)
    ref = GGUFReader(str(tiny_path))
    assert m.arch == "llama" and m.n_layer == 8
    assert [(t.name, t.offset, t.nbytes, t.qtype) for t in m.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes), t.tensor_type.name) for t in ref.tensors]
    for i in range(m.n_layer):
        assert m.layer_bytes[i] == sum(t.nbytes for t in m.layer_tensors(i)) > 0
    assert m.total_bytes == m.shared_bytes + sum(m.layer_bytes)


def test_gemma_header(gemma_path):
    m = read_model(gemma_path)
    assert (m.arch, m.n_layer, m.hparams["n_vocab"], m.hparams["n_head_kv"]) == ("gemma3", 18, 262144, 1)
    assert m.tensor("blk.0.ffn_down.weight").qtype == "Q6_K"


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        read_model(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_model(p)


def test_truncated_data(tiny_path, tmp_path):
    p = tmp_path / "cut.gguf"
    data = tiny_path.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        read_model(p)


def test_truncated_header(tiny_path, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny_path.read_bytes()[:300])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        read_model(p)


def test_bad_version(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(ModelFileError, match="version 9"):
        read_model(p)


def test_hostile_counts(tmp_path):
    p = tmp_path / "huge.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1))
    with pytest.raises(ModelFileError, match="implausible"):
        read_model(p)


# ------------------------------------------------------------------ hostile headers, one check each


F16, Q8_K = 1, 15  # ggml types


def _tokens_repeated(h: Header) -> Header:
    tokens = h.strings("tokenizer.ggml.tokens")
    tokens[300] = tokens[301]
    return h.set("tokenizer.ggml.tokens", ARR, tokens, STR)


# (edit of the tiny llama, what the message says, whether llama.cpp 0.3.36 aborts on the file)
HOSTILE = {
    "513 layers": (lambda h: h.set("llama.block_count", U32, 513), r"block_count is 513; llama.cpp supports 1\.\.512", True),
    "no layers": (lambda h: h.set("llama.block_count", U32, 0), r"block_count is 0; llama.cpp supports 1\.\.512", True),
    "layer count typed uint64": (lambda h: h.set("llama.block_count", U64, 8), "is a uint64; llama.cpp reads it as a uint32", False),
    "more experts used than exist": (lambda h: h.set("llama.expert_count", U32, 4).set("llama.expert_used_count", U32, 8),
                                     r"expert_used_count is 8, more than llama.expert_count \(4\)", True),
    "2000 experts": (lambda h: h.set("llama.expert_count", U32, 2000).set("llama.expert_used_count", U32, 2),
                     "expert_count is 2000; llama.cpp supports at most 1024", True),
    "unknown rope scaling": (lambda h: h.set("llama.rope.scaling.type", STR, "bogus"), "rope.scaling.type is 'bogus'", True),
    "negative norm epsilon": (lambda h: h.set("llama.attention.layer_norm_rms_epsilon", F32, -1e-5),
                              "norm epsilon must not be negative", True),
    "NaN rope base": (lambda h: h.set("llama.rope.freq_base", F32, float("nan")), "freq_base is nan; hyper-parameters must be finite", False),
    "a token twice": (_tokens_repeated, "vocabulary holds b'.*' twice", True),
    "no vocabulary": (lambda h: h.set("tokenizer.ggml.model", STR, "none"), "has no vocabulary", True),
    "F16 norm": (lambda h: h.retype("blk.0.attn_norm.weight", F16), "vector of type F16; llama.cpp needs F32", True),
    "Q8_K weights": (lambda h: h.retype("blk.0.attn_q.weight", Q8_K), "type Q8_K, which ggml cannot use for weights", True),
    "qwen2 with rope dims under the head size": (
        lambda h: _renamed(h, "qwen2").set("qwen2.rope.dimension_count", U32, 32),
        r"qwen2 needs equal key_length \(64\), value_length \(64\) and rope.dimension_count \(32\)", True),
    "query heads not a multiple of kv heads": (lambda h: h.set("llama.attention.head_count_kv", U32, 3),
                                               "4 query heads for 3 key/value heads", False),
    "more layers than tensors": (lambda h: h.set("llama.block_count", U32, 9),
                                 "layer 8 of the 9 in llama.block_count has no tensor data", False),
    "per-layer heads of the wrong length": (lambda h: h.set("llama.attention.head_count", ARR, [4] * 7, U32),
                                            r"head_count has 7 elements; llama.cpp needs one per layer \(8\)", False),
    "alignment 0": (lambda h: h.set("general.alignment", U32, 0), "general.alignment is 0; it must be a power of 2", False),
    "alignment as a string": (lambda h: h.set("general.alignment", STR, "32"), "general.alignment is a string; GGUF requires a uint32", False),
    "architecture as a number": (lambda h: h.set("general.architecture", I32, 7), "general.architecture must be a non-empty string", False),
}


def _renamed(h: Header, arch: str) -> Header:
    for kv in h.kvs:
        if kv[0].startswith(b"llama."):
            kv[0] = arch.encode() + kv[0][5:]
    return h.set("general.architecture", STR, arch)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_header_is_named(tiny_path, tmp_path, case):
    edit, message, _ = HOSTILE[case]
    path = edit(Header(tiny_path.read_bytes())).write(tmp_path / "hostile.gguf")
    with pytest.raises(ModelFileError, match=message) as exc:
        read_model(path)
    assert "\n" not in str(exc.value)


def test_llama_cpp_aborts_on_what_the_checks_reject(tiny_path, tmp_path):
    """The checks are needed: llama.cpp kills the process on these files
    (in a child process here), where it would refuse the others cleanly."""
    base = Header(tiny_path.read_bytes())
    cases = [c for c in HOSTILE if HOSTILE[c][2]]
    files = [(HOSTILE[c][0](Header(tiny_path.read_bytes())).to_bytes(), memoryview(b"")) for c in cases]
    outcomes = load_in_llama_cpp(files + [(base.to_bytes(), memoryview(b""))], tmp_path)
    assert outcomes[-1] == "ok"  # the unedited file loads and decodes
    assert {c: o.split(":")[0] for c, o in zip(cases, outcomes)} == {c: "abort" for c in cases}


def _hostile_field(tiny_path, tmp_path, role, value, fmt=None, which=0) -> Path:
    """The tiny model with the which-th integer field of this role set to value."""
    data = bytearray(tiny_path.read_bytes())
    layout = Layout(bytes(data))
    offset, field_fmt, _ = [f for f in layout.ints if f[2] == role][which]
    struct.pack_into(fmt or field_fmt, data, offset, value)
    p = tmp_path / "hostile.gguf"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("role,value,which,message", [
    ("length", 2**64 - 1, 0, r"has length 18446744073709551615, over gguf-stream's limit of 4096 bytes"),
    ("length", 2**62, 3, r"over llama.cpp's limit of 1073741824 bytes"),
    ("count", 2**40, 2, r"has 1099511627776 elements, over llama.cpp's limit of 1073741824"),
    ("count", 2**29, 2, r"array 'tokenizer.ggml.tokens' of 536870912 strings at byte \d+ needs \d+ bytes but only \d+ are left"),
    ("n_dims", 5, 0, "has 5 dimensions, over ggml's limit of 4"),
    ("dim", -5, 0, "has a negative dimension"),
    ("ggml type", 99, 0, "has type 99, which is not a ggml type"),
    ("offset", 7, 3, r"has data offset 7, expected \d+ \(tensor data must be contiguous"),
    ("type", 99, 0, "has value type 99, which GGUF does not define"),
])
def test_hostile_lengths_and_fields(tiny_path, tmp_path, role, value, which, message):
    with pytest.raises(ModelFileError, match=message) as exc:
        read_model(_hostile_field(tiny_path, tmp_path, role, value, which=which))
    assert "\n" not in str(exc.value)


def test_repeated_keys_and_tensor_names(tiny_path, tmp_path):
    h = Header(tiny_path.read_bytes())
    h.kvs.append(list(h.kvs[0]))
    with pytest.raises(ModelFileError, match="key 'general.architecture' appears twice"):
        read_model(h.write(tmp_path / "twice.gguf"))
    h = Header(tiny_path.read_bytes())
    h.tensors[2][0] = h.tensors[1][0]
    with pytest.raises(ModelFileError, match="tensor 'blk.0.attn_norm.weight' appears twice"):
        read_model(h.write(tmp_path / "twice.gguf"))


def test_quantized_expert_router_is_refused(tiny_path, tmp_path):
    h = Header(tiny_path.read_bytes())
    h.tensors[h.tensor("blk.0.attn_q.weight")][0] = b"blk.0.ffn_gate_inp.weight"  # a Q4_K matrix
    with pytest.raises(ModelFileError, match="expert router"):
        read_model(h.write(tmp_path / "router.gguf"))
