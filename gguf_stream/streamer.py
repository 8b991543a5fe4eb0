"""What streaming adds around one llama.cpp model, in load order.

    s = Streamer(path, config)             # read GGUF, pick device, plan, create the slot ring
    s.patch_model_params(params)           # all layers "GPU", streamed ones in pinned host memory
    model = llama_model_load_from_file(...)
    s.attach(model)                        # discover weights, re-home streamed layers, prefetch
    s.patch_context_params(params)         # the scheduler hook
    ctx = llama_init_from_model(...)
    ... llama_decode(...); s.check("llama_decode")
    (free ctx, free model) ; s.close()     # slots last: streamed tensors point into them

Shared by StreamedModel (our own API) and StreamedLlama (llama_cpp.Llama).
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import llama_abi, native
from .errors import BudgetError, DecodeError, EnvironmentMismatchError, UnsupportedModelError
from .gguf_file import ModelFile, read_model
from .perfmodel import Rates, best_split, generate_splits
from .planner import (Plan, format_size, generate_graph_bytes, generate_resident_count, interleaved_layers, make_plan,
                      parse_size, with_generate_placement)

LOAD_MODE_NONE = 0  # with mmap, overrides to pinned host memory are silently dropped
DISCOVERY_TOKENS = 2  # < 32, so no op-offload copy stands in for a weight
DISCOVERY_BATCH = 16
CALIBRATION_BATCH = 8
# Batches below this size run host-resident weights on the CPU (ggml's scheduler).
OFFLOAD_MIN_BATCH = int(os.environ.get("GGML_OP_OFFLOAD_MIN_BATCH", "32"))
RATES_VERSION = "4"  # bump when what _measure_rates measures changes
CALIBRATION_TOKENS = 10  # single-token decodes timed per layer (the first is a warm-up)
# CPU layers during calibration: a sample, so that at most this much is
# repacked for it (host memory, load time); the others stream meanwhile, as
# they will while generating (the CPU then shares host memory with the DMA).
CALIBRATION_CPU_BYTES = 1 << 30
CALIBRATION_CPU_LAYERS = 8
# The model's best split is then checked by timing: its rates come from
# separate, layer-by-layer measurements, and the two paths slow each other
# down in ways they do not capture (shared host memory). Measured: the
# fastest split had 1-3 more CPU layers than the model's pick, 3-15% faster.
# From the pick, the search moves one CPU layer at a time while that is faster.
SPLIT_TRIAL_TOKENS = 12  # timed single-token decodes per split (after 2 warm-ups), median taken


def cache_dir() -> Path:
    return Path(os.environ.get("GGUF_STREAM_CACHE", Path.home() / ".cache" / "gguf-stream"))


def load_native(want_cuda: bool) -> bool:
    """Load the helper's libraries; True if a CUDA device will be used."""
    ggml_base, ggml = llama_abi.ggml_paths()
    native.load_libraries(ggml_base, ggml, None)
    if not want_cuda or not native.has_device("CUDA0"):
        return False
    cudart = llama_abi.cudart_path()
    if cudart is None:
        raise EnvironmentMismatchError("libggml-cuda is loaded but no libcudart.so is mapped in the process")
    native.load_libraries(ggml_base, ggml, cudart)
    return True


def cuda_available() -> bool:
    return load_native(want_cuda=True)


def no_cuda_error() -> EnvironmentMismatchError:
    return EnvironmentMismatchError(
        "a GPU run was asked for but this llama-cpp-python has no CUDA device; reinstall it with "
        'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36, '
        "or run on the CPU (device='host')")


def validate_graph(check: native.GraphCheck, mf: ModelFile) -> None:
    """Streaming needs every layer between its l_out boundaries, in order."""
    if check.n_lout == 0:
        raise UnsupportedModelError(
            f"architecture {mf.arch}: its graph has no l_out-<i> layer boundaries, so gguf-stream cannot "
            "stream its layers; give a budget that keeps every layer resident")
    if check.n_lout != mf.n_layer or check.violations:
        raise UnsupportedModelError(
            f"architecture {mf.arch}: layers are not evaluated one after another "
            f"({check.n_lout}/{mf.n_layer} l_out boundaries; {check.first_violation or 'ok'}); "
            "gguf-stream cannot stream it")


