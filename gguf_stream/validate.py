"""Header sanity checks: what llama.cpp would abort on (GGML_ASSERT kills the
process) rather than refuse with an error, checked before it sees the file.

Hyper-parameters are read with llama.cpp's own typing (src/llama-model-loader.cpp:
a uint32 key must be a uint32; a per-layer key is a uint32 or an int32/uint32
array of n_layer elements), then checked against the asserts of
llama_model_base::load_hparams (src/llama-model.cpp), of the graphs of the
architectures listed in ATTENTION_ARCHS (src/models/*.cpp), of the tensors
those graphs use, and of the vocabulary (src/llama-vocab.cpp). What llama.cpp
refuses with an exception (a missing key, a tensor of the wrong shape) is
left to it: the load fails cleanly and model.py reports it.
"""
from __future__ import annotations

import math

from .errors import ModelFileError

# src/llama-hparams.h
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
VOCABULARY_KEY = "tokenizer.ggml.tokens"
TOKENIZER_MODEL_KEY = "tokenizer.ggml.model"
NO_VOCABULARY = ("none", "no_vocab")  # src/llama-vocab.cpp: LLAMA_VOCAB_TYPE_NONE
# src/llama-model.cpp LLAMA_ROPE_SCALING_TYPES
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Graphs that assert n_embd_head_k == n_embd_head_v == n_rot (src/models/<arch>.cpp)
EQUAL_HEAD_ARCHS = frozenset({"llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe"})
# Architectures whose attention splits n_head query heads over n_head_kv
# key/value heads (ggml_mul_mat broadcasts only whole multiples)
ATTENTION_ARCHS = EQUAL_HEAD_ARCHS | {"gemma", "gemma2", "gemma3"}
# llama.cpp's quantizer leaves these in a float type and its graphs rely on it
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
# ggml's CPU backend aborts on weights of these types: integers and F64 are
# data, Q8_1 and Q8_K the other operand's format inside its dot products
NOT_WEIGHT_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"})
ROUTER_TENSOR = "ffn_gate_inp.weight"
EPSILON_KEYS = (".layer_norm_rms_epsilon", ".layer_norm_epsilon")

# GGUF value types (gguf_file.py's codes; repeated to keep this module free of the parser)
_UINT32, _INT32, _FLOAT32, _BOOL, _ARRAY, _FLOAT64 = 4, 5, 6, 7, 9, 12


class _Keys:
    """Typed reads of `{arch}.*` keys, as llama.cpp's get_key / get_key_or_arr do them."""

    def __init__(self, kv: dict, arch: str, where: str):
        self.kv, self.arch, self.where = kv, arch, where

    def fail(self, msg: str):
        raise ModelFileError(f"{self.where}: {msg}")

    def u32(self, name: str, default: int | None = None) -> int | None:
        key = f"{self.arch}.{name}"
        field = self.kv.get(key)
        if field is None:
            return default
        if field.type != _UINT32:
            self.fail(f"{key} is a {field.type_name}; llama.cpp reads it as a uint32")
        return field.value

    def per_layer(self, name: str, n_layer: int, default: list[int] | None = None) -> list[int] | None:
        """A uint32 for every layer, or an int32/uint32/bool array of n_layer of them."""
        key = f"{self.arch}.{name}"
        field = self.kv.get(key)
        if field is None:
            return default
        if field.type != _ARRAY:
            return [self.u32(name)] * n_layer
        if field.element_type not in (_UINT32, _INT32, _BOOL):
            self.fail(f"{key} is an {field.type_name}; llama.cpp reads a uint32 or an int32/uint32 array")
        if not isinstance(field.value, list) or len(field.value) != n_layer:
            self.fail(f"{key} has {int(len(field.value) if isinstance(field.value, list) else field.value)} "
                      f"elements; llama.cpp needs one per layer ({n_layer})")
        if min(field.value) < 0:
            self.fail(f"{key} holds {min(field.value)}; it must not be negative")
        return [int(v) for v in field.value]

    def string(self, name: str) -> str | None:
        key = f"{self.arch}.{name}"
        field = self.kv.get(key)
        if field is not None and not isinstance(field.value, str):
            self.fail(f"{key} is a {field.type_name}; llama.cpp reads it as a (short) string")
        return None if field is None else field.value


