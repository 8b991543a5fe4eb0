"""How well a layer's normed expert input predicts the routing of the layers after it.

    python tools/routing_ahead.py MODEL.gguf [--tokens 8] [--threads 2]

Stock llama.cpp on the CPU decodes a few random tokens, one at a time; an
eval callback keeps each layer's expert input (`ffn_norm-L`) and routed
experts (`ffn_moe_topk-L`). For every layer L and distance d = 1..4 the
router of layer L+d (its F32 `ffn_gate_inp`, top-k of the logits: softmax
routing; a selection bias, as glm4moe and deepseek2 have, is left out) is
applied to layer L's input, and the share of layer L+d's routed experts it
names is the hit rate. d = 0 (a layer's router on its own input) must give
1.0. This is the measure to take on a trained mixture-of-experts file before
building a prefetch of the next layer's experts: on gguf-stream's synthetic
files the hidden state is dominated by the token's embedding, and the hit
rate is 1.0 at every distance (BENCHMARKS.md, ninth session).
"""
import argparse
import ctypes
import sys
from pathlib import Path

if not __package__:  # run as a script: the checkout's gguf_stream
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf_stream  # noqa: E402,F401  (llama.cpp before numpy: the other order crashed on the GPU box)
import llama_cpp as lc  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from gguf_stream import llama_abi  # noqa: E402


class Tensor(ctypes.Structure):  # struct ggml_tensor (native/gs_abi.h)
    _fields_ = [("type", ctypes.c_int32), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int32), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def routers(path: str) -> dict[int, np.ndarray]:
    """Layer -> its router, (n_expert, n_embd) F32."""
    out = {}
    for t in GGUFReader(path).tensors:
        if t.name.endswith("ffn_gate_inp.weight"):
            w = np.asarray(t.data, dtype=np.float32)
            out[int(t.name.split(".")[1])] = w.reshape(int(t.shape[1]), int(t.shape[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    W = routers(args.model)
    if not W:
        raise SystemExit(f"{args.model}: no F32 ffn_gate_inp (not a mixture-of-experts file this tool reads)")
    kept: dict[str, np.ndarray] = {}

    def on_node(tp, ask, _user):
        t = ctypes.cast(tp, ctypes.POINTER(Tensor)).contents
        name = t.name.decode()
        want = name.startswith(("ffn_moe_topk-", "ffn_norm-"))
        if ask or not want:
            return want or not ask
        kind = ctypes.c_int32 if name.startswith("ffn_moe_topk-") else ctypes.c_float
        rows = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(kind)), shape=(t.ne[1], t.nb[1] // 4))
        kept[name] = rows[-1, :t.ne[0]].copy()  # the last token's row
        return True

    callback = lc.ggml_backend_sched_eval_callback(on_node)
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    no_gpu = llama_abi.no_gpu_devices(mp)  # every node computed (and read back) in host memory
    model = lc.llama_model_load_from_file(args.model.encode(), mp)
    del no_gpu  # (the list had to outlive the load)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 256, 64, 64
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.cb_eval, cp.cb_eval_user_data = callback, None
    ctx = lc.llama_init_from_model(model, cp)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))

    def decode(ids: list[int]) -> None:
        arr = (ctypes.c_int32 * len(ids))(*ids)
        if lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(ids))):
            raise SystemExit("llama_decode failed")

    decode([int(x) for x in np.random.default_rng(0).integers(1, min(n_vocab, 20000), 8)])
    hits: dict[int, list[float]] = {}
    for _ in range(args.tokens):
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        kept.clear()
        decode([int(np.argmax(logits))])
        for i in W:
            x = kept.get(f"ffn_norm-{i}")
            for d in range(5):
                ids = kept.get(f"ffn_moe_topk-{i + d}")
                if x is None or ids is None or i + d not in W:
                    continue
                picked = np.argsort(-(W[i + d] @ x))[:len(ids)]
                hits.setdefault(d, []).append(len(set(picked.tolist()) & set(ids.tolist())) / len(ids))
    n_used = len(next(v for k, v in kept.items() if k.startswith("ffn_moe_topk-")))
    print(f"hit rate by distance (chance {n_used / next(iter(W.values())).shape[0]:.3f}):",
          {d: round(float(np.mean(v)), 3) for d, v in sorted(hits.items())})
    lc.llama_free(ctx)
    lc.llama_model_free(model)


if __name__ == "__main__":
    main()
