"""Write random-weight GGUF files with real model shapes (for benchmarks and tests).

The files are complete GGUF models that llama.cpp can load and run: real
hyper-parameter metadata, a small SentencePiece-style ("llama") tokenizer, and
quantized weight tensors whose blocks are generated *directly as raw bytes*
(quantizing floats would take minutes for an 8B model).  Five architectures:

* dense "llama" (Llama 3 shapes);
* mixture-of-experts "qwen3moe" (Qwen3-30B-A3B shapes): per layer a float32 router
  `ffn_gate_inp` and 3-D expert tensors `ffn_{gate,up,down}_exps` (one slab of
  n_ff_exp x n_embd weights per expert), plus Qwen3's per-head RMS norms
  `attn_q_norm` / `attn_k_norm` and a head_dim that need not be n_embd / n_head;
* mixture-of-experts with a shared expert "qwen2moe" (Qwen1.5-MoE-A2.7B shapes): the
  same routed experts, plus a shared expert every token uses (`ffn_{gate,up,down}_shexp`,
  n_ff_shexp wide) scaled by a sigmoid gate (`ffn_gate_inp_shexp`, one F32 vector),
  and Qwen2's q/k/v biases;
* "gpt-oss" (gpt-oss-20b/120b shapes): biases on q/k/v, the attention output, the
  router and every expert matrix, attention sinks (`attn_sinks`, a logit per head),
  every other layer a sliding window, and MXFP4 expert weights as the released files;
* "glm4moe" (GLM-4.5-Air shapes): the first n_dense_lead layers dense (no experts at
  all), the others routed experts with sigmoid gating and a selection bias
  (`exp_probs_b`) plus shared experts without a gate; q/k/v biases, rotary embedding
  on n_rot of each head's dimensions, `post_attention_norm` before the feed-forward.

Rows whose length is not a multiple of 256 cannot be Q4_K (the experts of
Qwen1.5-MoE and GLM-4.5 are 1408 wide): such tensors are written Q5_0, as
llama-quantize falls back.

Weight design (see `q4_k_blocks` / `q8_0_blocks` / `q5_0_blocks` for the exact layouts):

* zero mean: the quants are uniform over a set that is symmetric about the block's
  zero point, so every dequantized value has mean exactly 0 and a modest, chosen
  standard deviation (0.02 for matrices), which keeps activations and logits finite
  through dozens of layers;
* distinct bytes: every tensor draws from its own RNG stream keyed by
  (seed, layer, tensor kind), so no two layers share data and swapping layers, or
  changing the seed, changes the model's output; the experts of a tensor are
  consecutive slabs of that stream, so they differ too;
* routing that varies: the router is random F32, so each expert scores a random
  direction of the RMS-normed hidden state and the top-k change from token to token
  (top-k ignores the router's scale; its std ROUTER_LOGIT_STD / sqrt(n_embd) only
  keeps the softmax mixing weights of the chosen experts from being one-hot).
  with the attention output at MATRIX_STD / 16 deep layers spread like the first
  (qwen3-30b-a3b, 128 tokens: all 128 experts used in every layer, two tokens share
  0.5 of 8 on average, as chance gives); at MATRIX_STD, random attention's common
  part swamped the tokens (32-41 experts used past layer 24); qwen1.5-moe-a2.7b, 128
  tokens: all 60 experts used in every layer, consecutive tokens share 0.2-0.35 of 4
  (chance: 0.27). The shared expert's gate is random like a router (sigmoid of a
  logit of std ~1), so it scales the shared expert token by token;
* streaming: tensors are generated and written one at a time (generation of the next
  tensor overlaps the write of the previous one), so memory stays around two tensors.

CLI:  python -m gguf_stream.synth OUT.gguf --shape llama3-8b --type Q4_K --seed 0
      python -m gguf_stream.synth OUT.gguf --shape qwen3-30b-a3b   (MoE, 16.0 GiB, ~1 min)
      python -m gguf_stream.synth OUT.gguf --shape qwen1.5-moe-a2.7b   (shared expert, 8.0 GiB)
      python -m gguf_stream.synth --list
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

from .synth_blocks import _BLOCKS, _FALLBACK, mxfp4_blocks, q4_k_blocks, q5_0_blocks, q8_0_blocks

__all__ = ["Shape", "SHAPES", "QTYPES", "tensor_specs", "tensor_type", "q4_k_blocks", "q8_0_blocks",
           "q5_0_blocks", "mxfp4_blocks", "write_synthetic", "main"]


@dataclasses.dataclass(frozen=True)
class Shape:
    """Hyper-parameters of a dense llama or a mixture-of-experts model (qwen3moe,
    qwen2moe, glm4moe, gpt-oss, deepseek2).

    head_dim 0 means n_embd // n_head (llama); n_expert 0 means a dense model.
    For MoE, n_ff is the `feed_forward_length` metadata, which only glm4moe's
    leading dense layers use (the expert layers use n_ff_exp, the hidden size of
    one expert, and n_ff_shexp, the shared experts').
    """
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    ctx_len: int
    rope_theta: float
    rms_eps: float = 1e-5
    head_dim: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0  # the shared experts' hidden size (qwen2moe; glm4moe: n_ff_exp x their count)
    n_dense_lead: int = 0  # leading layers without experts (glm4moe, deepseek2)
    n_rot: int = 0       # rotated dimensions of a head; 0: head_dim
    n_swa: int = 0       # sliding window of every other layer (gpt-oss); 0: none
    # deepseek2's multi-head latent attention: head_dim is a query/key head's (nope + n_rot), the
    # cache holds kv_lora_rank + n_rot per token; q_lora_rank 0: one query matrix (V2-Lite, whose
    # experts route by softmax), else a low-rank one (V3, routing by sigmoid + a selection bias,
    # the top-k weights normalised and scaled 2.5)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if not self.n_rot:
            object.__setattr__(self, "n_rot", self.head_dim)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0


SHAPES: dict[str, Shape] = {
    # Meta-Llama-3-8B
    "llama3-8b": Shape("llama", n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8,
                       n_vocab=128256, ctx_len=8192, rope_theta=500000.0),
    # Llama-3.2-1B shapes (the real model ties output to token_embd; here output is separate)
    "llama3.2-1b": Shape("llama", n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8,
                         n_vocab=128256, ctx_len=8192, rope_theta=500000.0),
    # a 32B-class dense model (Qwen2.5-32B's sizes, written as llama): the disk tier's larger GPU test
    "dense-32b": Shape("llama", n_layer=64, n_embd=5120, n_ff=27648, n_head=40, n_head_kv=8,
                       n_vocab=152064, ctx_len=32768, rope_theta=1000000.0, rms_eps=1e-6),
    # for tests: every row length is a multiple of 256 (the K-quant super-block)
    "tiny": Shape("llama", n_layer=8, n_embd=256, n_ff=768, n_head=4, n_head_kv=2,
                  n_vocab=512, ctx_len=512, rope_theta=10000.0),
    # Qwen3-30B-A3B: 128 experts of n_ff 768, 8 used per token; 32 heads of 128 (> n_embd)
    "qwen3-30b-a3b": Shape("qwen3moe", n_layer=48, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4,
                           n_vocab=151936, ctx_len=40960, rope_theta=1000000.0, rms_eps=1e-6,
                           head_dim=128, n_expert=128, n_expert_used=8, n_ff_exp=768),
    # for tests: qwen3moe in miniature, K-quant friendly (rows of 256)
    "tiny-moe": Shape("qwen3moe", n_layer=4, n_embd=256, n_ff=768, n_head=4, n_head_kv=2,
                      n_vocab=512, ctx_len=512, rope_theta=1000000.0, rms_eps=1e-6,
                      head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=256),
    # Qwen1.5-MoE-A2.7B: 60 experts of n_ff 1408 (written Q5_0 under Q4_K), 4 used, a
    # shared expert of 5632; 16 heads of 128, no GQA
    "qwen1.5-moe-a2.7b": Shape("qwen2moe", n_layer=24, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=16,
                               n_vocab=151936, ctx_len=8192, rope_theta=1000000.0, rms_eps=1e-6,
                               n_expert=60, n_expert_used=4, n_ff_exp=1408, n_ff_shexp=5632),
    # for tests: qwen2moe in miniature; experts 160 wide, so their down matrices are
    # Q5_0 (the fallback the real size needs) and the rest Q4_K
    "tiny-qwen2moe": Shape("qwen2moe", n_layer=4, n_embd=256, n_ff=768, n_head=4, n_head_kv=2,
                           n_vocab=512, ctx_len=512, rope_theta=1000000.0, rms_eps=1e-6,
                           n_expert=8, n_expert_used=2, n_ff_exp=160, n_ff_shexp=512),
    # GLM-4.5-Air: layer 0 dense (n_ff 10944), 45 of 128 experts of n_ff 1408 (Q5_0 under
    # Q4_K), 8 used, 1 shared; 96 heads of 128 (3x n_embd), half of each rotated
    "glm-4.5-air": Shape("glm4moe", n_layer=46, n_embd=4096, n_ff=10944, n_head=96, n_head_kv=8,
                         n_vocab=151552, ctx_len=131072, rope_theta=1000000.0, head_dim=128,
                         n_expert=128, n_expert_used=8, n_ff_exp=1408, n_ff_shexp=1408, n_dense_lead=1,
                         n_rot=64),
    # gpt-oss-20b: 32 MXFP4 experts of n_ff 2880, 4 used; 64 heads of 64 (4096 > n_embd), every
    # other layer a 128-token sliding window; biases on attention, router and experts; the other
    # matrices Q5_0 under Q4_K (rows of 2880)
    "gpt-oss-20b": Shape("gpt-oss", n_layer=24, n_embd=2880, n_ff=2880, n_head=64, n_head_kv=8,
                         n_vocab=201088, ctx_len=131072, rope_theta=150000.0, head_dim=64, n_expert=32,
                         n_expert_used=4, n_ff_exp=2880, n_swa=128),
    # gpt-oss-120b: 36 layers, 128 experts
    "gpt-oss-120b": Shape("gpt-oss", n_layer=36, n_embd=2880, n_ff=2880, n_head=64, n_head_kv=8,
                          n_vocab=201088, ctx_len=131072, rope_theta=150000.0, head_dim=64, n_expert=128,
                          n_expert_used=4, n_ff_exp=2880, n_swa=128),
    # for tests: gpt-oss in miniature; an 8-token window, so tests' prompts cross it
    "tiny-gpt-oss": Shape("gpt-oss", n_layer=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_vocab=512,
                          ctx_len=512, rope_theta=150000.0, head_dim=64, n_expert=8, n_expert_used=2,
                          n_ff_exp=256, n_swa=8),
    # DeepSeek-V2-Lite: layer 0 dense (n_ff 10944), 64 experts of n_ff 1408 (Q5_0 under Q4_K), 6 used,
    # 2 shared; 16 heads, latent attention (kv rank 512, heads of 128 + 64 rotated, values 128)
    "deepseek-v2-lite": Shape("deepseek2", n_layer=27, n_embd=2048, n_ff=10944, n_head=16, n_head_kv=1,
                              n_vocab=102400, ctx_len=163840, rope_theta=10000.0, rms_eps=1e-6, head_dim=192,
                              n_rot=64, kv_lora_rank=512, v_head_dim=128, n_expert=64, n_expert_used=6,
                              n_ff_exp=1408, n_ff_shexp=2816, n_dense_lead=1),
    # for tests: deepseek2 in miniature, layer 0 dense, V3's low-rank queries and sigmoid routing;
    # a latent 256 wide, so attn_v_b is Q4_K as in the real sizes (a 3-D matrix CPU_REPACK could take)
    "tiny-deepseek2": Shape("deepseek2", n_layer=4, n_embd=256, n_ff=768, n_head=4, n_head_kv=1, n_vocab=512,
                            ctx_len=512, rope_theta=10000.0, head_dim=64, n_rot=32, q_lora_rank=128,
                            kv_lora_rank=256, v_head_dim=32, n_expert=8, n_expert_used=2, n_ff_exp=160,
                            n_ff_shexp=160, n_dense_lead=1),
    # for tests: glm4moe in miniature, layer 0 dense
    "tiny-glm4moe": Shape("glm4moe", n_layer=4, n_embd=256, n_ff=768, n_head=4, n_head_kv=2,
                          n_vocab=512, ctx_len=512, rope_theta=1000000.0, head_dim=64, n_expert=8,
                          n_expert_used=2, n_ff_exp=160, n_ff_shexp=160, n_dense_lead=1, n_rot=32),
}

QTYPES: dict[str, QT] = {"Q4_K": QT.Q4_K, "Q8_0": QT.Q8_0}
_FILE_TYPE = {"Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

MATRIX_STD = 0.02   # std of the dequantized weight matrices
EMBD_STD = 1.0      # std of token_embd
NORM_NOISE = 0.02   # norm weights are 1 + NORM_NOISE * N(0, 1)
ROUTER_LOGIT_STD = 1.0  # std of the router logits on an RMS-normed hidden state (softmax not one-hot)
# Random attention averages the tokens' values, so each layer adds nearly the
# same vector to every token; at MATRIX_STD that common part outgrows the
# token's own embedding within a few layers and deep routers then pick the
# same few experts for every token (128 tokens used 32-41 of 128 experts past
# layer 24 of qwen3-30b-a3b, where a trained model's routing spreads over
# nearly all). A smaller attention output keeps tokens apart.
MOE_ATTN_OUTPUT_STD = MATRIX_STD / 16

# Order of the per-layer tensors; the index is part of each tensor's RNG key.
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
# qwen3moe's extra kinds are numbered after the dense ones, so the tensors both
# architectures share keep their RNG keys (and the dense files their bytes).
MOE_KINDS = ("attn_q_norm", "attn_k_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
MOE_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                     "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# qwen2moe's kinds come after those (names with a dot are full suffixes: biases)
SHARED_KINDS = ("attn_q.bias", "attn_k.bias", "attn_v.bias",
                "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
QWEN2MOE_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_q.bias", "attn_k", "attn_k.bias", "attn_v", "attn_v.bias",
                          "attn_output", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                          "ffn_down_exps", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
# then glm4moe's
GLM_KINDS = ("post_attention_norm", "exp_probs_b.bias")
_GLM_ATTENTION = ("attn_norm", "attn_q", "attn_q.bias", "attn_k", "attn_k.bias", "attn_v", "attn_v.bias",
                  "attn_output", "post_attention_norm")
GLM4MOE_DENSE_TENSORS = _GLM_ATTENTION + ("ffn_gate", "ffn_up", "ffn_down")
GLM4MOE_LAYER_TENSORS = _GLM_ATTENTION + ("ffn_gate_inp", "exp_probs_b.bias", "ffn_gate_exps", "ffn_up_exps",
                                          "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
# then gpt-oss's: biases on the attention output, the router and every expert matrix; attention sinks
GPT_OSS_KINDS = ("attn_output.bias", "attn_sinks", "ffn_gate_inp.bias", "ffn_gate_exps.bias", "ffn_up_exps.bias",
                 "ffn_down_exps.bias")
GPT_OSS_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_q.bias", "attn_k", "attn_k.bias", "attn_v", "attn_v.bias",
                         "attn_output", "attn_output.bias", "attn_sinks", "post_attention_norm", "ffn_gate_inp",
                         "ffn_gate_inp.bias", "ffn_gate_exps", "ffn_gate_exps.bias", "ffn_up_exps", "ffn_up_exps.bias",
                         "ffn_down_exps", "ffn_down_exps.bias")
# then deepseek2's latent attention
DEEPSEEK2_KINDS = ("attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b", "attn_v_b")
_KIND_INDEX = {name: i for i, name in enumerate(LAYER_TENSORS + MOE_KINDS + SHARED_KINDS + GLM_KINDS + GPT_OSS_KINDS
                                                + DEEPSEEK2_KINDS)}
_LAYER_TENSORS = {"llama": LAYER_TENSORS, "qwen3moe": MOE_LAYER_TENSORS, "qwen2moe": QWEN2MOE_LAYER_TENSORS,
                  "glm4moe": GLM4MOE_LAYER_TENSORS, "gpt-oss": GPT_OSS_LAYER_TENSORS}
_GLOBAL_TENSORS = ("token_embd", "output_norm", "output")
ARCHS = (*_LAYER_TENSORS, "deepseek2")   # llama is dense, the others MoE
SHARED_EXPERT_ARCHS = ("qwen2moe", "glm4moe", "deepseek2")
DENSE_LEAD_ARCHS = ("glm4moe", "deepseek2")  # MoE architectures whose first layers may be dense


def _layer_names(shape: Shape, il: int) -> tuple[str, ...]:
    """The tensor kinds of layer il, in file order."""
    dense = il < shape.n_dense_lead
    if shape.arch != "deepseek2":
        return GLM4MOE_DENSE_TENSORS if dense else _LAYER_TENSORS[shape.arch]
    q = ("attn_q_a", "attn_q_a_norm", "attn_q_b") if shape.q_lora_rank else ("attn_q",)
    attention = ("attn_norm", *q, "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b", "attn_v_b", "attn_output", "ffn_norm")
    if dense:
        return attention + ("ffn_gate", "ffn_up", "ffn_down")
    return attention + ("ffn_gate_inp", *(("exp_probs_b.bias",) if shape.q_lora_rank else ()), "ffn_gate_exps",
                        "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
BIAS_STD = 0.02     # q/k/v biases and glm4moe's expert selection bias: F32, small (routing stays the router's)


# --------------------------------------------------------------------------- tensors

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor: GGUF name, numpy-order shape (..., rows, row_length), and RNG key.

    Expert tensors are 3-D: (n_expert, rows, row_length), i.e. ggml's
    ne = [row_length, rows, n_expert]; their data is one quantized 2-D slab per expert.
    """
    name: str
    shape: tuple[int, ...]
    key: tuple[int, int]      # (layer + 1, kind); layer -1 is for the global tensors
    is_norm: bool
    is_router: bool = False   # F32 random (not 1 + noise), not quantized
    std: float | None = None  # of the dequantized values; None: EMBD_STD / MATRIX_STD
    is_bias: bool = False     # F32, BIAS_STD * N(0, 1)
    qtype: str | None = None  # written as this type whatever the file's (gpt-oss's experts: MXFP4)


def _layer_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """numpy-order shape of every per-layer tensor kind (numpy order = ggml ne reversed)."""
    e, ff, hd = shape.n_embd, shape.n_ff, shape.head_dim
    q, kv = shape.n_head * hd, shape.n_head_kv * hd
    shapes = {"attn_norm": (e,), "attn_q": (q, e), "attn_k": (kv, e), "attn_v": (kv, e),
              "attn_output": (e, q), "ffn_norm": (e,), "ffn_gate": (ff, e),
              "ffn_up": (ff, e), "ffn_down": (e, ff)}
    if shape.is_moe:
        n_exp, ff_exp = shape.n_expert, shape.n_ff_exp
        shapes.update({"attn_q_norm": (hd,), "attn_k_norm": (hd,), "ffn_gate_inp": (n_exp, e),
                       "ffn_gate_exps": (n_exp, ff_exp, e), "ffn_up_exps": (n_exp, ff_exp, e),
                       "ffn_down_exps": (n_exp, e, ff_exp)})
    if shape.arch == "gpt-oss":
        shapes.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,), "attn_output.bias": (e,),
                       "attn_sinks": (shape.n_head,), "post_attention_norm": (e,), "ffn_gate_inp.bias": (n_exp,),
                       "ffn_gate_exps.bias": (n_exp, ff_exp), "ffn_up_exps.bias": (n_exp, ff_exp),
                       "ffn_down_exps.bias": (n_exp, e)})
    if shape.n_ff_shexp:
        sh = shape.n_ff_shexp
        shapes.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
                       "ffn_gate_inp_shexp": (e,), "ffn_gate_shexp": (sh, e), "ffn_up_shexp": (sh, e),
                       "ffn_down_shexp": (e, sh), "post_attention_norm": (e,), "exp_probs_b.bias": (shape.n_expert,)})
    if shape.arch == "deepseek2":  # ggml's ne reversed, as everywhere here
        h, ql, kl, rot, v = shape.n_head, shape.q_lora_rank, shape.kv_lora_rank, shape.n_rot, shape.v_head_dim
        shapes.update({"attn_q_a": (ql, e), "attn_q_a_norm": (ql,), "attn_q_b": (q, ql),
                       "attn_kv_a_mqa": (kl + rot, e), "attn_kv_a_norm": (kl,), "attn_k_b": (h, kl, hd - rot),
                       "attn_v_b": (h, v, kl), "attn_output": (e, h * v)})
    return shapes


