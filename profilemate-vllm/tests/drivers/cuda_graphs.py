"""The CUDA graph hooks against vLLM's own dispatcher and capture loop, on a CPU.

A CPU cannot capture or replay a CUDA graph, so this drives the parts of vLLM that decide about
graphs, as a GPU worker runs them, with the plugin active:

- a real ``CudagraphDispatcher`` whose keys vLLM's own ``initialize_cudagraph_keys`` sets up for
  ``FULL_AND_PIECEWISE`` (it is made without ``__init__``, whose checks want a compiled model);
- a model runner that is vLLM's ``GPUModelRunner`` class without its ``__init__`` (no device, no
  model), whose ``_dummy_run`` sleeps instead of running a model;
- vLLM's capture loop: ``_capture_cudagraphs`` for each ``get_capture_descs()`` group (as
  ``capture_model`` runs it), which calls the hooked ``_warmup_and_capture``; and one
  ``_warmup_and_capture`` outside it, as vLLM's memory profiling does (not a capture to record);
- steps: ``begin_step`` / ``end_step`` of the plugin (what the hooked ``execute_model`` calls)
  around vLLM's ``_determine_batch_execution_and_padding``, which calls the hooked ``dispatch``;
  a second dispatcher (a drafter's) dispatching inside a step is not the step's decision;
- Model Runner V2's capture wrapper around a stand-in for ``CudaGraphManager.capture``'s loop
  (vLLM's own needs a GPU).

Then the process's part is finished and merged as at exit. Writes what it did as JSON.

    VLLM_PROFILING_DIR=OUT python cuda_graphs.py RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace as NS


def scheduler_output(decode=(), prefill=()):
    """A SchedulerOutput as the phase rule reads it: decode requests (1 token each, with output
    tokens) and new prefill chunks {id: tokens}."""
    prefill = dict(prefill)
    scheduled = {r: 1 for r in decode}
    scheduled.update(prefill)
    return NS(
        scheduled_new_reqs=[NS(req_id=r) for r in prefill],
        scheduled_cached_reqs=NS(
            req_ids=list(decode),
            num_output_tokens=[5] * len(decode),
            num_computed_tokens=[14] * len(decode),  # 10 prompt + 5 output tokens: decoding
            resumed_req_ids=set(),
            all_token_ids={},
        ),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={},
        finished_req_ids=set(),
    )


def main() -> int:
    result_path = sys.argv[1]
    import profilemate_vllm

    profilemate_vllm.register()  # what vLLM's plugin loader does in each process
    import numpy as np
    import torch
    from vllm.config import CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import profilemate_vllm._plugin as P
    from profilemate_vllm._state import STATE as S
    from profilemate_vllm import _hooks

    wrapped = {
        name: hasattr(func, _hooks.WRAPPED_ATTR)
        for name, func in (
            ("CudagraphDispatcher.dispatch", CudagraphDispatcher.dispatch),
            ("GPUModelRunner._capture_cudagraphs", GPUModelRunner._capture_cudagraphs),
            ("GPUModelRunner._warmup_and_capture", GPUModelRunner._warmup_and_capture),
            ("GPUModelRunner.initialize_kv_cache", GPUModelRunner.initialize_kv_cache),
        )
    }
    # The CPU has no accelerator to synchronise (vLLM's CPU model runner makes this a no-op too).
    torch.accelerator.synchronize = lambda *a, **k: None

    compilation = NS(
        max_cudagraph_capture_size=8,
        cudagraph_capture_sizes=[1, 2, 4, 8],
        compile_sizes=None,
        cudagraph_specialize_lora=True,
        cudagraph_num_of_warmups=1,
        static_forward_context={},
        static_all_moe_layers=[],
    )
    vllm_config = NS(
        compilation_config=compilation,
        scheduler_config=NS(max_num_seqs=4),
        lora_config=None,
        parallel_config=NS(data_parallel_size=1, use_ubatching=False),
        observability_config=NS(cudagraph_metrics=False),
    )

    def dispatcher():
        d = CudagraphDispatcher.__new__(CudagraphDispatcher)
        d.vllm_config = vllm_config
        d.compilation_config = compilation
        d.uniform_decode_query_len = 1
        d.cudagraph_keys = {CUDAGraphMode.PIECEWISE: set(), CUDAGraphMode.FULL: set()}
        d.keys_initialized = False
        d.specialize_lora_count = False
        d.cudagraph_mode = CUDAGraphMode.NONE
        d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)  # vLLM's own key setup
        return d

    class Runner(GPUModelRunner):
        def __init__(self):  # GPUModelRunner's wants a device and a model
            self.vllm_config = vllm_config
            self.compilation_config = compilation
            self.cudagraph_dispatcher = dispatcher()
            self.uniform_decode_query_len = 1
            self.model_config = NS(is_encoder_decoder=False, is_multimodal_model=False)
            self.device = torch.device("cpu")
            self.parallel_config = vllm_config.parallel_config
            self.load_config = NS(use_tqdm_on_load=False)
            self.lora_config = None
            self.input_batch = NS(lora_id_to_lora_request={})
            self.dummy_runs = []

        def _dummy_run(self, num_tokens, **kwargs):
            self.dummy_runs.append(num_tokens)
            self.cudagraph_dispatcher.dispatch(num_tokens)  # outside a real step: not recorded
            time.sleep(0.002)

        def maybe_remove_all_loras(self, lora_config):
            pass

    runner = Runner()
    drafter = dispatcher()
    # The hooked initialize_kv_cache calls this once vLLM has resolved the graph mode.
    P.model_ready(runner, False)

    # vLLM's memory profiling captures a graph outside the capture loop and throws it away.
    runner._warmup_and_capture(runner.cudagraph_dispatcher.get_capture_descs()[0][1][0], CUDAGraphMode.PIECEWISE)
    # capture_model's loop.
    captured = []
    for mode, descs in runner.cudagraph_dispatcher.get_capture_descs():
        captured += [(mode.name, d.num_tokens) for d in descs]
        runner._capture_cudagraphs(batch_descriptors=descs, cudagraph_runtime_mode=mode, profiler=None)

    # Model Runner V2: the capture wrapper around a stand-in for CudaGraphManager.capture's loop.
    manager = object()

    def v2_capture_loop(self, create_forward_fn, progress_bar_desc="Capturing CUDA graphs"):
        for num_tokens in (16, 12):
            desc = NS(num_tokens=num_tokens)
            forward_fn = create_forward_fn(desc, warmup=True)
            forward_fn("NONE")  # warmup
            forward_fn = create_forward_fn(desc, warmup=False)
            forward_fn("NONE")  # capture

    def create_forward_fn(desc, warmup):
        return lambda mode: time.sleep(0.003)

    v2_capture = _hooks._graph_manager_capture(v2_capture_loop)
    S.capture_manager = manager
    v2_capture(manager, create_forward_fn)
    S.capture_manager = None

    # Steps: (decode request ids, prefill chunks).
    steps = [
        (["a", "b", "c"], {}),  # uniform decode of 3 -> FULL graph of 4
        (["a"], {"d": 4}),  # mixed 5 tokens -> PIECEWISE graph of 8
        ([], {"e": 20}),  # 20 tokens > 8, the largest graph -> eager
        (["a"], {}),  # decode of 1 -> FULL graph of 1
    ]
    decisions = []
    for decode, prefill in steps:
        so = scheduler_output(decode, prefill)
        tokens = [1] * len(decode) + list(prefill.values())
        step = P.begin_step(runner, so, False)
        mode, desc, *_ = runner._determine_batch_execution_and_padding(
            num_tokens=so.total_num_scheduled_tokens,
            num_reqs=len(tokens),
            num_scheduled_tokens_np=np.array(tokens, dtype=np.int32),
            max_num_scheduled_tokens=max(tokens),
        )
        drafter.dispatch(2)  # a drafter's dispatcher in the same step: not the step's decision
        P.end_step(step, False, False)
        decisions.append([so.total_num_scheduled_tokens, mode.name, desc.num_tokens])

    line = P.instrumentation_line()
    part = S.part_dir
    P.finalize_process()
    report = P.merge_run()
    with open(result_path, "w") as f:
        json.dump(
            {
                "wrapped": wrapped,
                "captured": captured,
                "dummy_runs": len(runner.dummy_runs),
                "decisions": decisions,
                "line": line,
                "part": part,
                "merged": report is not None,
                "errors": dict(S.errors),
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
