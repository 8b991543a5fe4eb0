"""Sizes: reading and printing them, and the estimates of what llama.cpp
puts in device and host memory (KV cache, compute buffer, shared tensors,
a stock -ngl split) that the planner fills a budget with.

Pure, from the GGUF header (ModelFile); the engine measures the real figures
after loading and reports both.
"""
from __future__ import annotations

import math
import re

from .gguf_file import ModelFile

MiB = 1 << 20
GiB = 1 << 30
# Headroom for what the estimates below do not model: cuBLAS workspace,
# alignment (the CUDA pool for cuBLAS is in compute_bytes' estimate).
COMPUTE_HEADROOM = 16 * MiB
# CUDA loads kernels on first use (lazy module loading, its default since
# CUDA 12), so device memory grows after the load, at the first decodes of
# each kind; stock's measured peak holds them, a plan must leave room. On the
# GPU box about 70 MiB for the 8B shape: a run at -c 4096 -ub 512 peaked at
# 2.14 GiB over its 2.11 GiB budget (2.07 with CUDA_MODULE_LOADING=EAGER,
# which loads them before the load's baseline is read). Counted with the
# compute buffer of a CUDA plan (make_plan's and stock_device_bytes'
# runtime_bytes; host mode has no kernels to load).
LAZY_KERNEL_BYTES = 64 * MiB

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
MAX_SIZE = 1 << 60  # 1 EiB: past any device; a larger size is a typo
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}


def parse_size(value: int | float | str) -> int:
    """'8GiB' -> 8589934592, '4.5GB' -> 4500000000, 1024 -> 1024; a size
    must be a finite number of bytes in 1..MAX_SIZE."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"cannot read {value!r:.60} as a size; use e.g. '8GiB', '7.5GB' or a byte count")
        number = float(m.group(1)) * _UNITS[(m.group(2) or "").upper().rstrip("B")]
    if isinstance(number, float) and not math.isfinite(number) or not 1 <= number <= MAX_SIZE:
        raise ValueError(f"size {value!r:.60} must be a finite number of bytes in 1..{MAX_SIZE} (1 EiB); "
                         "use e.g. '8GiB'")
    return int(number)


def format_size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


# KV cache types llama.cpp takes for -ctk / -ctv: name -> (ggml type id,
# bytes per block, elements per block); block-quantized types store 32
# elements per block (q8_0: 32 int8 and an f16 scale, 34 bytes)
KV_CACHE_TYPES = {
    "f32": (0, 4, 1), "f16": (1, 2, 1), "bf16": (30, 2, 1), "q8_0": (8, 34, 32), "q4_0": (2, 18, 32),
    "q4_1": (3, 20, 32), "iq4_nl": (20, 18, 32), "q5_0": (6, 22, 32), "q5_1": (7, 24, 32),
}


def check_kv_type(name: str, value) -> str:
    """A KV cache type name llama.cpp knows (KV_CACHE_TYPES), or a one-line error."""
    if value not in KV_CACHE_TYPES:
        raise ValueError(f"{name} must be one of {', '.join(KV_CACHE_TYPES)} (llama.cpp's KV cache types), "
                         f"not {value!r:.40}")
    return value


def kv_ggml_type(type_name: str) -> int:
    """The ggml type id llama.cpp's context params take (type_k / type_v)."""
    return KV_CACHE_TYPES[check_kv_type("KV cache type", type_name)][0]


def kv_type_name(ggml_type: int) -> str:
    """The name of a KV cache ggml type id (llama_cpp.Llama's type_k / type_v)."""
    names = [name for name, (t, _, _) in KV_CACHE_TYPES.items() if t == ggml_type]
    if not names:
        raise ValueError(f"ggml type {ggml_type!r:.20} is not a KV cache type llama.cpp takes; use one of "
                         + ", ".join(f"{t} ({n})" for n, (t, _, _) in KV_CACHE_TYPES.items()))
    return names[0]


def is_quantized_kv(type_name: str) -> bool:
    """Block-quantized: llama.cpp needs flash attention for such a V cache."""
    return KV_CACHE_TYPES[type_name][2] > 1


def kv_row_bytes(type_name: str, n: int) -> int:
    """Bytes of n elements of a KV cache type (ggml_row_size)."""
    _, block_bytes, block = KV_CACHE_TYPES[check_kv_type("KV cache type", type_name)]
    return n * block_bytes // block


KV_PAD = 256  # llama.cpp pads each sequence's KV cells to a multiple of this


