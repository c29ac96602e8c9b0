"""Runs a callback right after a module is imported, without importing it earlier.

The plugin is loaded by vLLM in every process before most of vLLM's engine modules are imported
(in a worker, before the platform has replaced its Triton kernels). Importing the modules we
patch at that point would change vLLM's import order, so modules not yet imported are patched
the moment vLLM itself imports them: a finder placed first on ``sys.meta_path`` wraps the
loader of just those modules and calls back once the module has executed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Callable, Dict, List

Callback = Callable[[ModuleType], None]


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str, hooks: "PostImportHooks") -> None:
        self._loader = loader
        self._name = name
        self._hooks = hooks

    def create_module(self, spec):  # type: ignore[override]
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        self._hooks._fire(self._name, module)

    def __getattr__(self, item: str):
        # get_source, is_package, get_code...: whatever the real loader offers.
        return getattr(self._loader, item)


class PostImportHooks(importlib.abc.MetaPathFinder):
    """``when_imported(name, callback)``: now if the module is loaded, else right after it is."""

    def __init__(self) -> None:
        self._pending: Dict[str, List[Callback]] = {}
        self._lock = threading.RLock()
        self._installed = False

    def when_imported(self, name: str, callback: Callback) -> None:
        with self._lock:
            module = sys.modules.get(name)
            if module is not None:
                callback(module)
                return
            self._pending.setdefault(name, []).append(callback)
            if not self._installed:
                sys.meta_path.insert(0, self)
                self._installed = True

    def pending(self) -> List[str]:
        with self._lock:
            return sorted(self._pending)

    def find_spec(self, fullname, path, target=None):  # type: ignore[override]
        if fullname not in self._pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader, fullname, self)
        return spec

    def _fire(self, name: str, module: ModuleType) -> None:
        with self._lock:
            callbacks = self._pending.pop(name, [])
            if not self._pending and self._installed:
                try:
                    sys.meta_path.remove(self)
                except ValueError:
                    pass
                self._installed = False
        for cb in callbacks:
            cb(module)
