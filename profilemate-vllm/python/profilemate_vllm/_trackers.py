"""The CUDA graph and MoE routing trackers of the worker side (what ``_plugin`` does with them).

CUDA graphs
    A model runner whose CUDA graph mode is not ``NONE`` (read when it has set up its KV cache)
    turns the tracker on. Each graph vLLM captures (V1: ``GPUModelRunner._warmup_and_capture``
    inside ``_capture_cudagraphs``; V2: each descriptor of ``CudaGraphManager.capture`` run by
    ``capture_model(profile_only=False)``) is a ``capture`` row timed on the host clock, vLLM's
    warmup runs for that size included; the throwaway captures of vLLM's memory profiling are
    not recorded. Each real step gets one ``replay`` (the batch padded to a captured size) or
    ``eager`` row from the decision vLLM made for it: V1, the last result of the runner's own
    ``CudagraphDispatcher.dispatch`` in the step (a data-parallel re-dispatch comes after the
    first one); V2, the ``batch_desc`` given to ``prepare_inputs``. Where the mode is ``NONE``
    (always on a CPU) nothing is recorded.

MoE routing
    The MoE layers are found when the runner has set up its KV cache (vLLM's
    ``static_all_moe_layers``, each with its router), or when a router first routes. A layer's
    number is ``N`` of ``layers.N`` in its name (``model.layers.3.block_sparse_moe.experts``);
    a name without one, or a number already taken, gets the next number above those in use, in
    order of first sight. In a real step, every ``FusedMoERouter.select_experts`` result adds its
    ``topk_ids`` (rows beyond the step's scheduled tokens are padding and left out) into a
    per-layer counts row on the same device, with ``index_add_`` of a preallocated ones buffer:
    no ``bincount``, no ``.item()``, never a synchronisation with the GPU. Ids are first clamped
    into two extra buckets (negative, and at or above the expert count), so an unexpected id is
    counted apart and can never index out of range. At the end of the step the counts are read
    on a CPU (``tolist``) and recorded, one call per layer; on a GPU they are copied
    ``non_blocking`` into pinned memory behind a CUDA event and recorded when a later step finds
    the event complete (at shutdown the last ones are waited for). Routers with EPLB are not
    counted (their ids are physical replicas and vLLM records their load itself). Kernels that
    route inside the kernel (``is_monolithic``) never call the router: nothing to record. CUDA
    graph replays do not run Python, so a step that replays a graph has no routing rows.

The GPU paths (events, pinned copies, capture timing) are not exercised by the test suite,
which runs on a CPU.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from ._state import STATE as S
from ._state import WRAPPED_ATTR

_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
MAX_EXPERTS = 1024  # the core's MAX_EXPERTS
MAX_PENDING = 64  # GPU copies waiting for their event; older ones are dropped and counted


def ranges(numbers: List[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    spans: List[List[int]] = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# --- CUDA graphs ---------------------------------------------------------------------------------


def runner_graph_mode(runner: Any, v2: bool) -> str:
    """The name of the CUDA graph mode a model runner dispatches with (``NONE`` when off)."""
    if v2:
        manager = getattr(runner, "cudagraph_manager", None)
        mode = getattr(manager, "cudagraph_mode", None) if manager is not None else None
    else:
        dispatcher = getattr(runner, "cudagraph_dispatcher", None)
        mode = None
        if dispatcher is not None and getattr(dispatcher, "keys_initialized", False):
            mode = dispatcher.cudagraph_mode
    return getattr(mode, "name", None) or "NONE"


# --- MoE routing --------------------------------------------------------------------------------


class MoeLayer:
    __slots__ = ("index", "name", "router", "experts", "top_k", "row", "counts", "skip", "monolithic", "routed")

    def __init__(self, index: int, name: Optional[str], router: Any) -> None:
        self.index = index
        self.name = name
        self.router = router
        self.experts = 0
        self.top_k = getattr(router, "top_k", None)
        self.row = -1  # its row in the counts buffer, once it is counted
        self.counts: Any = None  # that row (a view)
        self.skip: Optional[str] = None  # why it is not counted
        self.monolithic = False
        self.routed = False


def _layer_name(router: Any) -> Optional[str]:
    """The name vLLM registered the router's MoE layer under, from the forward context."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        for name, obj in get_forward_context().no_compile_layers.items():
            if getattr(obj, "router", None) is router:
                return str(name)
    except Exception:
        pass
    return None