def tensor_specs(shape: Shape) -> list[TensorSpec]:
    """All tensors of the model, in file order, with standard llama.cpp names."""
    e = shape.n_embd
    layer_shapes = _layer_shapes(shape)
    specs = [TensorSpec("token_embd.weight", (shape.n_vocab, e), (0, 0), False)]
    for il in range(shape.n_layer):
        for name in _layer_names(shape, il):
            std = MOE_ATTN_OUTPUT_STD if shape.is_moe and name == "attn_output" else None
            # the shared expert's gate is a vector of one logit's weights, random like a router's;
            # gpt-oss's attention sinks are logits too (one per head)
            router = name in ("ffn_gate_inp", "ffn_gate_inp_shexp", "attn_sinks")
            full = f"blk.{il}.{name}" + ("" if "." in name else ".weight")
            mxfp4 = shape.arch == "gpt-oss" and name.endswith("_exps") and layer_shapes[name][-1] % 32 == 0
            specs.append(TensorSpec(full, layer_shapes[name], (il + 1, _KIND_INDEX[name]),
                                    name.endswith("_norm"), router, std, name.endswith(".bias"),
                                    "MXFP4" if mxfp4 else None))
    specs.append(TensorSpec("output_norm.weight", (e,), (0, 1), True))
    specs.append(TensorSpec("output.weight", (shape.n_vocab, e), (0, 2), False))
    return specs