@contextmanager
def no_graph_reuse():
    """Create a llama.cpp context inside this and it rebuilds its graph at
    every decode (llama.cpp reads the switch when it creates the context)."""
    key, saved = "LLAMA_GRAPH_REUSE_DISABLE", os.environ.get("LLAMA_GRAPH_REUSE_DISABLE")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


class Streamer:
    def __init__(self, path: str | os.PathLike, config):
        self.path = str(path)
        self.config = config
        self.lc = llama_abi.llama()
        self.model_file = read_model(self.path)
        self.cuda = load_native(config.device != "host")
        if config.device == "cuda" and not self.cuda:
            raise no_cuda_error()
        self.plan: Plan = self._make_plan()
        self.engine: native.Engine | None = None
        self.pinned_bytes = 0
        self.rates: Rates | None = None
        self.predicted_token_seconds: float | None = None
        self.split_trials: dict[int, float] | None = None  # CPU-layer count -> measured seconds per token
        self._gr_reserve = 0  # compute buffer bytes left to generate-phase graphs
        self.layer_devices_bound = False
        self.reuses_graphs = False  # the attached context may reuse graphs (see creating_context)
        self._last_ubatch = 0  # tokens in the attached context's last graph (0: none yet)
        self._keep = []
        if self.plan.streamed:
            device = "CUDA0" if self.cuda else "CPU"
            ring_buft, host_buft = native.device_bufts(device)
            # Streamed layers load into pinned host memory (CUDA) or plain CPU
            # memory (host mode); that copy is the upload source, the only one.
            self._source_buft = host_buft if self.cuda else native.plain_cpu_buft()
            if not self._source_buft:
                raise EnvironmentMismatchError(f"device {device} has no host buffer type for pinned memory")
            self.engine = native.Engine(n_layer=self.model_file.n_layer, n_slots=self.plan.n_slots,
                                        ring_buft=ring_buft, use_cuda=self.cuda, prefetch=config.prefetch,
                                        host_copy_delay_us=config.host_copy_delay_us,
                                        # CPU layers get llama.cpp's repacked layout, as stock's do
                                        repack_buft=native.cpu_repack_buft() if config.repack else 0,
                                        host_kv_buft=(native.device_bufts("CPU")[0]
                                                      if config.cpu_layer_host_kv else 0))

    def _make_plan(self) -> Plan:
        c = self.config
        if c.vram_budget is not None and self.cuda:
            total = native.device_memory("CUDA0")[1]
            if parse_size(c.vram_budget) > total:
                raise BudgetError(f"VRAM budget {format_size(parse_size(c.vram_budget))} exceeds the device's "
                                  f"{format_size(total)}; give at most that")
        if c.vram_budget is None and c.n_streamed is None and c.streamed_layers is None:
            what = {"n_streamed": 0}
        else:
            what = {"vram_budget": c.vram_budget, "n_streamed": c.n_streamed, "streamed_layers": c.streamed_layers}
        return make_plan(self.model_file, n_ctx=c.n_ctx, n_ubatch=c.n_ubatch, flash_attn=c.flash_attn,
                         n_slots=c.n_slots, max_slots=c.max_slots, **what)

    # -- model --
    def patch_model_params(self, params) -> None:
        """Every layer counts as a GPU layer (so every KV cache lives on the
        GPU); streamed layers are overridden into host memory."""
        stock = self.plan.stock_gpu_layers
        params.n_gpu_layers = (-1 if stock is None else stock) if self.cuda else 0
        params.load_mode = LOAD_MODE_NONE
        params.use_extra_bufts = self.config.repack
        if self.engine is not None:
            rules = llama_abi.buft_overrides([(llama_abi.layer_pattern(self.plan.streamed), self._source_buft)])
            self._keep.append(rules)
            params.tensor_buft_overrides = ctypes.addressof(rules)

    def attach(self, model) -> None:
        """After loading: find the streamed weights, re-home them into the ring."""
        if self.engine is None:
            return
        for w in self._discover(model):
            if w.layer not in self.plan.streamed:
                continue
            if self.cuda:
                buf_name, _ = native.tensor_buffer(w.tensor)
                if buf_name != "CUDA_Host":
                    raise EnvironmentMismatchError(
                        f"{w.name} landed in a {buf_name} buffer instead of pinned CUDA_Host memory "
                        "(cudaMallocHost failed?); free host memory or stream fewer layers")
                self.pinned_bytes += w.nbytes
            self.engine.add_tensor(w.layer, w.tensor)
        self.engine.start()
        self._bind_layer_devices(model)
        self._choose_generate_resident()
        self.choose_generate_split(model)

    def _bind_layer_devices(self, model) -> None:
        """Let the engine make CPU layers CPU layers for llama.cpp while
        generating (where this build's model layout is the one we know)."""
        if not self.config.cpu_layer_device:
            return
        cells = llama_abi.layer_device_cells(model, self.model_file.n_layer)
        if cells is None:
            warnings.warn("gguf-stream: llama.cpp's per-layer devices are not where llama-cpp-python "
                          f"{llama_abi.REQUIRED_VERSION} keeps them; CPU layers keep their norms on the GPU "
                          "(slower generation, same results)", RuntimeWarning, stacklevel=3)
            return
        self.engine.bind_layer_devices(cells)
        self.layer_devices_bound = True

    def _discover(self, model) -> list[native.Weight]:
        """Weight tensors through a throwaway context; checks that the graph
        keeps each layer between its l_out boundaries."""
        lc, e, mf = self.lc, self.engine, self.model_file
        e.discover_reset()
        p = self._small_context_params(DISCOVERY_BATCH)
        cb = lc.ggml_backend_sched_eval_callback(native.DISCOVER_CB)
        p.cb_eval, p.cb_eval_user_data = cb, e.address
        ctx = lc.llama_init_from_model(model, p)
        if not ctx:
            raise BudgetError("llama.cpp could not create a small discovery context (out of memory?)")
        try:
            bos = self._bos(model)
            arr = (lc.llama_token * DISCOVERY_TOKENS)(*([bos] * DISCOVERY_TOKENS))
            rc = lc.llama_decode(ctx, lc.llama_batch_get_one(arr, DISCOVERY_TOKENS))
        finally:
            lc.llama_free(ctx)
        e.check_status("discovery")
        if rc != 0:
            raise DecodeError(f"discovery decode failed with llama_decode = {rc}")
        validate_graph(e.graph_check(), mf)
        weights = e.weights()
        for w in weights:  # our view of ggml_tensor must agree with the file
            info = mf.tensor(w.name)
            if info is None or info.nbytes != w.nbytes:
                raise EnvironmentMismatchError(
                    f"tensor {w.name!r} ({w.nbytes} bytes) does not match the GGUF file: the ggml ABI differs "
                    f"from llama-cpp-python {llama_abi.REQUIRED_VERSION}'s")
            if w.viewed and w.layer in self.plan.streamed:
                raise UnsupportedModelError(f"architecture {mf.arch} uses weight {w.name} through a view; "
                                            "streaming it is not supported")
        return weights

    # -- generate phase --
    def _choose_generate_resident(self) -> None:
        """Streamed layers that stay resident while generating, in the
        compute buffer llama.cpp sizes for a prompt-sized ubatch (a generated
        token's graph leaves most of it idle): as many as the estimate says
        fit, spread through the overflow (CUDA; layer numbers anywhere)."""
        choice = self.config.generate_resident
        if self.engine is None or choice == "none" or (choice == "auto" and not self.cuda):
            return
        c, mf = self.config, self.model_file
        self._gr_reserve = generate_graph_bytes(mf, c.n_ctx, OFFLOAD_MIN_BATCH, c.flash_attn)
        if choice != "auto":
            layers = tuple(choice)
        else:
            cpu = () if isinstance(c.generate_cpu_layers, str) else set(c.generate_cpu_layers)
            candidates = [i for i in self.plan.streamed if i not in cpu]
            n = min(len(candidates), generate_resident_count(mf, self.plan, c.n_ubatch, self._gr_reserve))
            layers = tuple(candidates[j] for j in interleaved_layers(len(candidates), n))
        self.engine.set_generate_resident(layers, self._gr_reserve)
        self.plan = with_generate_placement(self.plan, (), layers)

    def choose_generate_split(self, model) -> None:
        """Decide which overflow layers the CPU computes while generating:
        the model's best split from rates measured on this machine, checked
        by timing it against its neighbours (both cached per machine, model
        and overflow)."""
        if self.engine is None:
            return
        choice, cpu = self.config.generate_cpu_layers, ()
        if choice == "auto" and self.cuda and self.plan.generate_overflow:
            rates = self._cached_rates() or self._measure_rates(model)
            splits = generate_splits(self.plan.generate_overflow, self.model_file.layer_bytes, rates)
            trials = self._cached_split_trials()
            if trials is None:
                trials = self._time_splits(model, splits, best_split(splits))
            n_cpu = min(trials, key=lambda n: (trials[n], -n))
            cpu, self.predicted_token_seconds = splits[n_cpu]
            self.rates, self.split_trials = rates, trials
        elif not isinstance(choice, str):
            cpu = tuple(choice)
        if cpu:
            self.engine.set_cpu_layers(cpu)
        self.plan = with_generate_placement(self.plan, cpu, self.plan.generate_resident)

    def _threads(self) -> int:
        from .runtime import physical_cores

        return self.config.n_threads or physical_cores()

    def _cache_key(self) -> str:
        st = os.stat(self.path)
        _, total = native.device_memory("CUDA0")
        return "|".join([RATES_VERSION, platform.node(), str(total), os.path.abspath(self.path), str(st.st_size),
                          str(int(st.st_mtime)), str(self._threads()), str(self.config.repack),
                          str(self.config.cpu_layer_host_kv), str(self.config.cpu_layer_device)])

    def _cache(self) -> dict:
        try:
            data = json.loads((cache_dir() / "rates.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _cache_put(self, key: str, value) -> None:
        path = cache_dir() / "rates.json"
        data = self._cache()
        data[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-measurement next time

    def _cached_rates(self) -> Rates | None:
        try:
            return Rates(**self._cache()[self._cache_key()])
        except (KeyError, TypeError):
            return None

    def _split_key(self) -> str:
        return self._cache_key() + "|split|" + ",".join(map(str, self.plan.generate_overflow))

    def _cached_split_trials(self) -> dict[int, float] | None:
        try:
            trials = {int(n): float(t) for n, t in self._cache()[self._split_key()].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return trials if trials and all(0 <= n <= len(self.plan.generate_overflow) for n in trials) else None

    def _small_context_params(self, n_batch: int):
        """Params of the engine's own short-lived contexts (256 cells)."""
        p = self.lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = 256, n_batch, n_batch
        p.n_threads = p.n_threads_batch = self._threads()
        return p

    def _bos(self, model) -> int:
        lc = self.lc
        return max(lc.llama_vocab_bos(lc.llama_model_get_vocab(model)), 0)

    @contextmanager
    def _calibration_context(self, model):
        """A small context with the hook, its KV caches attached; generation
        in it runs the generate phase (one token per decode)."""
        lc, e = self.lc, self.engine
        p = self._small_context_params(CALIBRATION_BATCH)
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.config.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.patch_context_params(p)
        # Generate-resident layers go to a buffer of the engine's own meanwhile:
        # the real context's compute buffer, where they will live, does not
        # exist yet (the memory it will take is free now).
        e.set_generate_resident(self.plan.generate_resident, own=True)
        try:
            with no_graph_reuse():  # CPU layers change under it between trials
                ctx = lc.llama_init_from_model(model, p)
            if not ctx:
                raise BudgetError("llama.cpp could not create a small calibration context (out of memory?)")
            try:
                e.kv_attach()  # (a context that rebuilds every graph)
                yield ctx
            finally:
                try:
                    e.set_timing(False)
                    e.set_phase(native.PHASE_PROMPT)
                    self.context_closing()
                finally:
                    lc.llama_free(ctx)
                e.set_cpu_layers(())
                e.reset_counters()
        finally:
            e.set_generate_resident(self.plan.generate_resident, self._gr_reserve)

    def _decode_token(self, ctx, token: int) -> float:
        """One generate-phase token; seconds until its results are ready."""
        lc = self.lc
        arr = (lc.llama_token * 1)(token)
        self.engine.set_phase(native.PHASE_GENERATE)
        t0 = time.perf_counter()
        rc = lc.llama_decode(ctx, lc.llama_batch_get_one(arr, 1))
        lc.llama_synchronize(ctx)
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise DecodeError(f"calibration decode failed with llama_decode = {rc}")
        return seconds

    def _time_splits(self, model, splits, best: int) -> dict[int, float]:
        """Median seconds per token of the model's best split, then of
        neighbours one CPU layer at a time (more first), for as long as they
        are faster; timed in one context, so load-to-load variation of the
        CPU path does not enter the comparison."""
        e = self.engine
        bos = self._bos(model)
        trials = {}
        with self._calibration_context(model) as ctx:
            def timed(n_cpu):
                e.set_cpu_layers(splits[n_cpu][0])
                times = [self._decode_token(ctx, bos) for _ in range(2 + SPLIT_TRIAL_TOKENS)][2:]
                e.check_status("split trial")
                trials[n_cpu] = sorted(times)[len(times) // 2]
                return trials[n_cpu]

            fastest = timed(best)
            for step in (1, -1):
                n, moved = best + step, False
                while 0 <= n < len(splits) and timed(n) < fastest:
                    fastest, n, moved = trials[n], n + step, True
                if moved:
                    break
        self._cache_put(self._split_key(), trials)
        return trials

    def _measure_rates(self, model) -> Rates:
        """p from timed uploads of a streamed layer; c and G from one short
        generation with a sample of the overflow layers on the CPU (the rest
        streaming), timed layer by layer."""
        e, mf, plan = self.engine, self.model_file, self.plan
        first = plan.streamed[0]
        seconds = e.measure_upload(first, 3)
        pcie = mf.layer_bytes[first] / seconds
        overflow = self.plan.generate_overflow
        S = len(overflow)
        n_cpu = min(S, CALIBRATION_CPU_LAYERS, max(2, CALIBRATION_CPU_BYTES // max(mf.layer_bytes)))
        sample = tuple(overflow[j] for j in interleaved_layers(S, n_cpu))
        bos = self._bos(model)
        with self._calibration_context(model) as ctx:
            e.set_cpu_layers(sample)  # inside: the context's exit takes them away again on any path
            token_times = []
            for k in range(CALIBRATION_TOKENS):
                if k == 1:  # after the warm-up token (which shows the KV caches to the engine)
                    e.reset_counters()
                    e.set_timing(True)
                token_times.append(self._decode_token(ctx, bos))
            e.check_status("calibration")
            times = e.layer_times(mf.n_layer)
        per_layer = {i: s / n for i, (s, n) in enumerate(times) if n}
        cpu = [i for i in sample if i in per_layer]
        gpu = [i for i in plan.resident if i in per_layer]
        cpu_rate = sum(mf.layer_bytes[i] for i in cpu) / max(sum(per_layer[i] for i in cpu), 1e-9)
        # A resident layer's time stands for any layer on the GPU; without
        # resident layers, assume HBM speed (it is small next to c and p).
        gpu_layer = (sum(per_layer[i] for i in gpu) / len(gpu)) if gpu else max(mf.layer_bytes) / 2e12 + 3e-5
        token = sorted(token_times[1:])[len(token_times[1:]) // 2]
        # what the per-layer segments do not cover: embedding, output head,
        # layer 0 (timed from the previous token's end) and host overheads
        edges = max(token - sum(per_layer.values()), 0.0)
        rates = Rates(pcie_bytes_per_s=pcie, cpu_bytes_per_s=cpu_rate,
                      gpu_token_seconds=mf.n_layer * gpu_layer + edges)
        self._store_rates(rates)
        return rates

    def _store_rates(self, rates: Rates) -> None:
        self._cache_put(self._cache_key(), rates.__dict__)

    def decode_sizes(self, n_tokens: int) -> list[int]:
        """How many tokens each llama_decode call takes for a batch of
        n_tokens (at most n_batch). One call, except where a graph could
        otherwise be reused under another placement: a prompt whose tail
        ubatch is under OFFLOAD_MIN_BATCH tokens decodes that tail on its
        own, in the generate placement (where stock -ngl runs such a ubatch
        too), so that every graph's shape decides its placement."""
        ub = self.config.n_ubatch
        tail = n_tokens % ub
        if (self.engine is None or not self.reuses_graphs or not self.plan.cpu_layers
                or ub < OFFLOAD_MIN_BATCH or n_tokens <= ub or not 0 < tail < OFFLOAD_MIN_BATCH):
            return [n_tokens]
        return [n_tokens - tail, tail]

    def before_decode(self, n_tokens: int) -> None:
        """Prompt-sized ubatches stream every non-resident layer; small ones
        leave the CPU layers to the CPU (ggml runs host weights on the CPU
        below OFFLOAD_MIN_BATCH tokens, so the first ubatch decides: see
        decode_sizes for the calls where it would not)."""
        if self.engine is None:
            return
        ub = self.config.n_ubatch
        first, last = min(n_tokens, ub), (n_tokens - 1) % ub + 1
        generate = first < OFFLOAD_MIN_BATCH
        # A decode of the last graph's shape may reuse it: CPU layers' KV
        # caches stay where that graph reads them (the first move to host
        # memory waits for a decode of another shape).
        hold = self.reuses_graphs and generate and first == self._last_ubatch
        self.engine.set_phase(native.PHASE_GENERATE if generate else native.PHASE_PROMPT, hold_kv=hold)
        self._last_ubatch = last

    @contextmanager
    def creating_context(self):
        """Wrap llama_init_from_model for the context that will decode. It
        reuses graphs (llama.cpp's default) unless the config or the
        environment (LLAMA_GRAPH_REUSE_DISABLE) says otherwise. A reused
        graph keeps the scheduler's placement and the KV views it was built
        with; with CPU layers the driver keeps placement a function of the
        graph's shape for such contexts (decode_sizes, before_decode, and the
        engine's checks)."""
        self.reuses_graphs = (self.config.graph_reuse
                              and not int(os.environ.get("LLAMA_GRAPH_REUSE_DISABLE") or 0))
        if self.engine is None or self.reuses_graphs:
            yield
            return
        with no_graph_reuse():
            yield

    # -- context --
    def context_opened(self) -> None:
        """Right after creating the context that will decode (inside
        creating_context): the engine records its KV caches (CPU layers
        keep theirs in host memory while generating)."""
        self._last_ubatch = 0
        if self.engine is not None:
            self.engine.kv_attach(OFFLOAD_MIN_BATCH if self.reuses_graphs else 0)

    def kv_cleared(self) -> None:
        """After llama_memory_clear on that context."""
        if self.engine is not None:
            self.engine.kv_cleared()

    def context_closing(self) -> None:
        """Before freeing that context (every KV cache goes home)."""
        if self.engine is not None and self.engine.alive:
            self.engine.kv_detach()

    def patch_context_params(self, params) -> None:
        if self.engine is None:
            return
        cb = self.lc.ggml_backend_sched_eval_callback(native.EVAL_CB)
        self._keep.append(cb)
        params.cb_eval, params.cb_eval_user_data = cb, self.engine.address

    def check(self, during: str) -> None:
        if self.engine is not None:
            self.engine.check_status(during)

    def counters(self) -> native.Counters | None:
        return self.engine.counters() if self.engine is not None else None

    def vram_free(self) -> int | None:
        return native.device_memory("CUDA0")[0] if self.cuda else None

    def close(self) -> None:
        """Only after the context and the model are freed."""
        if self.engine is not None:
            self.engine.bind_layer_devices(None)  # writes nothing: the model is gone
            self.engine.destroy()
            self.engine = None
        self._keep.clear()