COUNTS_ATTR = "_profilemate_moe_counts"  # on a router: (its counts row, the row's number, count_op())
_count_op: Any = None


def count_op() -> Any:
    """The custom op ``profilemate::moe_count(Tensor(a!) counts, Tensor topk_ids, int row)``.

    Under torch.compile, Python inside the model runs while the graph is traced, not when it
    runs: a wrapper that counts in Python records nothing. The router's wrapper therefore
    calls this op when it is traced: Dynamo puts it into the graph as an opaque call (it
    mutates ``counts``, so no pass removes it), and each run of the compiled graph calls its
    Python implementation, :meth:`MoeRouting.count`, as an eager run does. (vLLM's own
    ``moe_forward`` op reaches Python at run time the same way.)"""
    global _count_op
    if _count_op is None:
        import torch

        # The schema is spelled out: this module's annotations are strings (``annotations``
        # import), which the schema inference of ``custom_op`` does not read.
        @torch.library.custom_op(
            "profilemate::moe_count",
            mutates_args=("counts",),
            schema="(Tensor(a!) counts, Tensor topk_ids, int row) -> ()",
        )
        def moe_count(counts, topk_ids, row):
            moe = S.moe
            if moe is not None and S.in_step and not S.moe_elsewhere:
                moe.count(counts, topk_ids, row)

        @moe_count.register_fake
        def _(counts, topk_ids, row):
            return None

        _count_op = torch.ops.profilemate.moe_count.default
    return _count_op


