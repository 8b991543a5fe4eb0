"""Random quantized blocks for gguf_stream.synth, generated directly as raw
bytes (quantizing floats would take minutes for an 8B model): zero-mean
values of a chosen spread, in each type's ggml layout."""
from __future__ import annotations

import math

import numpy as np


def _raw_bytes(rng: np.random.Generator, n_blocks: int, block_bytes: int) -> np.ndarray:
    """(n_blocks, block_bytes) uniformly random uint8, from the raw bit stream (fastest path)."""
    n = n_blocks * block_bytes
    words = rng.bit_generator.random_raw((n + 7) // 8)
    return words.view(np.uint8)[:n].reshape(n_blocks, block_bytes)


def _pow2(x: float) -> float:
    """Nearest power of two: exactly representable in fp16, and so is 7.5 times it."""
    return 2.0 ** round(math.log2(x))


def q8_0_blocks(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    """Random Q8_0 blocks: (n_blocks, 34) uint8.

    Layout (ggml block_q8_0, 32 values): fp16 d | 32 x int8 q;  value = d * q.
    q is a random *odd* int8 (random byte with the low bit set) so it is uniform over
    {-127, -125, ..., 127}: symmetric, hence mean exactly 0, std ~ 127/sqrt(3).
    d is one power of two per tensor, chosen so that the value std ~ `std`.
    """
    blocks = _raw_bytes(rng, n_blocks, 34)
    blocks[:, 2:] |= 1
    d = np.float16(_pow2(std / (127 / math.sqrt(3))))
    blocks[:, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    return blocks


def q5_0_blocks(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    """Random Q5_0 blocks: (n_blocks, 22) uint8.

    Layout (ggml block_q5_0, 32 values): fp16 d | 4 bytes qh: the 5th bit of each
    quant | 16 bytes qs: low nibbles (value j in byte j's low half, j + 16 in its high
    half);  value = d * (q - 16), q in 0..31.
    Every nibble's low bit is set, so q is odd and q - 16 uniform over {-15, -13, ..., 15}:
    symmetric, mean exactly 0, std sqrt(85). d is one power of two per tensor.
    """
    blocks = _raw_bytes(rng, n_blocks, 22)
    blocks[:, 6:] |= 0x11
    d = np.float16(_pow2(std / math.sqrt(85)))
    blocks[:, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
    return blocks


def q4_k_blocks(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    """Random Q4_K blocks: (n_blocks, 144) uint8.

    Layout (ggml block_q4_K, a super-block of 256 values in 8 sub-blocks of 32):
        fp16 d | fp16 dmin | 12 bytes: eight 6-bit scales sc[j] and mins m[j] | 128 bytes q
    value = d * sc[j] * q - dmin * m[j], with q a 4-bit quant (two per byte).
    Packing of the 12 scale bytes (as in ggml-quants.c get_scale_min_k4), for j < 4:
        byte j     = sc[j]   | (sc[j+4] >> 4) << 6
        byte j + 4 = m[j]    | (m[j+4]  >> 4) << 6
        byte j + 8 = (sc[j+4] & 15) | (m[j+4] & 15) << 4

    Choices: the quant nibbles are uniform random in 0..15 (mean 7.5); each sub-block gets
    a random scale sc in 16..47 and the min m = sc, and dmin = 7.5 * d, so
    value = d * sc * (q - 7.5): symmetric, mean exactly 0 in every sub-block.
    d is one power of two per tensor with the value std ~ `std`.
    """
    blocks = _raw_bytes(rng, n_blocks, 144)
    sc = 16 + (blocks[:, 4:12] & 31)               # random 6-bit scales, 16..47
    lo, hi = sc[:, :4], sc[:, 4:]
    top = (hi >> 4) << 6
    blocks[:, 4:8] = lo | top                     # scales 0..3 (+ top bits of 4..7)
    blocks[:, 8:12] = lo | top                    # mins == scales
    blocks[:, 12:16] = (hi & 15) * 17             # low nibbles of scale and min 4..7
    sc_rms = math.sqrt(31.5 ** 2 + (32 ** 2 - 1) / 12)
    d = _pow2(std / (sc_rms * math.sqrt((16 ** 2 - 1) / 12)))
    blocks[:, 0:4] = np.frombuffer(np.array([d, 7.5 * d], np.float16).tobytes(), np.uint8)
    return blocks


def mxfp4_blocks(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    """Random MXFP4 blocks: (n_blocks, 17) uint8 (gpt-oss's expert weights).

    Layout (ggml block_mxfp4, 32 values): E8M0 exponent e | 16 bytes qs: 4-bit codes
    (value j in byte j's low half, j + 16 in its high half); value = k[code] * 2^(e-127) / 2
    with k = 0, 1, 2, 3, 4, 6, 8, 12 and their negatives (twice FP4 E2M1). Uniform codes
    are symmetric (mean exactly 0, rms of k sqrt(34.25)); e is one per tensor.
    """
    blocks = _raw_bytes(rng, n_blocks, 17)
    blocks[:, 0] = 127 + round(math.log2(2 * std / math.sqrt(34.25)))
    return blocks


_BLOCKS = {"Q4_K": (q4_k_blocks, 256), "Q8_0": (q8_0_blocks, 32), "Q5_0": (q5_0_blocks, 32),
           "MXFP4": (mxfp4_blocks, 32)}
# What a tensor whose rows do not split into the type's blocks is written as
# (llama-quantize's convert_incompatible_tensor: Q4_K -> Q5_0)
_FALLBACK = {"Q4_K": "Q5_0"}
