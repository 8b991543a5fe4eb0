"""Hostile GGUF headers: seeded, bounded mutations of small synthetic models
(gguf_stream.synth) must end in read_model + make_plan either working or
raising ModelFileError / UnsupportedModelError (BudgetError from a budget that
does not fit), each in under a second and 100 MB; and every mutated file the
checks accept must load and decode in llama.cpp without an abort (in child
processes, sampled in CI, all with --runslow).

Mutations: byte flips in the header, integer and float fields set to boundary
values, length and count fields set huge, truncations, and rebuilt headers
(another architecture, a key added, retyped or removed, a duplicated token, a
tensor retyped with a consistent layout).

    python -m pytest -q tests/test_fuzz_gguf.py -s               # CI size, prints the counts
    python -m pytest -q tests/test_fuzz_gguf.py -s --runslow     # >= 10,000 mutations, all accepted files loaded
"""
from __future__ import annotations

import gguf_stream  # noqa: F401  (llama.cpp before numpy)

import collections
import hashlib
import random
import re
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from gguf_edit import (ARR, BOOL, F32, FMT, I32, STR, U32, U64, Layout, array, encode_string, encode_value,
                       load_in_llama_cpp, nbytes, rebuild, resized)
from gguf_stream import BudgetError, ModelFileError, UnsupportedModelError, make_plan, read_model
from gguf_stream.synth import Shape, write_synthetic

# Small enough that thousands of mutated copies are cheap to write, with the
# real tensor layout, tokenizer and metadata of synth's llama models.
MICRO = Shape("llama", n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=384, ctx_len=256,
              rope_theta=10000.0)
SEED = 17
N_CI, N_SLOW = 3000, 12000  # mutations
LOADS_CI = 40  # distinct accepted files loaded in llama.cpp in CI (all of them with --runslow)
MAX_SECONDS, MAX_BYTES = 1.0, 100 * 2**20

INT_BOUNDARIES = (0, 1, 2, 3, 7, 8, 64, 255, 256, 511, 512, 513, 1024, 1025, 2**15, 2**16, 2**31 - 1, 2**31,
                  2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
FLOAT_BOUNDARIES = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-45, 1e38, 3.4e38, -3.4e38)
ARCHS = ("qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3", "mistral3", "phi3", "bert",
         "mamba", "", "x" * 80)
ARCH_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
             "expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count",
             "expert_feed_forward_length", "nextn_predict_layers", "rope.scaling.type", "rope.freq_base",
             "attention.layer_norm_rms_epsilon", "attention.sliding_window", "vocab_size", "rope.scaling.factor")
OTHER_KEYS = ("general.alignment", "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
              "tokenizer.ggml.tokens", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.pre",
              "tokenizer.ggml.merges")


# ------------------------------------------------------------------ mutations

