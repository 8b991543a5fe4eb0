"""What streaming adds around one llama.cpp model: the load protocol and the
decode loop, written once for StreamedModel (model.py) and StreamedLlama
(llama_compat.py), through llama-cpp-python's own wrappers (ours of them in
llama_wrappers.py):

    with Streamer(path, config) as s:       # read the GGUF, pick the device, plan, create the slot ring
        model = StreamedLlamaModel(s, path_model=path, params=...)
            # s.patch_model_params: every layer a "GPU" layer, streamed ones in pinned host memory;
            # load; s.attach: discover the weights, re-home streamed layers into the ring, bind
            # layer devices, choose generate-resident layers and the generate split (calibrate.py)
        ctx = StreamedLlamaContext(s, model=model, params=...)
            # s.patch_context_params (the scheduler hook); s.creating_context (graph reuse or not);
            # create; s.context_opened (the engine records its KV caches: one token decoded and forgotten)
        ctx.decode(batch)                   # s.decode: sizes, phase, llama_decode, the hook's status
        model.close()                       # the context (s.context_closing first), then the model;
                                            # the ring goes last (s.close): streamed tensors point into it
"""
from __future__ import annotations

import ctypes
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace

from . import llama_abi, native
from .calibrate import Calibration, Calibrator, LiveSplit
from .config import EngineConfig, resolve_context, resolve_flash_attn, select_device, with_default_budget
from .disk import DISK_LOOKAHEAD, arm_disk_load, file_identity, reader_options, with_disk_layers
from .errors import (BudgetError, DecodeError, EnvironmentMismatchError, NativeError,
                     UnsupportedModelError)
from .gguf_file import ModelFile, is_expert_tensor, read_model
from .memory import kv_ggml_type
from .placement import (OAI_ACTIVATION_ARCHS, HostTiers, check_host_memory, chosen_generate_resident, initial_plan,
                        moe_generate_parts, run_tiers)
from .planner import OFFLOAD_MIN_BATCH, Plan, decode_sizes, decode_ubatches, is_generate_phase, with_generate_placement
from .progress import Progress, note
from .split_cache import split_lookup

llama_abi.llama()  # version check before touching llama-cpp-python's internals

DISCOVERY_TOKENS = 2  # < 32, so no op-offload copy stands in for a weight
DISCOVERY_BATCH = 16
SMALL_CONTEXT_CELLS = 256


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