class MoeRouting:
    """Per-layer token counts of one process's MoE routers (see the module's documentation)."""

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self.layers: Dict[int, MoeLayer] = {}  # by id(router)
        self.by_index: Dict[int, MoeLayer] = {}
        self.rows: List[MoeLayer] = []  # counted layers, by row
        self.buf: Any = None  # [rows, max experts + 2] int64 on the routers' device
        self.ones: Any = None
        self._ones_n: Dict[int, Any] = {}  # ones[:n] by n (a step's size repeats)
        self.touched: Set[int] = set()  # rows that routed tokens in this step
        self.ntok = 0
        self.recording = True  # False once this process's recorder is open without the tracker
        self.unsupported: Optional[str] = None
        self._pending: Deque[Tuple[Any, Any, List[int]]] = deque()
        self._pinned: List[Any] = []
        # What the log line and part.json report.
        self.steps_routed = 0
        self.steps_without_routing = 0
        self.out_of_range_ids = 0
        self.dropped_copies = 0
        self.unrecorded_calls = 0
        self.compiled = False  # the model runs under torch.compile
        self.no_graph_counting: Optional[str] = None  # why compiled graphs cannot count, if so
        self.aot_guard: Optional[str] = None  # vLLM's compiled-model cache checked for the op
        self.refused_artifacts = 0  # cached compiled models without the op, compiled again
        self.traced_uncounted: Set[int] = set()  # rows of routers traced without the counting op

    def built(self, runner: Any) -> None:
        """A ``MoERunner`` was constructed (before any forward, so before torch.compile traces
        it): registers its router under its layer name and gives the router its counts row,
        which the router's wrapper hands to the counting op."""
        router = getattr(runner, "router", None)
        if router is None or id(router) in self.layers:
            return
        layer = self.register(router, str(getattr(runner, "layer_name", "") or "") or None)
        if layer.skip is not None or layer.experts <= 0:
            return
        layer.row = len(self.rows)
        self.rows.append(layer)
        torch = self._torch
        device = torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")
        self._alloc(device)

    # -- layers -----------------------------------------------------------------------------

    def discover(self, compilation_config: Any) -> None:
        """Registers the MoE layers vLLM built (``static_all_moe_layers``) with their routers."""
        if compilation_config is None:
            return
        context = getattr(compilation_config, "static_forward_context", None) or {}
        for name in list(getattr(compilation_config, "static_all_moe_layers", None) or ()):
            layer = context.get(name)
            router = getattr(layer, "router", None)
            if router is None:
                continue
            known = self.layers.get(id(router))
            entry = known if known is not None and known.router is router else self.register(router, str(name))
            try:
                entry.monolithic = bool(layer.routed_experts.quant_method.is_monolithic)
            except Exception:
                pass

    def register(self, router: Any, name: Optional[str] = None, logits: Any = None) -> MoeLayer:
        if name is None:
            name = _layer_name(router)
        m = _LAYER_NUMBER.search(name or "")
        index = int(m.group(1)) if m else -1
        if index < 0 or index in self.by_index:
            index = max(self.by_index, default=-1) + 1
        layer = MoeLayer(index, name, router)
        self.layers[id(router)] = layer
        self.by_index[index] = layer
        if getattr(router, "eplb_state", None) is not None:
            layer.skip = "EPLB"
        else:
            experts = getattr(router, "global_num_experts", None)
            if isinstance(experts, int) and experts > 0:
                layer.experts = experts
            elif logits is not None:
                layer.experts = int(logits.shape[-1])
            if layer.experts > MAX_EXPERTS:
                layer.skip = f"{layer.experts} experts"
        return layer

    def recordable(self) -> bool:
        """Whether any layer can have routing rows (so the tracker's files are worth opening)."""
        return any(l.skip is None and (l.routed or not l.monolithic) for l in self.layers.values())

    # -- one step ---------------------------------------------------------------------------

    def begin_step(self, ntok: int) -> None:
        self.ntok = ntok
        if self.touched:  # the previous step did not end (an exception in vLLM)
            self.touched.clear()
            self.buf.zero_()

    def route(self, router: Any, args: tuple, kwargs: dict, topk_ids: Any) -> None:
        """A ``select_experts`` result, in a real step, of a router not seen when its layer was
        built: registered, given a counts row, and counted."""
        layer = self.layers.get(id(router))
        if layer is None or layer.router is not router:
            logits = kwargs.get("router_logits", args[1] if len(args) > 1 else None)
            layer = self.register(router, None, logits)
        if layer.skip is not None or self.unsupported is not None:
            return
        if layer.row < 0:
            if layer.experts <= 0:
                logits = kwargs.get("router_logits", args[1] if len(args) > 1 else None)
                layer.experts = int(logits.shape[-1])
                if layer.experts > MAX_EXPERTS:
                    layer.skip = f"{layer.experts} experts"
                    return
            layer.row = len(self.rows)
            self.rows.append(layer)
        if layer.counts is None or layer.counts.device != topk_ids.device:
            if self._alloc(topk_ids.device) is None:
                return
        self.count(layer.counts, topk_ids, layer.row)

    def count(self, counts: Any, topk_ids: Any, row: int) -> None:
        """One router result, counted into ``counts`` (the layer's row, or what torch.compile
        passes for it). Callers count in real steps only (not vLLM's profiling, warmup or
        capture runs), and not on a rank whose routing another rank records."""
        if self.unsupported is not None:
            return
        layer = self.rows[row]
        layer.routed = True
        if not self.recording:
            self.unrecorded_calls += 1
            return
        ids = topk_ids
        if ids.shape[0] > self.ntok:
            ids = ids[: self.ntok]  # padding rows
        flat = ids.reshape(-1)
        n = flat.numel()
        if n == 0:
            return
        torch = self._torch
        if flat.dtype is not torch.int64 and flat.dtype is not torch.int32:
            flat = flat.long()
        ones = self._ones_n.get(n)
        if ones is None:
            if self.ones is None or self.ones.shape[0] < n or self.ones.device != counts.device:
                self.ones = torch.ones(max(n, 4096), dtype=torch.int64, device=counts.device)
                self._ones_n.clear()
            elif len(self._ones_n) >= 256:
                self._ones_n.clear()
            ones = self._ones_n[n] = self.ones[:n]
        # Bucket 0: negative ids; 1..E: experts 0..E-1; E+1: ids >= E. Never out of range.
        idx = flat.clamp(-1, layer.experts).add_(1)
        counts.index_add_(0, idx, ones)
        self.touched.add(row)

    def _alloc(self, device: Any) -> Any:
        if device.type not in ("cpu", "cuda"):
            self.unsupported = f"routers on {device.type}"
            return None
        torch = self._torch
        width = max(l.experts for l in self.rows) + 2
        new = torch.zeros((len(self.rows), width), dtype=torch.int64, device=device)
        old = self.buf
        if old is not None and old.device == device:
            new[: old.shape[0], : old.shape[1]].copy_(old)
        self.buf = new
        op = None
        try:
            op = count_op()
        except Exception as e:  # no torch.library: eager steps are still counted
            self.no_graph_counting = f"the counting op could not be registered ({type(e).__name__}: {e})"
        for layer in self.rows:
            layer.counts = new[layer.row]
            if op is not None:
                setattr(layer.router, COUNTS_ATTR, (layer.counts, layer.row, op))
        self._pinned.clear()
        return new

    def end_step(self, rec: Any) -> None:
        """Records this step's counts (a CPU) or queues their copy (a GPU); ``rec`` None: the
        counts are dropped."""
        if not self.touched:
            if self.rows and self.recording and self.unsupported is None:
                self.steps_without_routing += 1
            if self._pending:
                self.poll(rec)
            return
        self.steps_routed += 1
        rows = sorted(self.touched)
        self.touched.clear()
        buf = self.buf
        if buf.device.type == "cpu":
            values = buf.tolist()
            buf.zero_()
            self._record(rec, rows, values)
            return
        torch = self._torch
        host = self._pinned.pop() if self._pinned else torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        host.copy_(buf, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        buf.zero_()
        self._pending.append((event, host, rows))
        if len(self._pending) > MAX_PENDING:
            self._pending.popleft()
            self.dropped_copies += 1
        self.poll(rec)

    def _record(self, rec: Any, rows: List[int], values: List[List[int]]) -> None:
        for row in rows:
            layer = self.rows[row]
            counts = values[row]
            e = layer.experts
            self.out_of_range_ids += counts[0] + counts[e + 1]
            if rec is not None:
                rec.moe_layer(layer.index, counts[1 : e + 1])

    def poll(self, rec: Any) -> None:
        """GPU: records the copies whose event has completed (never waits)."""
        pending = self._pending
        while pending and pending[0][0].query():
            _, host, rows = pending.popleft()
            self._record(rec, rows, host.tolist())
            if self.buf is not None and host.shape == self.buf.shape:
                self._pinned.append(host)

    def drain(self, rec: Any) -> None:
        """At shutdown (off the step path): waits for the last copies and records them."""
        pending = self._pending
        while pending:
            event, host, rows = pending.popleft()
            event.synchronize()
            self._record(rec, rows, host.tolist())

    # -- reporting --------------------------------------------------------------------------

    def describe(self) -> str:
        counted = [l for l in self.layers.values() if l.skip is None and (l.routed or not l.monolithic)]
        if not self.layers:
            return "no MoE layer in this model"
        out = []
        if counted:
            experts = sorted({l.experts for l in counted if l.experts})
            top_k = sorted({l.top_k for l in counted if isinstance(l.top_k, int)})
            what = f"{len(counted)} MoE layer{'s' if len(counted) != 1 else ''} found (layers {ranges([l.index for l in counted])}"
            if experts:
                what += f", {'/'.join(map(str, experts))} experts"
            if top_k:
                what += f", top-{'/'.join(map(str, top_k))}"
            out.append(what + ")")
            if self.compiled:
                if self.no_graph_counting:
                    out.append(f"torch.compile: not counted in compiled graphs: {self.no_graph_counting}")
                else:
                    out.append("torch.compile: counted inside the compiled graph (op profilemate::moe_count)")
        eplb = [l for l in self.layers.values() if l.skip == "EPLB"]
        if eplb:
            out.append(f"{len(eplb)} with EPLB not counted (physical expert replicas; vLLM records their load)")
        big = [l for l in self.layers.values() if l.skip not in (None, "EPLB")]
        if big:
            out.append(f"{len(big)} with more than {MAX_EXPERTS} experts not counted")
        mono = [l for l in self.layers.values() if l.skip is None and l.monolithic and not l.routed]
        if mono:
            out.append(f"{len(mono)} run a monolithic kernel that routes inside it: no routing to record")
        if self.unsupported:
            out.append(f"not counted: {self.unsupported}")
        if self.steps_without_routing:
            out.append(
                f"{self.steps_without_routing} steps with no routing counted (CUDA graph replays, or a graph "
                f"compiled without the counting op): their tokens are missing from the routing rows"
            )
        if not self.recording and self.unrecorded_calls:
            out.append(f"first routed after this process's files were opened: {self.unrecorded_calls} calls not recorded")
        return "; ".join(out)

    def report(self) -> Dict[str, Any]:
        return {
            "layers": {
                str(l.index): {
                    "name": l.name,
                    "experts": l.experts,
                    "top_k": l.top_k if isinstance(l.top_k, int) else None,
                    "counted": l.skip is None and (l.routed or not l.monolithic),
                    "skipped": l.skip,
                    "monolithic": l.monolithic,
                }
                for l in sorted(self.layers.values(), key=lambda l: l.index)
            },
            "steps_routed": self.steps_routed,
            "steps_without_routing": self.steps_without_routing,
            "out_of_range_ids": self.out_of_range_ids,
            "dropped_gpu_copies": self.dropped_copies,
            "compiled": self.compiled,
            "compile_cache": self.aot_guard,
            "refused_compiled_artifacts": self.refused_artifacts,
            "counted_by": "custom op profilemate::moe_count in the compiled graph" if self.compiled else "router wrapper (eager)",
        }


# --- torch.compile caches ------------------------------------------------------------------------

HOOKS_MODULE = "profilemate_vllm._hooks"  # traced into a compiled graph with the counting op
_AOT_MODULE = "vllm.compilation.decorators"
_AOT_LOAD = "_try_load_aot_compiled_fn"


def guard_compiled_artifacts(on_refused: Callable[[str], None]) -> str:
    """Keeps vLLM from reusing a torch.compile artifact compiled without the MoE counting op.

    vLLM (AOT compile, the default with torch >= 2.10) loads a compiled model from its cache
    before Dynamo traces anything, keyed without the files Dynamo traced. A graph compiled in a
    run without profiling has no counting op and would record no routing. Its loader,
    ``vllm.compilation.decorators._try_load_aot_compiled_fn``, is wrapped: an artifact whose
    inlined sources lack the hooks' module (which holds the router's wrapper) is refused (vLLM then compiles the model again, and saves
    the new artifact). A run without the plugin that finds an artifact with the op fails to load
    it and compiles again (vLLM's own fallback). Returns what was done, for part.json."""
    import sys

    module = sys.modules.get(_AOT_MODULE)
    if module is None:
        try:
            module = importlib.import_module(_AOT_MODULE)
        except Exception as e:
            return f"not guarded ({_AOT_MODULE} does not import: {type(e).__name__})"
    func = getattr(module, _AOT_LOAD, None)
    if func is None:
        return f"not guarded (no {_AOT_MODULE}.{_AOT_LOAD}; AOT compile artifacts unchecked)"
    if getattr(func, WRAPPED_ATTR, None) is not None:
        return "guarded"
    try:
        params = tuple(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        params = ()
    if params != ("model", "aot_compilation_path"):
        return f"not guarded (unexpected signature {_AOT_LOAD}({', '.join(params)}))"

    def _try_load_aot_compiled_fn(model, aot_compilation_path):
        loaded = func(model, aot_compilation_path)
        if loaded is None:
            return None
        try:
            sources = {getattr(s, "module", None) for s in loaded.source_info().inlined_sources}
        except Exception as e:
            S.fail("AOT compile artifact check", e)
            return loaded
        if HOOKS_MODULE in sources:
            return loaded
        on_refused(aot_compilation_path)
        return None

    functools.update_wrapper(_try_load_aot_compiled_fn, func)
    setattr(_try_load_aot_compiled_fn, WRAPPED_ATTR, func)
    setattr(module, _AOT_LOAD, _try_load_aot_compiled_fn)
    return "guarded"