def _architecture(kv: dict, where: str) -> str:
    field = kv.get("general.architecture")
    if field is None:
        raise ModelFileError(f"{where} has no general.architecture key")
    if not isinstance(field.value, str) or not field.value:
        raise ModelFileError(f"{where}: general.architecture must be a non-empty string, not "
                             f"{field.value!r} ({field.type_name})")
    return field.value


def _finite_floats(kv: dict, arch: str, where: str) -> None:
    """NaN or infinite hyper-parameters (eps, rope bases, scales) make every
    logit NaN; a negative norm epsilon is a ggml assert (ops.cpp: eps >= 0)."""
    for key, field in kv.items():
        if not key.startswith(arch + "."):
            continue
        values = field.value if field.type == _ARRAY and isinstance(field.value, list) else [field.value]
        if (field.type in (_FLOAT32, _FLOAT64) or field.element_type in (_FLOAT32, _FLOAT64)) and \
                not all(math.isfinite(v) for v in values):
            raise ModelFileError(f"{where}: {key} is {field.value}; hyper-parameters must be finite numbers")
        if key.endswith(EPSILON_KEYS) and field.type in (_FLOAT32, _FLOAT64) and field.value < 0:
            raise ModelFileError(f"{where}: {key} is {field.value}; a norm epsilon must not be negative")


def hyperparameters(kv: dict, where: str) -> tuple[str, dict]:
    """(architecture, hyper-parameters) from the metadata, with llama.cpp's
    typing and the asserts of its load_hparams."""
    arch = _architecture(kv, where)
    k = _Keys(kv, arch, where)
    n_layer = k.u32("block_count")
    if n_layer is None:
        k.fail(f"there is no {arch}.block_count key")
    if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        k.fail(f"{arch}.block_count is {n_layer}; llama.cpp supports 1..{LLAMA_MAX_LAYERS} layers")
    _finite_floats(kv, arch, where)
    nextn = k.u32("nextn_predict_layers", 0)
    if nextn > n_layer:
        k.fail(f"{arch}.nextn_predict_layers is {nextn}, more than the {n_layer} layers")
    _check_experts(k, n_layer)
    rope_scaling = k.string("rope.scaling.type")
    if rope_scaling is not None and rope_scaling not in ROPE_SCALING_TYPES:
        k.fail(f"{arch}.rope.scaling.type is {rope_scaling!r}; llama.cpp knows {', '.join(ROPE_SCALING_TYPES)}")

    n_embd = k.u32("embedding_length", 0)
    n_head = k.per_layer("attention.head_count", n_layer, [0] * n_layer)
    n_head_kv = k.per_layer("attention.head_count_kv", n_layer, n_head)
    n_ff = k.per_layer("feed_forward_length", n_layer, [0] * n_layer)
    head_max = max(n_head)
    head_dim = n_embd // n_head[0] if n_head[0] else 0  # llama.cpp divides by layer 0's
    key_length = k.u32("attention.key_length", head_dim)
    value_length = k.u32("attention.value_length", head_dim)
    n_rot = k.u32("rope.dimension_count", key_length)
    hp = {
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_ff": max(n_ff),
        "n_head": head_max,
        "n_head_kv": max(n_head_kv),
        "key_length": key_length,
        "value_length": value_length,
        "n_ctx_train": k.u32("context_length", 0),
        "n_expert": k.u32("expert_count", 0),
        "n_expert_used": max(k.per_layer("expert_used_count", n_layer, [0])),
        "n_ff_exp": k.u32("expert_feed_forward_length", 0),
        "pooling_type": _pooling_type(kv, arch),
    }
    if arch in ATTENTION_ARCHS:
        _check_attention(k, hp, n_head, n_head_kv, n_rot)
    return arch, hp


def _pooling_type(kv: dict, arch: str) -> int | None:
    """The embedding pooling the GGUF names (llama_pooling_type: 0 none, 1 mean, 2 cls, 3 last, 4 rank), or
    None; read leniently: only serving embeddings uses it, and llama.cpp reads it for few architectures."""
    field = kv.get(f"{arch}.pooling_type")
    return field.value if field is not None and field.type == _UINT32 else None


