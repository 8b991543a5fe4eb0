"""The only module that touches the compiled helper (``gguf_stream._native``).

Every non-zero return code becomes a NativeError naming the C call and the
helper's own message.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import EnvironmentMismatchError, NativeError

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise EnvironmentMismatchError(
        "the native helper gguf_stream._native is not built; reinstall with `pip install .` "
        "or build in place with `python -m gguf_stream._build_native`"
    ) from exc


def _check(call: str, rc: int) -> None:
    if rc != lib.GS_OK:
        raise NativeError(call, rc, ffi.string(lib.gs_last_error()).decode(errors="replace")
                          or ffi.string(lib.gs_strerror(rc)).decode())


def load_libraries(ggml_base: str, ggml: str, cudart: str | None) -> None:
    _check("gs_libs_load", lib.gs_libs_load(ggml_base.encode(), ggml.encode(),
                                            cudart.encode() if cudart else ffi.NULL))


def device_bufts(name: str) -> tuple[int, int]:
    """(buffer type, host buffer type or 0) of a ggml device, as addresses."""
    buft, host = ffi.new("void **"), ffi.new("void **")
    _check(f"gs_device_get_bufts({name})", lib.gs_device_get_bufts(name.encode(), buft, host))
    return int(ffi.cast("uintptr_t", buft[0])), int(ffi.cast("uintptr_t", host[0]))


def plain_cpu_buft() -> int:
    """The plain CPU buffer type under an address llama.cpp does not turn into CPU_REPACK."""
    buft = ffi.new("void **")
    _check("gs_cpu_get_plain_buft", lib.gs_cpu_get_plain_buft(buft))
    return int(ffi.cast("uintptr_t", buft[0]))


def cpu_extra_buft(name: str) -> int:
    """Address of the CPU backend's extra buffer type `name` ("AMX", "CPU_REPACK"),
    0 where this build or this CPU has none."""
    buft = ffi.new("void **")
    _check("gs_cpu_get_extra_buft", lib.gs_cpu_get_extra_buft(name.encode(), buft))
    return int(ffi.cast("uintptr_t", buft[0]))


def disk_buft() -> int:
    """The buffer type disk-tier tensors load into: plain CPU memory whose pages an armed load hands back."""
    buft = ffi.new("void **")
    _check("gs_disk_get_buft", lib.gs_disk_get_buft(buft))
    return int(ffi.cast("uintptr_t", buft[0]))


def disk_load_arm(next_cb: int, next_user: int) -> None:
    """Before a load with a disk tier (DISK_PROGRESS_CB as its progress callback, chaining next_cb)."""
    _check("gs_disk_load_arm", lib.gs_disk_load_arm(ffi.cast("void *", next_cb), ffi.cast("void *", next_user)))


def disk_load_disarm() -> int:
    """After that load: the bytes of disk-tier buffers it handed back."""
    out = ffi.new("uint64_t *")
    _check("gs_disk_load_disarm", lib.gs_disk_load_disarm(out))
    return int(out[0])


def has_device(name: str) -> bool:
    buft = ffi.new("void **")
    return lib.gs_device_get_bufts(name.encode(), buft, ffi.NULL) == lib.GS_OK


def device_memory(name: str) -> tuple[int, int]:
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    _check(f"gs_device_get_memory({name})", lib.gs_device_get_memory(name.encode(), free, total))
    return int(free[0]), int(total[0])


def supports_flash_attn(name: str, head_dim_k: int, head_dim_v: int, n_head: int, n_head_kv: int,
                        type_k: int, type_v: int) -> bool:
    """Whether device `name` computes flash attention for this shape and
    these KV cache types (ggml ids): -fa auto's question, asked as llama.cpp
    asks it (the device's supports_op on the op)."""
    out = ffi.new("int *")
    _check(f"gs_device_supports_flash_attn({name})",
           lib.gs_device_supports_flash_attn(name.encode(), head_dim_k, head_dim_v, n_head, n_head_kv,
                                             type_k, type_v, out))
    return bool(out[0])


def tensor_buffer(tensor: int) -> tuple[str, int]:
    name, size = ffi.new("const char **"), ffi.new("size_t *")
    _check("gs_tensor_get_buffer", lib.gs_tensor_get_buffer(ffi.cast("void *", tensor), name, size))
    return ffi.string(name[0]).decode(), int(size[0])


@dataclass(frozen=True)
class Weight:
    tensor: int  # address of the ggml_tensor
    name: str
    layer: int | None
    nbytes: int
    viewed: bool
    cpu_layouts: int = 0  # CPU_AMX | CPU_REPACK: the CPU's repacked layouts every use of it allows


@dataclass(frozen=True)
class GraphCheck:
    n_lout: int
    max_lout: int
    violations: int
    first_violation: str


@dataclass(frozen=True)
class Counters:
    """The engine's counters (reset by Engine.reset_counters) and its sizes
    (which a reset keeps), as one record: gs_counters and gs_sizes."""
    evaluations: int
    adopted_ready: int
    adopted_waited: int
    sync_fallbacks: int
    uploads: int
    bytes_uploaded: int
    boundaries: int
    wait_seconds: float
    slot_bytes: int
    ring_bytes: int
    n_streamed: int
    n_slots: int
    repacked_bytes: int
    host_kv_bytes: int
    kv_moved_bytes: int
    gen_resident: int
    gen_resident_loads: int
    gen_resident_evictions: int
    hookless_decodes: int
    compute_buffer_bytes: int
    generate_extent: int
    disk_reads: int = 0
    disk_bytes: int = 0
    disk_read_seconds: float = 0.0
    disk_wait_seconds: float = 0.0
    disk_readaheads: int = 0
    layers_repacked: int = 0
    split_layers: int = 0  # split-expert layers run (per ubatch), their uploaded experts and CPU (row, expert) pairs
    split_uploaded: int = 0
    split_cpu: int = 0
    split_prompt_layers: int = 0  # ... of them in prompt ubatches (prompt_cpu_experts)
    split_early_releases: int = 0  # ... whose slot freed at ffn_moe_out, before the wait for the CPU's part
    split_upload_seconds: float = 0.0
    split_cpu_wait_seconds: float = 0.0
    split_region_bytes: int = 0
    split_n_upload: int = 0  # experts uploaded per split layer now; -1 while the engine times them (GS_SPLIT_AUTO)
    disk_tier_bytes: int = 0
    released_host_bytes: int = 0
    staging_bytes: int = 0  # the disk tier's staging buffers (pinned on CUDA)
    disk_direct: int = 0  # 1: the disk tier reads with O_DIRECT
    disk_readers: int = 0  # the staged reader's threads (reads in flight at once), 0 without it

    @property
    def adoptions(self) -> int:
        return self.adopted_ready + self.adopted_waited + self.sync_fallbacks

    @property
    def disk_overlap(self) -> float | None:
        """Share of the disk tier's read time hidden behind compute (1.0:
        no adoption waited for a read); None before any read."""
        if not self.disk_read_seconds:
            return None
        return max(0.0, 1.0 - self.disk_wait_seconds / self.disk_read_seconds)


def _struct_fields(ctype: str) -> tuple[str, ...]:
    return tuple(name for name, _ in ffi.typeof(ctype).fields)


def _fields(cdata, names) -> dict:
    return {f: getattr(cdata, f) for f in names}


_COUNTED, _SIZES = _struct_fields("gs_counters"), _struct_fields("gs_sizes")
assert set(_COUNTED) | set(_SIZES) == set(Counters.__dataclass_fields__), "Counters out of step with gguf_stream.h"


@dataclass(frozen=True)
class Timeline:
    """Sums over the decodes bracketed with Engine.timeline_mark (gs_timeline in gguf_stream.h)."""
    decodes: int
    cpu_segments: int
    gpu_segments: int
    wall_s: float
    pre_s: float
    cpu_s: float
    gpu_s: float
    between_s: float


E_IO = lib.GS_E_IO  # a disk-tier read failed or the model file changed
PHASE_PROMPT = lib.GS_PHASE_PROMPT
SPLIT_AUTO = lib.GS_SPLIT_AUTO  # set_split_experts: the engine times how many experts to upload
PHASE_GENERATE = lib.GS_PHASE_GENERATE
CPU_AMX, CPU_REPACK = lib.GS_CPU_AMX, lib.GS_CPU_REPACK  # Weight.cpu_layouts bits

# Addresses of the two hooks, for llama_context_params.cb_eval.
DISCOVER_CB = int(ffi.cast("uintptr_t", ffi.addressof(lib, "gs_engine_discover_cb")))
EVAL_CB = int(ffi.cast("uintptr_t", ffi.addressof(lib, "gs_engine_eval_cb")))
# ... and of the disk tier's load progress callback, for llama_model_params.progress_callback.
DISK_PROGRESS_CB = int(ffi.cast("uintptr_t", ffi.addressof(lib, "gs_disk_load_progress_cb")))


class Engine:
    """The slot ring of one model. Create, discover, add tensors, start;
    destroy only after the llama context and model are freed."""

    def __init__(self, *, n_layer: int, n_slots: int, ring_buft: int, use_cuda: bool,
                 cuda_device: int = 0, prefetch: bool = True, host_copy_delay_us: int = 0,
                 amx_buft: int = 0, repack_buft: int = 0, host_kv_buft: int = 0, disk_lookahead: int = 0,
                 staging_bytes: int = 0, host_staging: bool = False, disk_direct: bool = False,
                 disk_readers: int = 0):
        cfg = ffi.new("gs_engine_config *", {
            "n_layer": n_layer, "n_slots": n_slots, "ring_buft": ffi.cast("void *", ring_buft),
            "use_cuda": int(use_cuda), "cuda_device": cuda_device, "prefetch": int(prefetch),
            "host_copy_delay_us": host_copy_delay_us, "amx_buft": ffi.cast("void *", amx_buft),
            "repack_buft": ffi.cast("void *", repack_buft),
            "host_kv_buft": ffi.cast("void *", host_kv_buft), "disk_lookahead": disk_lookahead,
            "staging_bytes": staging_bytes, "host_staging": int(host_staging), "disk_direct": int(disk_direct),
            "disk_readers": disk_readers,
        })
        out = ffi.new("gs_engine **")
        _check("gs_engine_create", lib.gs_engine_create(cfg, out))
        self._e = out[0]

    @property
    def _h(self):
        """The C handle; a clean error instead of a NULL dereference once destroyed."""
        if self._e is None:
            raise NativeError("Engine", lib.GS_E_INVALID, "the engine was destroyed (its model was closed)")
        return self._e

    @property
    def alive(self) -> bool:
        return self._e is not None

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self._h))

    def discover_reset(self) -> None:
        _check("gs_engine_reset_discovery", lib.gs_engine_reset_discovery(self._h))

    def weights(self) -> list[Weight]:
        out, w, n = [], ffi.new("gs_weight *"), ffi.new("int *")
        _check("gs_engine_count_weights", lib.gs_engine_count_weights(self._h, n))
        for i in range(n[0]):
            _check("gs_engine_get_weight", lib.gs_engine_get_weight(self._h, i, w))
            out.append(Weight(int(ffi.cast("uintptr_t", w.tensor)), ffi.string(w.name).decode(),
                              None if w.layer < 0 else w.layer, int(w.nbytes), bool(w.viewed),
                              int(w.cpu_layouts)))
        return out

    def graph_check(self) -> GraphCheck:
        c = ffi.new("gs_graph_check *")
        _check("gs_engine_get_graph_check", lib.gs_engine_get_graph_check(self._h, c))
        return GraphCheck(c.n_lout, c.max_lout, c.violations, ffi.string(c.first_violation).decode())

    def add_tensor(self, layer: int, tensor: int) -> None:
        _check("gs_engine_add_tensor", lib.gs_engine_add_tensor(self._h, layer, ffi.cast("void *", tensor)))

    def set_file(self, path: str, size: int, mtime_ns: int) -> None:
        """The model file the disk tier reads (size and mtime as planned: a different file fails)."""
        _check("gs_engine_set_file", lib.gs_engine_set_file(self._h, str(path).encode(), size, mtime_ns))

    def add_file_tensor(self, layer: int, tensor: int, file_offset: int) -> None:
        """A streamed tensor whose uploads read the model file at file_offset (the disk tier)."""
        _check("gs_engine_add_file_tensor",
               lib.gs_engine_add_file_tensor(self._h, layer, ffi.cast("void *", tensor), file_offset))

    def start(self) -> None:
        _check("gs_engine_start", lib.gs_engine_start(self._h))

    def set_cpu_layers(self, layers) -> None:
        arr = ffi.new("int[]", list(layers) or [0])
        _check("gs_engine_set_cpu_layers", lib.gs_engine_set_cpu_layers(self._h, arr, len(layers)))

    def set_split_experts(self, layers, n_upload: int, n_used: int, n_threads: int, oai: bool = False,
                          into_sum: bool = False) -> None:
        """Mixture-of-experts layers split while generating: n_upload of a
        ubatch's routed experts per layer uploaded, the rest computed by
        n_threads CPU threads at the same time (gs_engine_set_split_experts);
        oai: the experts' activation is gpt-oss's clamped SwiGLU; into_sum:
        the CPU's part joins the experts' sum (one more boundary per layer)."""
        arr = ffi.new("int[]", list(layers) or [0])
        act = lib.GS_SPLIT_ACT_OAI if oai else lib.GS_SPLIT_ACT_SWIGLU
        _check("gs_engine_set_split_experts",
               lib.gs_engine_set_split_experts(self._h, arr, len(layers), n_upload, n_used, n_threads, act,
                                               int(into_sum)))

    def set_prompt_cpu_experts(self, n_cpu: int) -> None:
        """In prompt ubatches the split layers' last n_cpu experts are
        computed by the CPU, not uploaded (gs_engine_set_prompt_cpu_experts)."""
        _check("gs_engine_set_prompt_cpu_experts", lib.gs_engine_set_prompt_cpu_experts(self._h, n_cpu))

    def graphs_dropped(self) -> None:
        """The attached context dropped its graphs (llama_abi.drop_graphs):
        set_cpu_layers may change CPU layers under it until its next decode."""
        _check("gs_engine_graphs_dropped", lib.gs_engine_graphs_dropped(self._h))

    def keep_repacks(self, keep: bool) -> None:
        """keep: layers leaving the CPU keep their repacked copies (reused if
        they return: the split search); False frees those of non-CPU layers."""
        _check("gs_engine_keep_repacks", lib.gs_engine_keep_repacks(self._h, int(keep)))

    def set_generate_resident(self, layers, reserve_bytes: int = 0, own: bool = False) -> None:
        """Streamed layers kept resident while generating (see gguf_stream.h):
        in the engine's own buffer (own) or in the attached context's compute
        buffer beyond reserve_bytes; () clears."""
        arr = ffi.new("int[]", list(layers) or [0])
        _check("gs_engine_set_generate_resident",
               lib.gs_engine_set_generate_resident(self._h, arr, len(layers), reserve_bytes, int(own)))

    def set_phase(self, phase: int, hold_kv: bool = False) -> None:
        """Between decodes. hold_kv: the coming (generate-phase) decode may
        reuse the last graph, so the CPU layers' KV caches stay where it saw them."""
        _check("gs_engine_set_phase", lib.gs_engine_set_phase(self._h, phase, int(hold_kv)))

    def route_hook(self, sched: int) -> bool:
        """After set_phase, before the decode: set the scheduler's hook for it
        (off where it would do nothing; gs_engine_route_hook). True: hooked."""
        hooked = ffi.new("int *")
        _check("gs_engine_route_hook", lib.gs_engine_route_hook(self._h, ffi.cast("void *", sched), hooked))
        return bool(hooked[0])

    def kv_attach(self, reuse_min_batch: int = 0) -> None:
        """Right after creating a context: its KV caches are recorded during
        its first decode, so CPU layers' ones can live in host memory while
        generating. reuse_min_batch > 0: the context reuses graphs, and
        ubatches of that many tokens or more must run in the prompt phase,
        smaller ones in the generate phase (see gs_engine_kv_attach)."""
        _check("gs_engine_attach_kv", lib.gs_engine_attach_kv(self._h, reuse_min_batch))

    def kv_detach(self) -> None:
        """Before freeing that context: every KV cache goes back to llama.cpp's buffers."""
        _check("gs_engine_detach_kv", lib.gs_engine_detach_kv(self._h))

    def kv_cleared(self) -> None:
        """After llama_memory_clear: the next moves need not copy the (unused) cache bytes."""
        _check("gs_engine_mark_kv_cleared", lib.gs_engine_mark_kv_cleared(self._h))

    def bind_layer_devices(self, cells: list[int] | None) -> None:
        """Addresses of llama.cpp's per-layer device pointers (llama_abi.layer_device_cells):
        CPU layers then count as CPU layers while generating. None forgets them
        without writing (before the model is freed)."""
        if cells is None:
            _check("gs_engine_bind_layer_devices", lib.gs_engine_bind_layer_devices(self._h, ffi.NULL, 0))
            return
        arr = ffi.new("void *[]", [ffi.cast("void *", c) for c in cells])
        _check("gs_engine_bind_layer_devices", lib.gs_engine_bind_layer_devices(self._h, arr, len(cells)))

    def set_timing(self, on: bool) -> None:
        _check("gs_engine_set_timing", lib.gs_engine_set_timing(self._h, int(on)))

    def layer_times(self, n_layer: int) -> list[tuple[float, int]]:
        """(seconds, count) accumulated per layer while timing was on."""
        sec, cnt, out = ffi.new("double *"), ffi.new("uint64_t *"), []
        for i in range(n_layer):
            _check("gs_engine_get_layer_time", lib.gs_engine_get_layer_time(self._h, i, sec, cnt))
            out.append((float(sec[0]), int(cnt[0])))
        return out

    def timeline(self, on: bool) -> None:
        """Probe: (re)start or stop summing where decodes' time goes (no boundaries added)."""
        _check("gs_engine_set_timeline", lib.gs_engine_set_timeline(self._h, int(on)))

    def timeline_mark(self, begin: bool) -> None:
        """Bracket each decode: True right before llama_decode, False right after."""
        _check("gs_engine_mark_timeline", lib.gs_engine_mark_timeline(self._h, int(begin)))

    def timeline_get(self) -> Timeline:
        t = ffi.new("gs_timeline *")
        _check("gs_engine_get_timeline", lib.gs_engine_get_timeline(self._h, t))
        return Timeline(**_fields(t, Timeline.__dataclass_fields__))

    def measure_upload(self, layer: int, n: int = 3) -> float:
        """Fastest of n synchronous uploads of a layer, in seconds."""
        best = ffi.new("double *")
        _check("gs_engine_measure_upload", lib.gs_engine_measure_upload(self._h, layer, n, best))
        return float(best[0])

    def check_status(self, during: str) -> None:
        msg = ffi.new("char[512]")
        rc = lib.gs_engine_get_status(self._h, msg, 512)
        if rc != lib.GS_OK:
            raise NativeError(f"streaming hook during {during}", rc, ffi.string(msg).decode(errors="replace"))

    def counters(self) -> Counters:
        c, s = ffi.new("gs_counters *"), ffi.new("gs_sizes *")
        _check("gs_engine_get_counters", lib.gs_engine_get_counters(self._h, c))
        _check("gs_engine_get_sizes", lib.gs_engine_get_sizes(self._h, s))
        return Counters(**_fields(c, _COUNTED), **_fields(s, _SIZES))

    def reset_counters(self) -> None:
        _check("gs_engine_reset_counters", lib.gs_engine_reset_counters(self._h))

    def debug_swap_sources(self, layer_a: int, layer_b: int) -> None:
        _check("gs_engine_swap_sources", lib.gs_engine_swap_sources(self._h, layer_a, layer_b))

    def destroy(self) -> None:
        if self._e is not None:
            lib.gs_engine_destroy(self._e)
            self._e = None


