"""Progress display for steps that take more than a moment (tracing, passes, writing).

Steps shorter than half a second print nothing. On a terminal a longer step shows a live
elapsed-time line that ends with "ok"; elsewhere (logs, CI, pipes) it prints one line when it
ends. A failing step erases its live line and prints nothing: the error says what went wrong.
The Python API is silent by default.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterator

QUIET_SECONDS = 0.5


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
        stop = threading.Event()
        ticker = None
        if self.stream.isatty():
            ticker = threading.Thread(target=self._tick, args=(label, start, stop), daemon=True)
            ticker.start()
        try:
            yield
        except BaseException:
            self._stop(stop, ticker)
            if ticker:
                print("\r\033[K", end="", file=self.stream, flush=True)
            raise
        self._stop(stop, ticker)
        elapsed = time.perf_counter() - start
        if elapsed >= QUIET_SECONDS:
            prefix = "\r" if ticker else ""
            print(f"{prefix}  {label} ... {elapsed:5.1f} s ok", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def _tick(self, label: str, start: float, stop: threading.Event) -> None:
        if stop.wait(QUIET_SECONDS):
            return
        while not stop.wait(0.25):
            print(f"\r  {label} ... {time.perf_counter() - start:5.1f} s", end="", file=self.stream, flush=True)

    @staticmethod
    def _stop(stop: threading.Event, ticker: threading.Thread | None) -> None:
        stop.set()
        if ticker:
            ticker.join()