def _check_experts(k: _Keys, n_layer: int) -> None:
    """llama_model_base::load_hparams' asserts on the mixture of experts."""
    a = k.arch
    n_expert = k.u32("expert_count", 0)
    used = max(k.per_layer("expert_used_count", n_layer, [0]))
    groups, group_used = k.u32("expert_group_count", 0), k.u32("expert_group_used_count", 0)
    if n_expert > LLAMA_MAX_EXPERTS:
        k.fail(f"{a}.expert_count is {n_expert}; llama.cpp supports at most {LLAMA_MAX_EXPERTS} experts")
    if used > n_expert:
        k.fail(f"{a}.expert_used_count is {used}, more than {a}.expert_count ({n_expert})")
    if n_expert and not used:
        k.fail(f"{a}.expert_used_count is 0 (or missing) but the model has {n_expert} experts")
    if n_expert and groups >= n_expert:
        k.fail(f"{a}.expert_group_count is {groups}; it must be under {a}.expert_count ({n_expert})")
    if n_expert and groups > 1 and (n_expert % groups or not 0 < group_used < groups):
        k.fail(f"{a}.expert_group_count {groups} must divide {a}.expert_count {n_expert}, and "
               f"{a}.expert_group_used_count ({group_used}) must be in 1..{groups - 1}")
    if not n_expert and groups:
        k.fail(f"{a}.expert_group_count is {groups} but the model has no experts")


def _check_attention(k: _Keys, hp: dict, n_head: list[int], n_head_kv: list[int], n_rot: int) -> None:
    """What these graphs assert, or ggml asserts while building them."""
    a = k.arch
    if not hp["n_embd"] or not hp["n_head"]:
        k.fail(f"{a}.embedding_length ({hp['n_embd']}) and {a}.attention.head_count ({hp['n_head']}) "
               "must both be positive")
    for il, (q, kv) in enumerate(zip(n_head, n_head_kv)):
        if not q or not kv or q % kv:
            k.fail(f"layer {il} has {q} query heads for {kv} key/value heads; "
                   "the query heads must be a positive multiple of the key/value heads")
    if not hp["key_length"] or not hp["value_length"]:
        k.fail(f"{a}.attention.key_length ({hp['key_length']}) and value_length ({hp['value_length']}) "
               "must be positive")
    if a in EQUAL_HEAD_ARCHS and not hp["key_length"] == hp["value_length"] == n_rot:
        k.fail(f"{a} needs equal key_length ({hp['key_length']}), value_length ({hp['value_length']}) "
               f"and rope.dimension_count ({n_rot})")


def check_tensors(tensors, where: str) -> None:
    """Tensor types llama.cpp's kernels abort on (found by tests/test_fuzz_gguf.py):
    weights of a type that is not a weight type, vectors (norms, biases:
    binary ops take F32 only) and expert routers in other than the float
    types llama.cpp's quantizer leaves them in."""
    for t in tensors:
        if t.qtype in NOT_WEIGHT_TYPES:
            raise ModelFileError(f"{where}: tensor {t.name} has type {t.qtype}, which ggml cannot use for weights")
        if len([d for d in t.shape if d != 1]) <= 1 and t.qtype != "F32":
            raise ModelFileError(f"{where}: tensor {t.name} is a vector of type {t.qtype}; "
                                 "llama.cpp needs F32 for vectors (norms, biases)")
        if t.name.endswith(ROUTER_TENSOR) and t.qtype not in FLOAT_TYPES:
            raise ModelFileError(f"{where}: tensor {t.name} (expert router) has type {t.qtype}; "
                                 f"llama.cpp needs one of {', '.join(sorted(FLOAT_TYPES))}")


def check_vocabulary(kv: dict, where: str) -> None:
    """A vocabulary llama.cpp can tokenize with: one (llama.cpp asserts on
    tokenizing without), and no string twice (an assert when it loads)."""
    model = kv.get(TOKENIZER_MODEL_KEY)
    if model is not None and model.value in NO_VOCABULARY:
        raise ModelFileError(f"{where}: {TOKENIZER_MODEL_KEY} is {model.value!r}: the model has no vocabulary, "
                             "and gguf-stream needs one to tokenize text")
    field = kv.get(VOCABULARY_KEY)
    duplicate = getattr(field.value, "duplicate", None) if field is not None else None
    if duplicate is not None:
        raise ModelFileError(f"{where}: the vocabulary holds {duplicate[:40]!r} twice; "
                             "llama.cpp needs every vocabulary string to be unique")
