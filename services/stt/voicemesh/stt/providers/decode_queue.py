"""One worker thread that runs every decode of every stream, most urgent first.

Whisper decodes cannot be interrupted and each one already uses all the model's threads, so
they run one at a time. What runs next matters when several are waiting: a final transcript
holds up a reply, an interim only refreshes a caption. So finals run before any queued
interim (in the order they were asked for), and an interim that nobody needs any more is
dropped before it starts: its stream finalized or closed (`discard`), or the stream queued a
newer one (same `key`). Only the decode already running is ever waited for.

Jobs are queued from event loops and resolved on the loop that queued them; the ordering
decisions are made under one lock, so they do not depend on timing.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

FINAL, INTERIM = 0, 1  # priorities: lower runs first
IDLE_CHECK_S = 1.0  # how often an idle worker checks whether the interpreter is exiting


class DecodeJob:
    """One queued call. `future` (on the loop that queued it) gets its result, its exception,
    or None when it was dropped unrun."""

    def __init__(self, fn: Callable[..., Any], args: tuple, final: bool, key: object,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.fn, self.args, self.final, self.key = fn, args, final, key
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.started = False  # set under the queue's lock when the worker takes it
        self.dropped = False

    def _resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """From any thread: hand the outcome to the job's loop (if that loop still runs)."""
        def settle() -> None:
            if self.future.done():  # its caller went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class DecodeQueue:
    """Priority queue of decodes in front of one dedicated thread (started on first use)."""

    def __init__(self, thread_name: str = "whisper") -> None:
        self._thread_name = thread_name
        self._lock = threading.Condition()
        self._heap: list[tuple[int, int, DecodeJob]] = []
        self._order = itertools.count()
        self._interims: dict[object, DecodeJob] = {}  # key -> its queued (not started) interim
        self._thread: threading.Thread | None = None
        self._closed = False
        self.skipped = 0  # interims dropped unrun, for logs and tests

    def submit(self, fn: Callable[..., Any], *args: Any, final: bool, key: object = None) -> DecodeJob:
        """Queue fn(*args) on the worker thread. An interim with a key replaces the queued,
        not yet started interim of the same key (that one resolves to None)."""
        job = DecodeJob(fn, args, final, key, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode queue is closed")
            if not final and key is not None:
                self._drop(self._interims.pop(key, None))
                self._interims[key] = job
            heapq.heappush(self._heap, (FINAL if final else INTERIM, next(self._order), job))
            if self._thread is None:
                # Not a daemon: at exit a running decode finishes (as with a ThreadPoolExecutor)
                # instead of being killed inside CTranslate2; an idle worker ends by itself.
                self._thread = threading.Thread(target=self._work, name=self._thread_name)
                self._thread.start()
            self._lock.notify()
        return job

    def discard(self, key: object, finals: bool = False) -> int:
        """Drop what `key` has queued and not started: its interim, and its finals if asked.
        Returns how many were dropped. A job already running is never affected."""
        with self._lock:
            dropped = int(self._drop(self._interims.pop(key, None)))
            if finals:
                for _, _, job in self._heap:
                    if job.key == key and job.final and not job.dropped:
                        dropped += self._drop(job)
            return dropped

    def pending(self) -> int:
        """Jobs queued and not dropped (the running one excluded)."""
        with self._lock:
            return sum(not job.dropped for _, _, job in self._heap)

    def close(self) -> None:
        """Drop everything queued; the running job finishes; the thread then ends."""
        with self._lock:
            self._closed = True
            for _, _, job in self._heap:
                self._drop(job)
            self._interims.clear()
            self._lock.notify()

    def _drop(self, job: DecodeJob | None) -> bool:
        """Under the lock: mark a queued job dropped (it stays in the heap until popped)."""
        if job is None or job.started or job.dropped:
            return False
        job.dropped = True
        if not job.final:
            self.skipped += 1
        job._resolve(None)
        return True

    def _next(self) -> DecodeJob | None:
        with self._lock:
            while True:
                while self._heap and self._heap[0][2].dropped:
                    heapq.heappop(self._heap)
                if self._heap:
                    job = heapq.heappop(self._heap)[2]
                    job.started = True
                    if self._interims.get(job.key) is job:
                        del self._interims[job.key]
                    return job
                if self._closed or not threading.main_thread().is_alive():
                    return None  # closed, or the interpreter is exiting and nobody closed us
                self._lock.wait(IDLE_CHECK_S)

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # noqa: BLE001 - the caller's future carries it
                job._resolve(error=exc)
            else:
                job._resolve(result)
