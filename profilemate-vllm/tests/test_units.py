"""Pieces that need no engine: the phase rule, post-import hooks, configuration errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace as NS

from profilemate_vllm._phase import DECODE, MIXED, PREFILL, classify


def so(new=(), cached=(), outputs=(), scheduled=None, resumed=(), spec=None):
    scheduled = scheduled or {}
    return NS(
        scheduled_new_reqs=[NS(req_id=r) for r in new],
        scheduled_cached_reqs=NS(req_ids=list(cached), num_output_tokens=list(outputs), resumed_req_ids=set(resumed)),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens=spec or {},
    )


def test_phase_from_the_request_mix():
    assert classify(so(new=["a"], scheduled={"a": 10})) == (PREFILL, 1)
    assert classify(so(cached=["a", "c"], outputs=[3, 7], scheduled={"a": 1, "c": 1})) == (DECODE, 2)
    # Chunked prefill: a prompt chunk of b next to a decode of a.
    assert classify(so(cached=["a", "b"], outputs=[4, 0], scheduled={"a": 1, "b": 36})) == (MIXED, 2)
    assert classify(so(new=["n"], cached=["a"], outputs=[4], scheduled={"a": 1, "n": 30})) == (MIXED, 2)
    # The last chunk of a prompt may be one token: still prefill (no output token yet).
    assert classify(so(cached=["b", "a"], outputs=[0, 5], scheduled={"b": 1, "a": 1})) == (MIXED, 2)
    assert classify(so(cached=["b"], outputs=[0], scheduled={"b": 1})) == (PREFILL, 1)
    # A resumed request recomputes: prefill, even with one token scheduled.
    assert classify(so(cached=["c"], outputs=[12], scheduled={"c": 1}, resumed=["c"])) == (PREFILL, 1)
    # Speculative decoding: 1 + drafts tokens is a decode step; more is a chunk.
    assert classify(so(cached=["a"], outputs=[20], scheduled={"a": 4}, spec={"a": [1, 2, 3]})) == (DECODE, 1)
    assert classify(so(cached=["a"], outputs=[20], scheduled={"a": 9}, spec={"a": [1, 2, 3]})) == (PREFILL, 1)


def test_post_import_hook_patches_when_the_module_is_imported(tmp_path):
    (tmp_path / "late_module.py").write_text("def f():\n    return 1\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from profilemate_vllm._imports import PostImportHooks
        hooks = PostImportHooks()
        hooks.when_imported("late_module", lambda m: setattr(m, "f", lambda: 2))
        assert "late_module" not in sys.modules and hooks.pending() == ["late_module"]
        import late_module
        assert late_module.f() == 2 and hooks.pending() == []
        print("ok")
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "ok", p.stderr


def test_configuration_errors_name_the_seed_variable(monkeypatch):
    from profilemate_vllm import _native

    monkeypatch.setenv("VLLM_PROFILING_DIR", "/tmp/x")
    monkeypatch.setenv("VLLM_PROFILING_LOG_INTERVAL", "often")
    try:
        _native.resolve_config()
        raise AssertionError("accepted a malformed value")
    except ValueError as e:
        assert "VLLM_PROFILING_LOG_INTERVAL" in str(e) and "often" in str(e)
    monkeypatch.setenv("VLLM_PROFILING_LOG_INTERVAL", "5")
    monkeypatch.setenv("VLLM_PROFILING_USE_CUDA_EVENTS", "0")
    config = json.loads(_native.resolve_config())
    assert config["dir"] == "/tmp/x" and config["log_interval"] == 5 and config["backend"] == "host"


def test_a_malformed_setting_disables_profiling_without_stopping_the_host(tmp_path):
    code = textwrap.dedent(
        """
        import logging, profilemate_vllm
        logging.basicConfig(level=logging.INFO)
        profilemate_vllm.register()
        print("active", profilemate_vllm.is_active())
        """
    )
    env = {"VLLM_PROFILING_DIR": str(tmp_path / "out"), "VLLM_PROFILING_DISABLE": "forward", "PATH": ""}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "active False" in p.stdout, p.stderr
    assert "VLLM_PROFILING_DISABLE" in p.stderr and not (tmp_path / "out").exists()