def kv_cells(n_ctx: int, n_seq: int = 1) -> int:
    """KV cells llama.cpp allocates for a context of n_ctx shared by n_seq
    sequences (non-unified cache): n_ctx / n_seq each, padded up to KV_PAD."""
    per_seq = -(-(n_ctx // n_seq) // KV_PAD) * KV_PAD
    return n_seq * max(per_seq, KV_PAD)


def kv_cache_bytes(model: ModelFile, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """K and V of these types for every layer (all layers keep their KV on the GPU)."""
    hp = model.hparams
    per_token = kv_row_bytes(type_k, hp["n_head_kv"] * hp["key_length"]) + \
        kv_row_bytes(type_v, hp["n_head_kv"] * hp["value_length"])
    return model.n_layer * n_ctx * per_token


def compute_bytes(model: ModelFile, n_ctx: int, n_ubatch: int, flash_attn: bool = True) -> int:
    """Rough size of llama.cpp's device compute buffer for one ubatch.

    llama.cpp reserves logits for every token of a ubatch (n_vocab floats
    each); ggml-alloc reuses activation memory, so only a few rows of width
    n_embd / n_ff are live at once; without flash attention the KQ matrix
    adds n_ctx floats per token and head. Calibrated on the H100 box against
    the measured peak of a Llama-3-8B-shaped model at n_ubatch 2048 (1.12 GiB
    beyond weights and KV cache, cuBLAS pool included; this gives 1.14 GiB).
    """
    hp = model.hparams
    u = n_ubatch
    logits = u * hp["n_vocab"] * 4
    activations = u * (hp["n_embd"] + hp["n_ff"]) * 4
    attention = 0 if flash_attn else u * n_ctx * hp["n_head"] * 4
    # build_moe_ffn: every token's gate and up rows for each expert it uses,
    # the down outputs before they are summed, and the CUDA pool's sorted
    # copies of the inputs for the grouped matrix products
    moe = u * hp.get("n_expert_used", 0) * (2 * hp.get("n_ff_exp", 0) + 2 * hp["n_embd"]) * 4
    return logits + activations + attention + moe + COMPUTE_HEADROOM


def shared_device_bytes(model: ModelFile) -> int:
    """Shared tensors llama.cpp puts on the GPU: all but the input embedding,
    which stays on the host; models with tied embeddings get a GPU copy of it
    as their output matrix."""
    total = sum(t.nbytes for t in model.tensors if t.layer is None and t.name != "token_embd.weight")
    if model.tensor("output.weight") is None and model.tensor("token_embd.weight") is not None:
        total += model.tensor("token_embd.weight").nbytes
    return total


# Bytes llama.cpp's AMX layout adds per block of a weight's rows (ggml-cpu/amx/
# mmq.cpp get_row_size): (elements per block, extra bytes).
AMX_BLOCK_EXTRA = {"Q8_0": (32, 4), "Q4_K": (256, 4), "Q5_K": (256, 4), "IQ4_XS": (256, 2)}


def amx_extra_bytes(model: ModelFile) -> tuple[int, ...]:
    """Per layer, what a copy of it in AMX's layout takes beyond its bytes:
    every 2-D weight of those types counted (an upper bound: AMX takes only
    the matrix products' weights, CPU_REPACK and the plain copy keep their size)."""
    extra = [0] * model.n_layer
    for t in model.tensors:
        if t.layer is not None and len(t.shape) == 2 and t.qtype in AMX_BLOCK_EXTRA:
            per_block, nbytes = AMX_BLOCK_EXTRA[t.qtype]
            extra[t.layer] += t.shape[0] // per_block * t.shape[1] * nbytes
    return tuple(extra)


def input_embedding_bytes(model: ModelFile) -> int:
    """llama.cpp keeps the input embedding (token_embd) in host memory."""
    t = model.tensor("token_embd.weight")
    return t.nbytes if t is not None else 0


def stock_device_bytes(model: ModelFile, n_gpu_layers: int, n_ctx: int, n_ubatch: int,
                       flash_attn: bool = True, type_k: str = "f16", type_v: str = "f16", n_seq: int = 1,
                       runtime_bytes: int = 0) -> int:
    """Estimated GPU memory of llama.cpp's own `-ngl n` split (n <= n_layer):
    the last n layers with their KV cache, the compute buffer, and room for
    the host weights the scheduler copies in for large batches (measured on
    the H100 box as about the output matrix: 0.27 GiB for the 8B shape at
    n_ubatch 2048 and 512, against 0.28 GiB of output matrix), and
    runtime_bytes the GPU runtime takes after the load (LAZY_KERNEL_BYTES on CUDA)."""
    per_layer_kv = kv_cache_bytes(model, kv_cells(n_ctx, n_seq), type_k, type_v) // model.n_layer
    resident = model.layer_bytes[model.n_layer - n_gpu_layers:] if n_gpu_layers else ()
    output = model.tensor("output.weight") or model.tensor("token_embd.weight")  # tied embeddings
    staging = output.nbytes if output is not None else 0
    return (sum(resident) + n_gpu_layers * per_layer_kv + compute_bytes(model, n_ctx, n_ubatch, flash_attn)
            + runtime_bytes + staging)


def generate_graph_bytes(model: ModelFile, n_ctx: int, n_tokens: int, flash_attn: bool = True) -> int:
    """Room to leave a generate-phase graph (ubatches under n_tokens tokens,
    every token an output) in the compute buffer: twice compute_bytes' estimate."""
    return 2 * compute_bytes(model, n_ctx, n_tokens, flash_attn)