def mutate(layout: Layout, rng: random.Random) -> tuple[str, bytes, memoryview]:
    """One seeded mutation of the file: (kind, head, tail), the file being
    head + tail (the tail, tensor data, is the base file's, not copied)."""
    kind = rng.choices(("flip", "int", "float", "huge", "truncate", "rebuild"), (25, 25, 5, 10, 5, 30))[0]
    head, tail = bytearray(layout.data[:layout.end]), memoryview(layout.data)[layout.end:]
    if kind == "flip":
        for _ in range(rng.choice((1, 1, 2, 4))):
            head[rng.randrange(layout.end)] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    elif kind == "int":
        offset, fmt, role = rng.choice(layout.ints)
        old = struct.unpack_from(fmt, head, offset)[0]
        new = rng.choice(INT_BOUNDARIES + (old + 1, old - 1, old * 2, old // 2, -1, -old))
        head[offset:offset + struct.calcsize(fmt)] = encode_value(_vtype(fmt), new)
        kind = f"int:{role}"
    elif kind == "float":
        offset, fmt = rng.choice(layout.floats)
        head[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, rng.choice(FLOAT_BOUNDARIES))
    elif kind == "huge":
        offset, fmt, role = rng.choice([f for f in layout.ints if f[2] in ("length", "count")])
        value = rng.choice((2**64 - 1, 2**63, 2**62, 2**40, 2**32, 2**31, len(layout.data), 2**30 + 1))
        head[offset:offset + 8] = struct.pack("<Q", value)
    elif kind == "truncate":
        cut = rng.randrange(len(layout.data))
        head, tail = head[:cut], tail[:max(cut - layout.end, 0)]
    else:
        kind, rebuilt = rebuild_mutation(layout, rng)
        return f"rebuild:{kind}", rebuilt, memoryview(b"")
    return kind, bytes(head), tail


def _vtype(fmt: str) -> int:
    return {v: k for k, v in FMT.items() if k != BOOL}[fmt]


def rebuild_mutation(layout: Layout, rng: random.Random) -> tuple[str, bytes]:
    kvs = [list(kv) for kv in layout.kvs]
    tensors = [[name, list(shape), ttype, offset] for name, shape, ttype, offset in layout.tensors]
    datas = [layout.tensor_data(i) for i in range(len(tensors))]
    datas = [d[:nbytes(t)] for d, t in zip(datas, tensors)]
    arch = next(kv[3][8:] for kv in kvs if kv[0] == b"general.architecture")
    what = rng.choice(("arch", "set", "set", "set", "delete", "duplicate-token", "retype", "reshape"))
    if what == "arch":
        new = rng.choice(ARCHS).encode()
        for kv in kvs:
            if kv[0].startswith(arch + b"."):
                kv[0] = new + kv[0][len(arch):]
            if kv[0] == b"general.architecture":
                kv[3] = encode_string(new)
        if new.endswith(b"moe"):  # an MoE needs experts to get anywhere
            kvs += [[new + b".expert_count", U32, None, encode_value(U32, 4)],
                    [new + b".expert_used_count", U32, None, encode_value(U32, 2)]]
        what = f"arch {new.decode()[:12]}"
    elif what == "set":
        key = rng.choice(ARCH_KEYS + OTHER_KEYS)
        key = (arch + b"." + key.encode()) if key in ARCH_KEYS else key.encode()
        vtype = rng.choice((U32, U32, U32, I32, U64, F32, STR, BOOL, ARR))
        if vtype == ARR:
            etype = rng.choice((U32, I32, F32, STR))
            n = rng.choice((0, 1, MICRO.n_layer, MICRO.n_layer + 1, 100))
            value = array(etype, [rng.choice(INT_BOUNDARIES[:12]) if etype != F32 else rng.choice(FLOAT_BOUNDARIES)
                                   for _ in range(n)])
            new = [key, ARR, etype, value]
        else:
            pool = (FLOAT_BOUNDARIES if vtype == F32 else (b"", b"bogus", b"yarn", b"gpt2", b"llama", b"none")
                    if vtype == STR else INT_BOUNDARIES)
            new = [key, vtype, None, encode_value(vtype, rng.choice(pool))]
        kvs = [kv for kv in kvs if kv[0] != key] + [new]
        what = f"set {key.decode().split('.', 1)[-1]}"
    elif what == "delete":
        del kvs[rng.randrange(len(kvs))]
    elif what == "duplicate-token":
        tokens = next(kv for kv in kvs if kv[0] == b"tokenizer.ggml.tokens")
        strings, pos = [], 0
        while pos < len(tokens[3]):
            n = struct.unpack_from("<Q", tokens[3], pos)[0]
            strings.append(tokens[3][pos + 8:pos + 8 + n])
            pos += 8 + n
        strings[rng.randrange(len(strings))] = strings[rng.randrange(len(strings))]
        tokens[3] = b"".join(map(encode_string, strings))
    elif what == "retype":
        from gguf.constants import GGML_QUANT_SIZES

        i = rng.randrange(len(tensors))
        tensors[i][2] = int(rng.choice(list(GGML_QUANT_SIZES)))
        datas[i] = resized(datas[i], nbytes(tensors[i]))
        what = f"retype {tensors[i][0].decode().split('.')[-2]}"
    else:
        i = rng.randrange(len(tensors))
        shape = tensors[i][1]
        shape[rng.randrange(len(shape))] = rng.choice((0, 1, 32, 256, 512, 1024))
        if rng.random() < 0.3:
            shape.append(rng.choice((1, 2, 4)))
        datas[i] = resized(datas[i], nbytes(tensors[i]))
        what = f"reshape {tensors[i][0].decode().split('.')[-2]}"
    return what, rebuild(kvs, tensors, datas)


# ------------------------------------------------------------------ what the checks do

def check(path: Path, traced: bool) -> tuple[str, float, int]:
    """(outcome, seconds, peak Python bytes or 0 when not traced) of
    read_model + make_plan on path. outcome: 'accepted' or the rejecting
    message with numbers and names blanked."""
    if traced:  # tracemalloc makes this ten times slower: CI traces a share
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        mf = read_model(path)
        make_plan(mf, n_streamed=mf.n_layer // 2, n_ctx=256, n_ubatch=64)
        try:
            make_plan(mf, vram_budget=mf.total_bytes, n_ctx=256, n_ubatch=64)
        except BudgetError:
            pass
        outcome = "accepted"
    except (ModelFileError, UnsupportedModelError) as exc:
        outcome = reason(exc, path)
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] if traced else 0
        tracemalloc.stop()
    return outcome, seconds, peak


def reason(exc: Exception, path: Path) -> str:
    """The check that rejected: the message without the path, names and numbers."""
    msg = str(exc).replace(f"{path}: ", "").replace(str(path), "the file")
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\(.*?\)|-?\d[\d.e+-]*|nan|inf", "_", msg)
    return " ".join(msg.split())[:70]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-base")
    return [Layout(write_synthetic(d / f"micro-{q}.gguf", MICRO, q, seed=3).read_bytes()) for q in ("Q4_K", "Q8_0")]


def fuzz(bases, tmp_path, n: int, n_loads: int | None, traced_share: int):
    """Run n mutations (every traced_share-th one with its memory traced);
    load n_loads distinct accepted files (None: all) in llama.cpp."""
    rng = random.Random(SEED)
    outcomes, kinds_accepted = collections.Counter(), collections.Counter()
    accepted: dict[str, tuple[str, bytes]] = {}  # sha256 -> (kind, bytes)
    worst_s = worst_b = 0
    raw, costly = [], []
    path = tmp_path / "mutated.gguf"
    base_digests = {hashlib.sha256(b.data).hexdigest() for b in bases}
    for i in range(n):
        layout = bases[i % len(bases)]
        kind, head, tail = mutate(layout, rng)
        with path.open("wb") as f:
            f.write(head)
            f.write(tail)
        try:
            outcome, seconds, peak = check(path, traced=i % traced_share == 0)
        except Exception as exc:  # noqa: BLE001 - what the test is for
            raw.append(f"{kind}: {type(exc).__name__}: {exc}")
            continue
        worst_s, worst_b = max(worst_s, seconds), max(worst_b, peak)
        if seconds >= MAX_SECONDS or peak >= MAX_BYTES:
            costly.append(f"{kind}: {seconds:.2f} s, {peak / 2**20:.0f} MiB")
        outcomes[outcome] += 1
        if outcome == "accepted":
            kinds_accepted[kind.split(" ")[0]] += 1
            digest = hashlib.sha256(head)
            digest.update(tail)
            if digest.hexdigest() not in base_digests:
                accepted.setdefault(digest.hexdigest(), (kind, head, tail))
    assert not raw, f"{len(raw)} raw exceptions, e.g. " + "; ".join(raw[:5])
    assert not costly, f"{len(costly)} inputs over {MAX_SECONDS} s or {MAX_BYTES >> 20} MiB: " + "; ".join(costly[:5])

    sample = list(accepted.values())
    if n_loads is not None and len(sample) > n_loads:
        sample = _spread(sample, n_loads, random.Random(SEED))
    loads = load_in_llama_cpp([(head, tail) for _, head, tail in sample], tmp_path)
    summary = collections.Counter(o.split(":")[0] for o in loads)
    report = [f"{n} mutations: {outcomes['accepted']} accepted ({len(accepted)} distinct, changed files), "
              f"{n - outcomes['accepted']} rejected; worst {worst_s * 1e3:.1f} ms, {worst_b / 2**20:.1f} MiB "
              f"(memory traced on {len(range(0, n, traced_share))})",
              f"accepted by kind: {dict(kinds_accepted.most_common())}",
              "rejected by check:"]
    report += [f"  {c:6d}  {r}" for r, c in outcomes.most_common() if r != "accepted"]
    report.append(f"llama.cpp loads of {len(sample)} accepted files: {dict(summary)}")
    print("\n" + "\n".join(report))
    aborted = [(kind, o) for (kind, _, _), o in zip(sample, loads) if o.startswith(("abort", "hang"))]
    assert not aborted, f"llama.cpp aborted on {len(aborted)} accepted files: {aborted[:5]}"
    return outcomes, loads


def _spread(sample, n, rng):
    """n files, spread over the mutation kinds (rarer kinds are not crowded out)."""
    by_kind = collections.defaultdict(list)
    for item in sample:
        by_kind[item[0].split(" ")[0]].append(item)
    chosen = []
    while len(chosen) < n:
        for items in by_kind.values():
            if items and len(chosen) < n:
                chosen.append(items.pop(rng.randrange(len(items))))
    return chosen


# ------------------------------------------------------------------ the tests

def test_layout_and_rebuild_round_trip(bases):
    """The fuzzer's own parts: a rebuild from the layout reproduces the file."""
    for b in bases:
        datas = [b.tensor_data(i)[:nbytes(t)] for i, t in enumerate(b.tensors)]
        assert rebuild(b.kvs, b.tensors, datas) == b.data
        assert read_model  # noqa: B018


def test_fuzz_headers(bases, tmp_path):
    fuzz(bases, tmp_path, N_CI, LOADS_CI, traced_share=5)


@pytest.mark.slow
def test_fuzz_headers_slow(bases, tmp_path):
    fuzz(bases, tmp_path, N_SLOW, None, traced_share=1)

