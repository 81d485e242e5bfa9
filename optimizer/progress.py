"""Progress display for steps that take more than a moment (tracing, passes, writing).

On a terminal a step shows a live elapsed-time line that ends with a check mark; elsewhere
(logs, CI, pipes) each step prints one line when it ends. The Python API is silent by default.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterator


class Progress:
    def __init__(self, enabled: bool = False, stream: IO[str] | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        live = self.stream.isatty()
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(label, start, stop), daemon=True) if live else None
        if ticker:
            ticker.start()
        try:
            yield
        except BaseException:
            self._finish(label, start, stop, ticker, "failed")
            raise
        self._finish(label, start, stop, ticker, "done")

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def _tick(self, label: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(0.25):
            print(f"\r  {label} ... {time.perf_counter() - start:5.1f} s", end="", file=self.stream, flush=True)

    def _finish(self, label, start, stop, ticker, outcome) -> None:
        stop.set()
        if ticker:
            ticker.join()
        mark = {"done": "ok", "failed": "FAILED"}[outcome]
        prefix = "\r" if ticker else ""
        elapsed = time.perf_counter() - start
        print(f"{prefix}  {label} ... {elapsed:5.1f} s {mark}", file=self.stream, flush=True)