class Ring:
    """The slot ring alone (gs_ring), for its tests: no engine, no llama.cpp.
    Its copies go to `ops`, a Python copy engine with issue(slot, layer),
    done(slot) -> bool, wait(slot), drain() and optionally point(layer, slot);
    an exception there fails the ring call with a NativeError from it."""

    def __init__(self, *, n_layer: int, n_slots: int, ops, prefetch: bool = True, layer_bytes=None):
        self._error = None

        def call(fn, result=lambda r: 0, failed=lib.GS_E_INVALID):
            def op(_ctx, *args):
                try:
                    return result(fn(*args))
                except Exception as exc:  # reported by the ring call that made it (see _check)
                    self._error = self._error or exc
                    return failed
            return op

        point = getattr(ops, "point", None)
        self._callbacks = [  # kept alive as long as the ring
            ffi.callback("int(void *, int, int)", call(ops.issue)),
            ffi.callback("int(void *, int)", call(ops.done, lambda done: int(bool(done)))),
            ffi.callback("int(void *, int)", call(ops.wait)),
            ffi.callback("int(void *)", call(ops.drain)),
            ffi.callback("void(void *, int, int)", call(point, lambda r: None, None)) if point else ffi.NULL,
        ]
        self._counters = ffi.new("gs_counters *")
        self._bytes = ffi.new("uint64_t[]", list(layer_bytes) if layer_bytes is not None else [0] * n_layer)
        cfg = ffi.new("gs_ring_config *", {"n_layer": n_layer, "n_slots": n_slots, "prefetch": int(prefetch),
                                           "layer_bytes": self._bytes, "counters": self._counters})
        cfg.ops.issue, cfg.ops.done, cfg.ops.wait, cfg.ops.drain, cfg.ops.point = self._callbacks
        out = ffi.new("gs_ring **")
        _check("gs_ring_create", lib.gs_ring_create(cfg, out))
        self._r = out[0]
        self.n_slots = n_slots

    def _check(self, call: str, rc: int) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise NativeError(call, rc, f"a copy operation failed: {error!r}") from error
        _check(call, rc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    def destroy(self) -> None:
        if self._r is not None:
            lib.gs_ring_destroy(self._r)
            self._r = None

    def set_order(self, phase: int, layers) -> None:
        arr = ffi.new("int[]", list(layers) or [0])
        self._check("gs_ring_set_order", lib.gs_ring_set_order(self._r, phase, arr, len(layers)))

    def position(self, phase: int, layer: int) -> int:
        pos = ffi.new("int *")
        self._check("gs_ring_get_position", lib.gs_ring_get_position(self._r, phase, layer, pos))
        return pos[0]

    def adopt(self, phase: int, layer: int) -> None:
        self._check("gs_ring_adopt", lib.gs_ring_adopt(self._r, phase, layer))

    def release(self, phase: int, layer: int) -> None:
        self._check("gs_ring_release", lib.gs_ring_release(self._r, phase, layer))

    def landed(self, layer: int) -> bool:
        out = ffi.new("int *")
        self._check("gs_ring_landed", lib.gs_ring_landed(self._r, layer, out))
        return bool(out[0])

    def keep_first(self, phase: int) -> None:
        self._check("gs_ring_keep_first", lib.gs_ring_keep_first(self._r, phase))

    def prefetch_first(self, phase: int) -> None:
        self._check("gs_ring_prefetch_first", lib.gs_ring_prefetch_first(self._r, phase))

    def time_upload(self, layer: int, n: int) -> float:
        best = ffi.new("double *")
        self._check("gs_ring_time_upload", lib.gs_ring_time_upload(self._r, layer, n, best))
        return float(best[0])

    def discard(self) -> None:
        self._check("gs_ring_discard", lib.gs_ring_discard(self._r))

    def slots(self) -> list[tuple[int, int]]:
        """(layer or -1, SLOT_* state) of each slot."""
        layer, state, out = ffi.new("int *"), ffi.new("int *"), []
        for s in range(self.n_slots):
            _check("gs_ring_get_slot", lib.gs_ring_get_slot(self._r, s, layer, state))
            out.append((layer[0], state[0]))
        return out

    def adopted(self, layer: int) -> int:
        """The slot layer was adopted into for the current evaluation, -1 if none."""
        slot = ffi.new("int *")
        self._check("gs_ring_get_adopted", lib.gs_ring_get_adopted(self._r, layer, slot))
        return slot[0]

    def counters(self) -> dict:
        """What the ring counted (gs_counters' ring fields; the others stay 0)."""
        return _fields(self._counters, _COUNTED)


SLOT_EMPTY, SLOT_LOADING, SLOT_READY, SLOT_IN_USE = (lib.GS_SLOT_EMPTY, lib.GS_SLOT_LOADING,
                                                     lib.GS_SLOT_READY, lib.GS_SLOT_IN_USE)
