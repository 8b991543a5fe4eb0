import struct

import pytest

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