class Streamer:
    """The slot ring of one model and everything that wires it into
    llama.cpp. A context manager; close() only after the context and the
    model are freed (StreamedLlamaModel.close does it in that order)."""

    def __init__(self, path: str | os.PathLike, config: EngineConfig, *, model_file: ModelFile | None = None,
                 plan: Plan | None = None, cuda: bool | None = None):
        self.path = str(path)
        self.lc = llama_abi.llama()
        self.model_file = model_file or read_model(self.path)
        self.config = config = resolve_context(config, self.model_file.hparams["n_ctx_train"])
        self.cuda = select_device(config.device) == "cuda" if cuda is None else cuda
        self.config = config = resolve_flash_attn(config, self.model_file.hparams, self.cuda)
        if plan is None:  # StreamedLlama: no placement on a GPU plans for the free VRAM
            self.config = config = with_default_budget(config, self.cuda)
        # the default split resolved for the device (EngineConfig.generate_split)
        self.config = config = replace(config, generate_cpu_layers=config.generate_split(self.cuda))
        # the disk tier's reader: chunk size, host-mode staging, reader threads, O_DIRECT
        self._staging = reader_options(self.cuda, config.disk_direct)
        # the disk tier holds no host memory, at load included (gs_diskload.c): check what is left
        self.plan: Plan = self._with_disk_tier(plan or initial_plan(self.model_file, config, self.cuda))
        check_host_memory(self.tiers.most_plan, config)
        notice = self.tiers.notice()
        if notice:
            note(notice, True)
        # the file the plan was made from: the engine's disk reads check it is still that file
        self._file_identity = file_identity(self.path) if self.plan.disk_layers else None
        self.engine: native.Engine | None = None
        self.pinned_bytes = 0
        self.disk_released_at_load = 0  # bytes of the disk tier's load buffers handed back while loading
        # the layers' weights as attach found them, by tier: "resident" (not streamed), "host" (the
        # uploads' source in host memory: pinned on CUDA), "disk" (read from the file)
        self.tier_bytes = {"resident": 0, "host": 0, "disk": 0}
        self.calibration: Calibration | None = None
        self.live_split: LiveSplit | None = None  # a first load's split search on its first generated tokens
        self.generate_reserve = 0  # compute buffer bytes left to generate-phase graphs
        self.split_experts: tuple[int, ...] = ()  # layers whose experts are split while generating (moe_split)
        self.layer_devices_bound = False
        self.reuses_graphs = False  # the attached context may reuse graphs (see creating_context)
        self._last_ubatch = 0  # tokens in the attached context's last graph (0: none yet)
        self._outputs_all = False  # the attached context outputs every token (embeddings)
        self.flash_attn: bool | None = None  # the decoding context's, once created (None: not known)
        self._keep = []  # ctypes objects that must outlive the C calls using them
        self._load_progress: Progress | None = None
        if self.plan.streamed:
            self._create_engine()

    def _with_disk_tier(self, plan: Plan) -> Plan:
        """The streamed parts beyond the host budget (given, or what the
        machine can spare) on the disk tier: placement.host_tiers, which
        `plan` shows too (self.tiers: also the CPU layers the generate split
        may choose among)."""
        lookup = split_lookup(self.path, self.config, native.device_memory("CUDA0")[1]) if self.cuda else None
        self.tiers: HostTiers = run_tiers(self.model_file, plan, self.config, self.cuda, lookup)
        if not plan.streamed:
            return plan
        return with_disk_layers(plan, self.tiers.plan.disk_layers, self.tiers.plan.host_budget)

    def file_offset(self, name: str) -> int:
        """Where tensor `name`'s data lies in the GGUF file (the disk tier reads it there)."""
        return self.model_file.tensor(name).offset

    def _create_engine(self) -> None:
        config = self.config
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
                                    # CPU layers get llama.cpp's repacked layouts, as stock's do
                                    amx_buft=native.cpu_extra_buft("AMX") if config.amx_layout else 0,
                                    repack_buft=native.cpu_extra_buft("CPU_REPACK") if config.repack else 0,
                                    host_kv_buft=native.device_bufts("CPU")[0] if self._cpu_computes_layers
                                    and config.cpu_layer_host_kv else 0,
                                    disk_lookahead=DISK_LOOKAHEAD, **self._staging)

    @property
    def experts_only(self) -> bool:
        """A mixture-of-experts plan: only expert tensors stream or go to the
        CPU; attention, norms, router and KV caches stay on the GPU."""
        return self.plan.part == "experts"

    @property
    def _cpu_computes_layers(self) -> bool:
        """CPU layers are whole layers (their KV and norms follow them)."""
        return not self.experts_only

    def streams(self, name: str, layer: int) -> bool:
        """Whether weight `name` of `layer` is one the engine moves."""
        return layer in self.plan.streamed and (not self.experts_only or is_expert_tensor(name))

    # ------------------------------------------------------------ the model
    def patch_model_params(self, params) -> None:
        """Every layer counts as a GPU layer (so every KV cache lives on the
        GPU); streamed layers are overridden into host memory."""
        stock = self.plan.stock_gpu_layers
        params.n_gpu_layers = (-1 if stock is None else stock) if self.cuda else 0
        self._keep.append(llama_abi.our_model_params(params, self.config, self.cuda))
        self._report_load(params)
        if self.engine is not None:
            pattern = llama_abi.expert_pattern if self.experts_only else llama_abi.layer_pattern
            disk = self.plan.disk_layers
            pinned = tuple(i for i in self.plan.streamed if i not in disk)
            rules = [(pattern(pinned), self._source_buft)] if pinned else []
            if disk:
                rules.append((pattern(disk), native.disk_buft()))
                self._keep.append(arm_disk_load(params))
            rules = llama_abi.buft_overrides(rules)
            self._keep.append(rules)
            params.tensor_buft_overrides = ctypes.addressof(rules)

    def _report_load(self, params) -> None:
        """llama.cpp's load progress (a fraction of the weights read, e.g.
        into pinned memory) as a Progress in bytes (config.progress)."""
        if not self.config.progress:
            return
        total = self.model_file.total_bytes
        where = "weights; streamed layers into pinned memory" if self.engine is not None and self.cuda else "weights"
        bar = self._load_progress = Progress(f"loading {os.path.basename(self.path)} ({where})", total)

        def report(fraction, _user_data):
            try:
                bar.update(int(fraction * total))
            except Exception:  # noqa: BLE001 - an error here must not abort the load (False would)
                pass
            return True

        cb = self.lc.llama_progress_callback(report)
        self._keep.append(cb)
        params.progress_callback, params.progress_callback_user_data = cb, None

    def model_loaded(self, ok: bool) -> None:
        """llama.cpp's load returned: its progress ends (at 100% if it loaded)."""
        bar, self._load_progress = self._load_progress, None
        if bar is not None:
            bar.finish() if ok else bar.close()

    def attach(self, model) -> None:
        """After loading: find the streamed weights, re-home them into the
        ring, then decide what the streamed layers do while generating."""
        if self.engine is None:
            return
        disk = set(self.plan.disk_layers)
        if disk:
            self.disk_released_at_load = native.disk_load_disarm()  # llama.cpp's buffers may be freed from now on
            self.engine.set_file(self.path, *self._file_identity)
        for w in self._discover(model):
            if not self.streams(w.name, w.layer):
                self.tier_bytes["resident"] += w.nbytes if w.layer is not None else 0
                continue
            if w.layer in disk:  # uploads read the file; llama.cpp's copy is released at start
                self.engine.add_file_tensor(w.layer, w.tensor, self.file_offset(w.name))
                self.tier_bytes["disk"] += w.nbytes
                continue
            self.tier_bytes["host"] += w.nbytes
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
        self._choose_generate_split(model)

    def _discover(self, model) -> list[native.Weight]:
        """Weight tensors through a throwaway context; checks that the graph
        keeps each layer between its l_out boundaries."""
        lc, e, mf = self.lc, self.engine, self.model_file
        e.discover_reset()
        p = self.small_context_params(DISCOVERY_BATCH)
        cb = lc.ggml_backend_sched_eval_callback(native.DISCOVER_CB)
        p.cb_eval, p.cb_eval_user_data = cb, e.address
        ctx = lc.llama_init_from_model(model, p)
        if not ctx:
            raise BudgetError("llama.cpp could not create a small discovery context (out of memory?)")
        try:
            arr = (lc.llama_token * DISCOVERY_TOKENS)(*([self.bos(model)] * DISCOVERY_TOKENS))
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
            if w.viewed and self.streams(w.name, w.layer):
                raise UnsupportedModelError(f"architecture {mf.arch} uses weight {w.name} through a view; "
                                            "streaming it is not supported")
        return weights

    def _bind_layer_devices(self, model) -> None:
        """Let the engine make CPU layers CPU layers for llama.cpp while
        generating (where this build's model layout is the one we know)."""
        if not self.config.cpu_layer_device or not self._cpu_computes_layers:
            return
        cells = llama_abi.layer_device_cells(model, self.model_file.n_layer)
        if cells is None:
            warnings.warn("gguf-stream: llama.cpp's per-layer devices are not where llama-cpp-python "
                          f"{llama_abi.REQUIRED_VERSION} keeps them; CPU layers keep their norms on the GPU "
                          "(slower generation, same results)", RuntimeWarning, stacklevel=3)
            return
        self.engine.bind_layer_devices(cells)
        self.layer_devices_bound = True

    def _choose_generate_resident(self) -> None:
        """Streamed layers that stay resident while generating, in the
        compute buffer llama.cpp sizes for a prompt-sized ubatch (a generated
        token's graph leaves most of it idle): as many as the estimate says
        fit, spread through the overflow (CUDA; layer numbers anywhere)."""
        layers, reserve = chosen_generate_resident(self.model_file, self.plan, self.config, self.cuda)
        if not reserve:
            return
        self.generate_reserve = reserve
        self.engine.set_generate_resident(layers, reserve)
        self.plan = with_generate_placement(self.plan, (), layers)

    def _choose_generate_split(self, model) -> None:
        """Which overflow layers the CPU computes while generating: measured
        (calibrate.py) with 'auto' on CUDA, else as given."""
        choice, cpu = self.config.generate_cpu_layers, ()
        rows, most = self.config.split_rows, self.config.cpu_layers_max_batch
        if choice == "auto" and self.experts_only:
            cpu, split, n_upload = moe_generate_parts(self.plan, self.config, self.model_file, self.cuda)
            if split:  # their experts split between an upload and the CPU (gs_split.c)
                # host mode (tests): the CPU's part joins the sum before a shared expert's (llama.cpp's order)
                self.engine.set_split_experts(split, native.SPLIT_AUTO if n_upload == "auto" else n_upload,
                                              self.model_file.hparams["n_expert_used"], self.config.threads,
                                              oai=self.model_file.arch in OAI_ACTIVATION_ARCHS,
                                              into_sum=not self.cuda and self.model_file.has_shared_experts)
                self.split_experts = split
                if self.config.prompt_cpu_experts:
                    self.engine.set_prompt_cpu_experts(self.config.prompt_cpu_experts)
                note(f"generate split: {self.tiers.split}", self.config.progress)  # host_tiers said which
        elif choice == "auto" and (rows >= OFFLOAD_MIN_BATCH or (most is not None and rows > most)):
            # decodes of that many rows take the prompt placement: no CPU layers to choose
            note(f"generate split: none (decodes of {rows} rows compute every row on the GPU)", self.config.progress)
        elif choice == "auto" and self.cuda and self.plan.generate_overflow and not self.tiers.most:
            note(f"generate split: {self.tiers.split}", self.config.progress)
        elif choice == "auto" and self.cuda and self.plan.generate_overflow:
            # among the layers host_tiers left it (not the disk tier's, copies within the host budget)
            live = self.config.calibrate_on_tokens and rows == 1 and llama_abi.can_drop_graphs()
            cpu, self.calibration, self.live_split = Calibrator(self, model, self.tiers.choices,
                                                                self.tiers.most).start_split(live)
        elif not isinstance(choice, str):
            cpu = tuple(choice)
        if self.config.prompt_cpu_experts and not self.split_experts:
            note("prompt_cpu_experts ignored: no expert layers split here (see --moe-split); every expert streams", True)
        if cpu:
            self.engine.set_cpu_layers(cpu)
        self.plan = replace(with_generate_placement(self.plan, cpu, self.plan.generate_resident),
                            split_layers=self.split_experts)

    def small_context_params(self, n_batch: int):
        """Params of the engine's own short-lived contexts."""
        p = self.lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = SMALL_CONTEXT_CELLS, n_batch, n_batch
        p.n_threads, p.n_threads_batch = self.config.threads, self.config.threads_batch
        # the run's KV types and attention (a quantized V cache needs flash
        # attention), so that calibration times what the run will do
        c = self.config
        p.type_k, p.type_v = kv_ggml_type(c.type_k), kv_ggml_type(c.type_v)
        p.flash_attn_type = llama_abi.flash_attn_type(c.flash_attn)
        return p

    def bos(self, model) -> int:
        return max(self.lc.llama_vocab_bos(self.lc.llama_model_get_vocab(model)), 0)

    # ------------------------------------------------------------ the context
    def patch_context_params(self, params) -> None:
        # llama_cpp.Llama knows flash attention on or off only ("auto" too here)
        params.flash_attn_type = llama_abi.flash_attn_type(self.config.flash_attn)
        self._outputs_all = bool(params.embeddings)
        if self.engine is None:
            return
        cb = self.lc.ggml_backend_sched_eval_callback(native.EVAL_CB)
        self._keep.append(cb)
        params.cb_eval, params.cb_eval_user_data = cb, self.engine.address

    @staticmethod
    @contextmanager
    def no_graph_reuse():
        """A llama.cpp context created inside this rebuilds its graph at
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

    @contextmanager
    def creating_context(self):
        """Wrap llama_init_from_model for the context that will decode. It
        reuses graphs (llama.cpp's default) unless the config or the
        environment (LLAMA_GRAPH_REUSE_DISABLE) says otherwise. A reused
        graph keeps the scheduler's placement and the KV views it was built
        with; with CPU layers the driver keeps placement a function of the
        graph's shape for such contexts (decode_sizes, before_decode, and the
        engine's checks). Records whether flash attention ended on
        (self.flash_attn: llama.cpp settles -fa auto here)."""
        self.reuses_graphs = (self.config.graph_reuse
                              and not int(os.environ.get("LLAMA_GRAPH_REUSE_DISABLE") or 0))
        with llama_abi.watch_log(*llama_abi.FLASH_ATTN_LOG) as said:  # -fa auto: what llama.cpp chose
            if self.engine is None or self.reuses_graphs:
                yield
            else:
                with self.no_graph_reuse():
                    yield
        self.flash_attn = llama_abi.flash_attn_outcome(self.config.flash_attn, said)
        if self.flash_attn is False and self.config.planned_flash_attn:
            warnings.warn("-fa auto: llama.cpp turned flash attention off where the plan expected it on, so its "
                          "compute buffer is larger than planned (the budget may not hold): give -fa off "
                          "(flash_attn=False) to plan for it", stacklevel=2)

    @contextmanager
    def own_context(self):
        """While one of the engine's own short-lived contexts (calibration)
        is the attached one: it rebuilds every graph, and the decoding
        context's state is kept for afterwards."""
        saved = self.reuses_graphs, self._last_ubatch
        self.reuses_graphs, self._last_ubatch = False, 0
        try:
            yield
        finally:
            self.reuses_graphs, self._last_ubatch = saved

    def context_opened(self, ctx) -> None:
        """Right after creating the context that will decode (inside
        creating_context): the engine records its KV caches (CPU layers
        keep theirs in host memory while generating)."""
        self._last_ubatch = 0
        if self.engine is None:
            return
        self.engine.kv_attach(self.prompt_min_ubatch if self.reuses_graphs else 0)
        if self._cpu_computes_layers and self.config.cpu_layer_host_kv and self.plan.cpu_layers:
            self._record_kv(ctx)

    def _record_kv(self, ctx) -> None:
        """Decode one token and forget it, so that the engine has recorded
        the context's KV caches before the first real decode. Otherwise that
        decode (a short prompt: generate phase) finds the CPU layers' caches
        still where llama.cpp put them (the GPU) and computes their attention
        there, while every later one reads them from host memory on the CPU:
        the same prompt, other rounding, other tokens the second time."""
        lc = self.lc
        batch = lc.llama_batch_init(1, 0, 1)
        live, self.live_split = self.live_split, None  # not a token the split search times
        try:
            batch.n_tokens, batch.token[0], batch.pos[0] = 1, self.bos(lc.llama_get_model(ctx)), 0
            batch.n_seq_id[0], batch.seq_id[0][0] = 1, 0
            # no output: llama.cpp keeps graphs with and without outputs apart, so
            # no later decode (all have one) can reuse this one's KV placement
            batch.logits[0] = 0
            rc = self.decode(ctx, batch)
        finally:
            self.live_split = live
            lc.llama_batch_free(batch)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        self.kv_cleared()
        if rc != 0:
            raise DecodeError(f"the decode that records the KV caches failed with llama_decode = {rc}")
        self.engine.reset_counters()  # the counters count the caller's decodes (as after calibration)
        # an embeddings context outputs every token, so its next 1-token decode may
        # reuse this graph: the caches stay where it reads them (before_decode's hold)
        self._last_ubatch = 1 if self._outputs_all else 0

    def kv_cleared(self) -> None:
        """After llama_memory_clear on that context."""
        if self.engine is not None:
            self.engine.kv_cleared()

    def context_closing(self) -> None:
        """Before freeing that context (every KV cache goes home)."""
        if self.engine is not None and self.engine.alive:
            self.engine.kv_detach()

    def model_closing(self) -> None:
        """Before freeing the model: no upload may still be reading its host
        memory. The engine prefetches from attach on; closing a context
        drains that (kv_detach), but a context that failed to open (a
        quantized V cache without flash attention) never closes, and the
        copy thread then read freed memory."""
        self.context_closing()

    # ------------------------------------------------------------ decoding
    @property
    def prompt_min_ubatch(self) -> int:
        """Ubatches of at least this many tokens take the prompt placement
        (planner.is_generate_phase): OFFLOAD_MIN_BATCH, or with CPU layers
        one more than config.cpu_layers_max_batch where that is lower."""
        most = self.config.cpu_layers_max_batch
        if most is None or not self.plan.cpu_layers:
            return OFFLOAD_MIN_BATCH
        return min(most + 1, OFFLOAD_MIN_BATCH)

    def decode_sizes(self, n_tokens: int) -> list[int]:
        """Tokens per llama_decode call for a batch of n_tokens (planner.decode_sizes)."""
        split = self.engine is not None and self.reuses_graphs and bool(self.plan.cpu_layers)
        return decode_sizes(n_tokens, self.config.n_ubatch, split, self.prompt_min_ubatch)

    def before_decode(self, n_tokens: int) -> None:
        """The phase of the coming llama_decode (planner.is_generate_phase)."""
        if self.engine is None:
            return
        first, last = decode_ubatches(n_tokens, self.config.n_ubatch)
        generate = is_generate_phase(first, self.prompt_min_ubatch)
        # A decode of the last graph's shape may reuse it: CPU layers' KV
        # caches stay where that graph reads them (the first move to host
        # memory waits for a decode of another shape).
        hold = self.reuses_graphs and generate and first == self._last_ubatch
        self.engine.set_phase(native.PHASE_GENERATE if generate else native.PHASE_PROMPT, hold_kv=hold)
        self._last_ubatch = last

    def decode(self, ctx, batch) -> int:
        """llama_decode of a llama_batch through the engine: split where
        decode_sizes says, each call placed by before_decode and checked for
        the hook's errors. Returns llama_decode's code (0: ok)."""
        n_all = batch.n_tokens
        sizes = self.decode_sizes(n_all)
        if len(sizes) > 1 and (batch.embd or (batch.logits and any(batch.logits[i] for i in range(sizes[0])))):
            # the split would lose those outputs (each llama_decode call replaces them)
            raise DecodeError("this context reuses graphs, so a prompt's short tail is decoded on its own, "
                              "which loses outputs requested before it; create the model with "
                              "graph_reuse=False to keep them")
        start = 0
        sched = self._scheduler(ctx)
        # a first load's split search times this decode: one ubatch of one row, generating
        timed = (self.live_split is not None and n_all == self.config.split_rows and len(sizes) == 1
                 and is_generate_phase(n_all, self.prompt_min_ubatch))
        for n in sizes:
            with disk_errors():
                self.before_decode(n)
            if sched:
                self.engine.route_hook(sched)
            t0 = time.perf_counter()
            rc = self.lc.llama_decode(ctx, batch if n == n_all else llama_abi.batch_view(batch, start, n))
            self.check("llama_decode")
            if rc != 0:
                return rc
            if timed:
                self.lc.llama_synchronize(ctx)  # the caller reads the logits next: no time lost
                self._split_timed(ctx, time.perf_counter() - t0)
            start += n
        return 0

    def _split_timed(self, ctx, seconds: float) -> None:
        """Feed the live split search one timed decode; between decodes,
        change CPU layers where it says (the context first drops the graphs
        it would reuse: they keep the placement they were built with)."""
        live = self.live_split
        before = live.cpu_layers
        cpu = live.timed(seconds)
        if cpu is not None:
            t0 = time.perf_counter()
            if self.reuses_graphs:
                if not llama_abi.drop_graphs(ctypes.cast(ctx, ctypes.c_void_p).value):
                    # the run goes on at the split it has (nothing cached: the next load searches again)
                    self.live_split = None
                    self.engine.keep_repacks(False)
                    warnings.warn(f"the generate split's search stopped at {len(before)} CPU layers: llama.cpp could "
                                  "not drop the context's graphs (out of memory?)", RuntimeWarning, stacklevel=2)
                    return
                self.engine.graphs_dropped()
            self.engine.set_cpu_layers(cpu)
            self._last_ubatch = 0  # no graph to reuse: the next decode builds one with these CPU layers
            live.set_up(time.perf_counter() - t0)
        if live.done:
            self.live_split, self.calibration = None, live.calibration
            self.engine.keep_repacks(False)  # the other splits' repacked copies go
            self.plan = with_generate_placement(self.plan, live.cpu_layers, self.plan.generate_resident)

    def _scheduler(self, ctx) -> int | None:
        """The context's scheduler, where the engine may leave its hook out of
        a decode that would not need it (Engine.route_hook); None: the hook
        stays as the context was created (no engine, or GGUF_STREAM_ALWAYS_HOOK=1,
        an A/B aid)."""
        if self.engine is None or os.environ.get("GGUF_STREAM_ALWAYS_HOOK", "0") not in ("", "0"):
            return None
        return llama_abi.context_scheduler(ctypes.cast(ctx, ctypes.c_void_p).value)

    def check(self, during: str) -> None:
        """Raise the error the hook recorded, if any (it cannot return one
        through the scheduler)."""
        if self.engine is not None:
            with disk_errors():
                self.engine.check_status(during)

    # ------------------------------------------------------------ state
    def counters(self) -> native.Counters | None:
        return self.engine.counters() if self.engine is not None else None

    def vram_free(self) -> int | None:
        return native.device_memory("CUDA0")[0] if self.cuda else None

    def close(self) -> None:
        """Only after the context and the model are freed. Idempotent."""
        if self.plan.disk_layers:
            native.disk_load_disarm()  # a load that failed never reached attach
        if self.engine is not None:
            self.engine.bind_layer_devices(None)  # writes nothing: the model is gone
            self.engine.destroy()
            self.engine = None
        self._keep.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def disk_errors():
    """A disk-tier read that failed (an I/O error, the file truncated or
    rewritten underneath) is the decode's failure, said in one line."""
    try:
        yield
    except NativeError as exc:
        if exc.code != native.E_IO:
            raise
        raise DecodeError(exc.detail) from None