def _is_float(spec: TensorSpec) -> bool:
    """Stored as F32: norms, biases and routers (llama.cpp needs float vectors and routers)."""
    return spec.is_norm or spec.is_router or spec.is_bias


def tensor_type(spec: TensorSpec, qtype: str) -> str:
    """What the tensor is written as: F32, qtype, or qtype's fallback where its rows
    do not split into qtype's blocks (raises where neither fits)."""
    if _is_float(spec):
        return "F32"
    if spec.qtype:
        return spec.qtype
    cols = spec.shape[-1]
    for t in (qtype, _FALLBACK.get(qtype)):
        if t and cols % _BLOCKS[t][1] == 0:
            return t
    raise ValueError(f"{spec.name}: row length {cols} is not a multiple of {_BLOCKS[qtype][1]} ({qtype})"
                     + (f" nor of {_BLOCKS[_FALLBACK[qtype]][1]} ({_FALLBACK[qtype]})" if qtype in _FALLBACK else ""))


def _tensor_data(spec: TensorSpec, qtype: str, seed: int) -> np.ndarray:
    """The tensor's bytes (quantized: (..., rows, row_bytes) uint8; norms, router: float32)."""
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed, spawn_key=spec.key)))
    if spec.is_norm:
        return (1.0 + NORM_NOISE * rng.standard_normal(spec.shape, dtype=np.float32)).astype(np.float32)
    if spec.is_router or spec.is_bias:
        std = BIAS_STD if spec.is_bias else ROUTER_LOGIT_STD / math.sqrt(spec.shape[-1])
        return (std * rng.standard_normal(spec.shape, dtype=np.float32)).astype(np.float32)
    make, block_size = _BLOCKS[tensor_type(spec, qtype)]
    std = spec.std or (EMBD_STD if spec.name == "token_embd.weight" else MATRIX_STD)
    blocks = make(rng, math.prod(spec.shape) // block_size, std)
    return blocks.reshape(*spec.shape[:-1], -1)


# --------------------------------------------------------------------------- metadata

def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens <0xXX>,
    "▁" and the printable ASCII characters (so text tokenizes into characters; anything
    else falls back to byte tokens and round-trips), then filler tokens "▁t<i>"."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    chars = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)]
    tokens += chars
    types += [T.NORMAL] * len(chars)
    if n_vocab < len(tokens):
        raise ValueError(f"n_vocab must be >= {len(tokens)}")
    n_fill = n_vocab - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(n_fill)]
    types += [T.NORMAL] * n_fill
    scores = [-float(i) if t == T.NORMAL else 0.0 for i, t in enumerate(types)]
    return tokens, scores, [int(t) for t in types]


