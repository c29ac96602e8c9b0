"""Every method the plugin wraps exists in the installed vLLM with the signature it expects,
Model Runner V2's included (it cannot run on a CPU, so this is what can be checked here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from profilemate_vllm._hooks import SPECS, V2_SPECS, check


def test_model_runner_v2_is_among_the_hooks():
    assert {(s.cls, s.method) for s in V2_SPECS} == {
        ("GPUModelRunner", "execute_model"),
        ("GPUModelRunner", "prepare_inputs"),
        ("GPUModelRunner", "sample_tokens"),
        ("EncoderRunner", "execute_mm_encoder"),
        ("GPUModelRunner", "initialize_kv_cache"),
        ("GPUModelRunner", "capture_model"),
        ("CudaGraphManager", "capture"),
    }


def test_the_trackers_hooks_are_among_the_specs():
    tracked = {(s.cls, s.method): s.trackers for s in SPECS if s.trackers}
    assert tracked == {
        ("GPUModelRunner", "initialize_kv_cache"): ("cuda_graph", "moe_expert"),
        ("CudagraphDispatcher", "dispatch"): ("cuda_graph",),
        ("GPUModelRunner", "_capture_cudagraphs"): ("cuda_graph",),
        ("GPUModelRunner", "_warmup_and_capture"): ("cuda_graph",),
        ("GPUModelRunner", "capture_model"): ("cuda_graph",),
        ("CudaGraphManager", "capture"): ("cuda_graph",),
        ("FusedMoERouter", "select_experts"): ("moe_expert",),
        ("MoERunner", "__init__"): ("moe_expert",),
    }


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.module}.{s.cls}.{s.method}")
def test_wrapped_method_exists_with_the_expected_signature(spec):
    func, status = check(spec)
    assert status == "ok", status
    assert func is not None


def test_a_changed_signature_is_refused(monkeypatch):
    spec = SPECS[0]._replace(params=("self", "something_else"))
    func, status = check(spec)
    assert func is None and status.startswith("unexpected signature Scheduler.schedule(self, throttle_prefills)")


def test_check_command():
    p = subprocess.run([sys.executable, "-m", "profilemate_vllm", "check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("ok  ") == len(SPECS)
