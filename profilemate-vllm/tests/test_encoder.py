"""The multimodal encoder hook, in real vLLM: a tiny random LLaVA (CLIP vision tower + Llama)
serving images on the CPU, in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import contract
from conftest import HERE, REPORT


@pytest.fixture(scope="session")
def llava(tmp_path_factory) -> str:
    import tiny_llava

    path = os.environ.get("PROFILEMATE_TEST_LLAVA") or str(tmp_path_factory.mktemp("tiny-llava"))
    return tiny_llava.build(path)


def test_vision_encoder_time_is_recorded_per_encoder_step(llava, tmp_path):
    out, counts = tmp_path / "profile", tmp_path / "counts.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PROFILING_", "PROFILEMATE_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_PROFILING_DIR=str(out),
    )
    cmd = [sys.executable, str(HERE / "drivers" / "multimodal.py"), "--model", llava, "--out", str(counts)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    vllm = json.loads(counts.read_text())
    assert vllm["finished"] == vllm["requests"]

    files = contract.validate(str(out))
    rows = files["encoder_decoder_timing.csv"]
    encoder = [r for r in rows if r["component"] == "encoder"]
    decoder = [r for r in rows if r["component"] == "decoder"]
    encoder_steps = [s for s in vllm["steps"] if s["num_encoder_inputs"] > 0]
    assert sum(s["num_encoder_inputs"] for s in vllm["steps"]) == vllm["images"]
    assert len(encoder) == len(encoder_steps) > 0
    assert all(r["context"] == "vision_encoder" and float(r["duration_ms"]) > 0 for r in encoder)
    assert len(decoder) == len(vllm["steps"]) == len(files["forward_pass_timing.csv"])
    summary = json.load(open(os.path.join(out, "encoder_decoder_summary.json")))
    assert summary["model_type"] == "encoder_decoder"
    assert summary["encoder"]["count"] == len(encoder) and 0 < summary["encoder_pct"] < 100
    REPORT.append(
        f"multimodal (tiny LLaVA, CPU): {vllm['images']} images encoded in {len(encoder_steps)} vLLM steps; "
        f"{len(encoder)} encoder rows (vision_encoder), {len(decoder)} decoder rows; "
        f"encoder {summary['encoder_pct']:.1f} % of component time"
    )
