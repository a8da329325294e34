"""What every fake cloud provider shares: its own event loop on a thread, a log of what it saw.

A fake speaks one provider's real wire protocol on 127.0.0.1 (a gRPC server from the vendor's
own stubs, an HTTP or WebSocket server with the documented message shapes), so the real SDK
talks to it unmodified but for the endpoint. It runs in the test process, on a thread of its
own, so a test can both drive a service process and see what reached the provider: the
requests, the audio, whether the upstream call was cancelled. What it answers comes from a
backend (tests/cloud/fakes/backends.py): scripted, or the embedded models behind the real
voicemesh services, for the swap test.

A fake is told to fail with `fail_next(kind)`: the next request gets the provider's own
answer for that error class (bad credentials, throttling, unknown model or voice, bad
format), as the real provider would send it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

ERROR_CLASSES = ("auth", "throttle", "not_found", "bad_format", "unavailable")


class FakeProvider:
    """Base of every fake: subclasses implement `_start()` (bind on 127.0.0.1, set `self.port`)
    and `_stop()`, both on the fake's own loop."""

    name = "fake"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.events: list[tuple[str, Any]] = []  # what the fake saw, in order: (kind, detail)
        self._changed = threading.Condition()
        self._failures: list[str] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"fake-{self.name}", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeProvider":
        self._thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self._stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def call(self, coroutine: Coroutine, timeout: float = 60.0):
        """Run a coroutine on the fake's loop from the test's thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    # --- what it saw -------------------------------------------------------------------------
    def record(self, kind: str, detail: Any = None) -> None:
        """Called by the fake (any thread) for everything a test may wait on."""
        with self._changed:
            self.events.append((kind, detail))
            self._changed.notify_all()

    def seen(self, kind: str) -> list[Any]:
        with self._changed:
            return [detail for seen, detail in self.events if seen == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 60.0, where: Callable[[Any], bool] | None = None) -> list:
        """Block until `count` events of `kind` (matching `where`) were recorded; the failure says
        everything that was seen instead."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matching = [d for k, d in self.events if k == kind and (where is None or where(d))]
                if len(matching) >= count:
                    return matching
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(k, repr(d)[:80]) for k, d in self.events]
                    raise AssertionError(f"{self.name}: waited {timeout:.0f} s for {count} x {kind!r}; saw {seen}")
                self._changed.wait(left)

    # --- failures on demand --------------------------------------------------------------------
    def fail_next(self, error_class: str) -> None:
        """The next request fails as the provider fails for `error_class` (ERROR_CLASSES)."""
        assert error_class in ERROR_CLASSES, error_class
        with self._changed:
            self._failures.append(error_class)

    def take_failure(self) -> str | None:
        """For the fake: the failure the next request must get, if one was asked for."""
        with self._changed:
            return self._failures.pop(0) if self._failures else None