def _add_metadata(w: gguf.GGUFWriter, shape: Shape, qtype: str, name: str) -> None:
    w.add_name(name)
    w.add_block_count(shape.n_layer)
    w.add_context_length(shape.ctx_len)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_rope_dimension_count(shape.n_rot)
    if shape.is_moe:
        if shape.arch != "deepseek2":
            w.add_key_length(shape.head_dim)
            w.add_value_length(shape.head_dim)
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used)
        w.add_expert_feed_forward_length(shape.n_ff_exp)
    if shape.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(shape.n_ff_shexp)
    if shape.arch == "gpt-oss":  # every other layer attends to the last n_swa tokens only
        w.add_sliding_window(shape.n_swa)
    if shape.arch in DENSE_LEAD_ARCHS:  # GLM-4.5's: sigmoid scores, top-k weights normalised, scale 1
        v3 = shape.arch == "glm4moe" or shape.q_lora_rank > 0  # DeepSeek-V3's too, scale 2.5; V2's softmax
        w.add_expert_shared_count(shape.n_ff_shexp // shape.n_ff_exp)
        w.add_leading_dense_block_count(shape.n_dense_lead)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_weights_norm(v3)
        w.add_expert_weights_scale(1.0 if shape.arch == "glm4moe" or not v3 else 2.5)
    if shape.arch == "deepseek2":  # the cache holds the latent (MQA of one head): as convert_hf_to_gguf writes it
        if shape.q_lora_rank:
            w.add_q_lora_rank(shape.q_lora_rank)
        w.add_kv_lora_rank(shape.kv_lora_rank)
        w.add_key_length(shape.kv_lora_rank + shape.n_rot)
        w.add_value_length(shape.kv_lora_rank)
        w.add_key_length_mla(shape.head_dim)
        w.add_value_length_mla(shape.v_head_dim)
    w.add_vocab_size(shape.n_vocab)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = _vocab(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


# --------------------------------------------------------------------------- writer

def _nbytes(spec: TensorSpec, qtype: str) -> int:
    if _is_float(spec):
        return 4 * math.prod(spec.shape)
    block_size, type_size = gguf.GGML_QUANT_SIZES[QT[tensor_type(spec, qtype)]]
    return math.prod(spec.shape) // block_size * type_size


def _check_arch(shape: Shape) -> None:
    """llama is written dense, the others as MoE (their loaders require experts);
    qwen2moe and glm4moe with shared experts, as their loaders' shapes need them."""
    if shape.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {shape.arch!r}")
    moe = shape.arch != "llama"
    if shape.is_moe != moe:
        raise ValueError(f"arch {shape.arch!r} is written {'with' if moe else 'without'} "
                         f"experts; got n_expert={shape.n_expert}")
    if shape.is_moe and not (0 < shape.n_expert_used <= shape.n_expert and shape.n_ff_exp > 0):
        raise ValueError(f"MoE needs 0 < n_expert_used <= n_expert and n_ff_exp > 0; got {shape}")
    shared = shape.arch in SHARED_EXPERT_ARCHS
    if (shape.n_ff_shexp > 0) != shared:
        raise ValueError(f"arch {shape.arch!r} is written {'with' if shared else 'without'} a shared expert; "
                         f"got n_ff_shexp={shape.n_ff_shexp}")
    if shape.arch == "qwen2moe" and shape.head_dim * shape.n_head != shape.n_embd:
        raise ValueError(f"{shape.arch} needs head_dim * n_head == n_embd; got {shape.head_dim} * {shape.n_head}")
    if shape.arch in DENSE_LEAD_ARCHS and shape.n_ff_shexp % shape.n_ff_exp:
        raise ValueError(f"{shape.arch}'s shared experts are n_ff_exp wide: n_ff_shexp ({shape.n_ff_shexp}) must be "
                         f"a multiple of n_ff_exp ({shape.n_ff_exp})")
    if not 0 <= shape.n_dense_lead < shape.n_layer or (shape.n_dense_lead and shape.arch not in DENSE_LEAD_ARCHS):
        raise ValueError(f"n_dense_lead must be in 0..n_layer-1, and only {' and '.join(DENSE_LEAD_ARCHS)} have dense "
                         f"leading layers; got {shape.n_dense_lead} for {shape.arch}")
    mla = shape.arch == "deepseek2"
    if mla != (shape.kv_lora_rank > 0 and shape.v_head_dim > 0 and shape.n_head_kv == 1 and shape.n_rot < shape.head_dim):
        raise ValueError(f"deepseek2 alone has (and needs) latent attention: kv_lora_rank > 0, v_head_dim > 0, "
                         f"n_head_kv 1, n_rot < head_dim; got {shape}")
    if shape.arch == "deepseek2" and shape.n_layer in (26, 27) and shape.q_lora_rank:
        raise ValueError("llama.cpp reads a 26- or 27-layer deepseek2 as V2-Lite, without q_lora_rank: give 0")
    if (shape.n_swa > 0) != (shape.arch == "gpt-oss"):
        raise ValueError(f"gpt-oss alone has (and needs) a sliding window; got n_swa={shape.n_swa} for {shape.arch}")
    if shape.arch not in DENSE_LEAD_ARCHS and shape.n_rot != shape.head_dim:
        raise ValueError(f"{shape.arch} rotates whole heads: n_rot must be head_dim ({shape.head_dim})")


def write_synthetic(path: str | Path, shape: Shape | str, qtype: str = "Q4_K", seed: int = 0,
                    progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write a random-weight GGUF model with the given shape; returns the path.

    shape: a `Shape` or a key of `SHAPES`.  qtype: "Q4_K" or "Q8_0" (all 2-D tensors,
    including token_embd and output, Q5_0 where Q4_K's rows do not fit; norms, biases
    and routers are F32).  seed: RNG seed; each tensor has its
    own stream keyed by (seed, layer, tensor kind).  progress: optional callback
    progress(tensor_name, bytes_done, bytes_total) called after each tensor is written.
    """
    if isinstance(shape, str):
        shape = SHAPES[shape]
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {sorted(QTYPES)}, got {qtype!r}")
    _check_arch(shape)
    path = Path(path)
    specs = tensor_specs(shape)

    w = gguf.GGUFWriter(path, shape.arch)
    _add_metadata(w, shape, qtype, f"synthetic-{qtype}-seed{seed}")
    for spec in specs:
        if _is_float(spec):
            w.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), _nbytes(spec, qtype))
        else:
            rows = math.prod(spec.shape[:-1])
            nbytes = _nbytes(spec, qtype)
            w.add_tensor_info(spec.name, (*spec.shape[:-1], nbytes // rows), np.dtype(np.uint8), nbytes,
                              raw_dtype=QT[tensor_type(spec, qtype)])
    total = sum(_nbytes(s, qtype) for s in specs)

    def datas() -> Iterator[tuple[TensorSpec, np.ndarray]]:
        for spec in specs:
            yield spec, _tensor_data(spec, qtype, seed)

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        # Overlap: the pool thread writes tensor i (file I/O releases the GIL) while this
        # thread generates tensor i + 1.  At most two tensors are alive at any time.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = None
            for spec, data in datas():
                if pending is not None:
                    pending.result()
                pending = pool.submit(w.write_tensor_data, data)
                done += data.nbytes
                if progress is not None:
                    progress(spec.name, done, total)
                del data
            if pending is not None:
                pending.result()
        w.flush()
    finally:
        w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gguf_stream.synth", description="Write a random-weight GGUF model with real shapes.")
    ap.add_argument("out", nargs="?", help="output .gguf path")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--type", dest="qtype", default="Q4_K", choices=sorted(QTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the named shapes (and file sizes) and exit")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)

    if args.list:
        for name, s in SHAPES.items():
            size = sum(_nbytes(spec, "Q4_K") for spec in tensor_specs(s))
            print(f"{name:14s} {size / 2**20:9.1f} MiB in Q4_K  {dataclasses.asdict(s)}")
        return 0
    if not args.out:
        ap.error("the output path is required (or use --list)")

    def report(name: str, done: int, total: int) -> None:
        print(f"\r{done / 2**20:9.0f} / {total / 2**20:.0f} MiB  {name:28s}", end="", file=sys.stderr)

    t0 = time.perf_counter()
    path = write_synthetic(args.out, args.shape, args.qtype, args.seed,
                           progress=None if args.quiet else report)
    if not args.quiet:
        print(file=sys.stderr)
    size = path.stat().st_size
    print(f"{path}  {size} bytes ({size / 2**30:.2f} GiB)  in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
