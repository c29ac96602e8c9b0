"""Forward-pass timing on a GPU: CUDA events on PyTorch's current stream, never a sync.

Each step records a start and an end event (from a reused pool) around ``execute_model``. Events
are resolved later, oldest first, with ``Event.query()`` (which does not block): a resolved pair
becomes a forward row with the device time between the events. A row is therefore recorded a
step or two after its pass ran; its ``timestamp_sec`` is the resolution time minus the duration,
and its ``step`` the engine step its pass ran in (``Recorder.forward_of_step``).
At shutdown, pairs the device has not reached yet are dropped (counted in part.json).

Real CUDA is not exercised by the test suite (the test machines have no GPU); the logic is, on a
stand-in device that fails on any synchronisation (``tests/test_units.py``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, List, Tuple

from ._state import Profiling


class CudaTimer:
    def __init__(self, max_pending: int, state: Profiling) -> None:
        import torch

        self._state = state
        self._torch = torch
        self._free: List[Tuple[Any, Any]] = []
        self._pending: Deque[Tuple[Any, Any, Any]] = deque()
        self._start: Any = None
        self._max_pending = max(8, max_pending * 4)
        self.dropped = 0

    def _pair(self) -> Tuple[Any, Any]:
        if self._free:
            return self._free.pop()
        ev = self._torch.cuda.Event
        return ev(enable_timing=True), ev(enable_timing=True)

    def start(self) -> None:
        pair = self._pair()
        pair[0].record()
        self._start = pair

    def stop(self, meta: Any) -> None:
        pair = self._start
        if pair is None:
            return
        self._start = None
        pair[1].record()
        self._pending.append((pair[0], pair[1], meta))
        if len(self._pending) > self._max_pending:
            s, e, _ = self._pending.popleft()
            self._free.append((s, e))
            self.dropped += 1

    def poll(self, rec: Any) -> None:
        f_fwd, f_enc = self._state.f_fwd, self._state.f_enc
        pending = self._pending
        while pending and pending[0][1].query():
            s, e, (phase, nseq, ntok, step) = pending.popleft()
            ns = int(s.elapsed_time(e) * 1e6)
            self._free.append((s, e))
            if f_fwd or f_enc:
                # Recorded in the step its pass ran in (a later step is open by now).
                rec.forward_of_step(step, phase, nseq, ntok, ns)

    def drain(self, rec: Any) -> None:
        self.poll(rec)
        self.dropped += len(self._pending)
        self._pending.clear()
