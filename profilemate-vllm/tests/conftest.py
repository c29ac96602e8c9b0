"""Fixtures: the tiny model, and real vLLM runs (each run once per test session)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

HERE = Path(__file__).parent
DRIVER = HERE / "drivers" / "generate.py"
sys.path.insert(0, str(HERE))

# What the tests learned, printed at the end of the session (cross-check figures).
REPORT: List[str] = []


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("profilemate-vllm figures")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> str:
    path = os.environ.get("PROFILEMATE_TEST_MODEL")
    if path:
        return path
    import tiny_model

    return tiny_model.build(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def mixtral() -> str:
    """The tiny random Mixtral (``tiny_mixtral.py``), cached next to the vLLM environment."""
    path = os.environ.get("PROFILEMATE_TEST_MIXTRAL")
    if not path:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(cache, "profilemate", "tiny-mixtral-v1")
    import tiny_mixtral

    return tiny_mixtral.build(path)


@dataclass
class Run:
    dir: Path
    counts: Dict[str, Any]
    log: str
    env: Dict[str, str] = field(default_factory=dict)

    def external(self, request_id: str) -> str:
        """vLLM's internal request id is the caller's id plus ``-`` and 8 hex digits."""
        return re.sub(r"-[0-9a-f]{8}$", "", request_id)

    def instrumentation_lines(self) -> List[str]:
        return [l for l in self.log.splitlines() if re.search(r"profilemate: \S+ pid \d+: instrumented", l)]


def run_vllm(
    model: str,
    tmp: Path,
    scenario: str,
    multiprocessing: bool,
    profiling: bool = True,
    extra_env: Optional[Dict[str, str]] = None,
    args: tuple = (),
    timeout: int = 600,
) -> Run:
    out = tmp / "profile"
    counts = tmp / "counts.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    if profiling:
        env["VLLM_PROFILING_DIR"] = str(out)
    env.update(extra_env or {})
    cmd = [sys.executable, str(DRIVER), "--model", model, "--scenario", scenario, "--out", str(counts), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    log = p.stdout + p.stderr
    (tmp / "run.log").write_text(log)
    assert p.returncode == 0, f"vLLM run failed ({p.returncode}); log tail:\n{log[-4000:]}"
    with open(counts) as f:
        return Run(out, json.load(f), log, env)


@pytest.fixture(scope="session")
def inproc_basic(model, tmp_path_factory) -> Run:
    return run_vllm(model, tmp_path_factory.mktemp("inproc-basic"), "basic", multiprocessing=False)


@pytest.fixture(scope="session")
def inproc_priority(model, tmp_path_factory) -> Run:
    return run_vllm(model, tmp_path_factory.mktemp("inproc-priority"), "priority", multiprocessing=False)


@pytest.fixture(scope="session")
def mp_basic(model, tmp_path_factory) -> Run:
    return run_vllm(model, tmp_path_factory.mktemp("mp-basic"), "basic", multiprocessing=True)


@pytest.fixture(scope="session")
def inproc_preempt(model, tmp_path_factory) -> Run:
    return run_vllm(model, tmp_path_factory.mktemp("inproc-preempt"), "preempt", multiprocessing=False)


@pytest.fixture(scope="session")
def inproc_spec(model, tmp_path_factory) -> Run:
    return run_vllm(model, tmp_path_factory.mktemp("inproc-spec"), "spec", multiprocessing=False)


@pytest.fixture(params=["inproc_basic", "mp_basic"])
def basic(request) -> Run:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def mp_preempt(model, tmp_path_factory) -> Run:
    return run_vllm(model, tmp_path_factory.mktemp("mp-preempt"), "preempt", multiprocessing=True)


@pytest.fixture(scope="session")
def inproc_moe(mixtral, tmp_path_factory) -> Run:
    return run_vllm(mixtral, tmp_path_factory.mktemp("inproc-moe"), "moe", multiprocessing=False)


@pytest.fixture(scope="session")
def mp_moe(mixtral, tmp_path_factory) -> Run:
    return run_vllm(mixtral, tmp_path_factory.mktemp("mp-moe"), "moe", multiprocessing=True)


@pytest.fixture(params=["inproc_moe", "mp_moe"])
def moe(request) -> Run:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def inproc_recompute(model, tmp_path_factory) -> Run:
    return run_vllm(model, tmp_path_factory.mktemp("inproc-recompute"), "recompute", multiprocessing=False)


@pytest.fixture(scope="session")
def inproc_moe_compiled(mixtral, tmp_path_factory) -> Run:
    """The MoE scenario under torch.compile (vLLM's default), with the CPU platform's CI setting:
    Dynamo traces the model into a graph run by its eager backend (an engine start of seconds,
    not the half minute of inductor on two cores)."""
    return run_vllm(
        mixtral,
        tmp_path_factory.mktemp("inproc-moe-compiled"),
        "moe_compiled",
        multiprocessing=False,
        extra_env={"VLLM_CPU_CI_ENV": "1"},
    )


@pytest.fixture(scope="session")
def inproc_moe_inductor(mixtral, tmp_path_factory) -> Run:
    """The MoE scenario compiled by inductor, vLLM's default on a CPU (about half a minute of
    compilation on two cores), with a compile cache of its own."""
    tmp = tmp_path_factory.mktemp("inproc-moe-inductor")
    return run_vllm(mixtral, tmp, "moe_compiled", multiprocessing=False, extra_env={"VLLM_CACHE_ROOT": str(tmp / "vllm-cache")})


@pytest.fixture(scope="session")
def mp_moe_compiled(mixtral, tmp_path_factory) -> Run:
    """As ``inproc_moe_compiled``, with the engine and the model in their own processes."""
    return run_vllm(
        mixtral,
        tmp_path_factory.mktemp("mp-moe-compiled"),
        "moe_compiled",
        multiprocessing=True,
        extra_env={"VLLM_CPU_CI_ENV": "1"},
    )


@pytest.fixture(params=["inproc_moe_compiled", "inproc_moe_inductor", "mp_moe_compiled"])
def moe_compiled(request) -> Run:
    return request.getfixturevalue(request.param)
