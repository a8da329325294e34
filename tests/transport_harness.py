"""Helpers for the transport tests: start `voicemesh serve transport` on free ports, talk to its
WebSocket endpoints, and read its JSON logs."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from support import START_S, Processes, free_port, wait_for_port, wait_serving

WAIT_S = 60.0  # default deadline of a wait: it returns as soon as the event comes; never a speed claim


@dataclass
class Transport:
    grpc_address: str
    http_url: str
    log_path: Path
    proc: object = None

    @property
    def ws_url(self) -> str:
        return self.http_url.replace("http://", "ws://")

    def log_entries(self) -> list[dict]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                pass
        return entries


def start_transport(procs: Processes, orchestrator: str, env: dict[str, str] | None = None, name: str = "transport",
                    extra: list[str] = ()) -> Transport:
    grpc_port, http_port = free_port(), free_port()
    full_env = {"VOICEMESH_ORCHESTRATOR_ADDR": orchestrator, "VOICEMESH_TRANSPORT_HTTP_PORT": str(http_port), **(env or {})}
    args = ["--host", "127.0.0.1", "--port", str(grpc_port), *extra]
    import sys

    proc = procs.start(name, [sys.executable, "-m", "voicemesh.runtime.serve", "transport", *args], full_env)
    wait_for_port(http_port, proc, timeout=START_S)  # fails at once if the process exits
    wait_serving(f"127.0.0.1:{grpc_port}", proc, timeout=START_S)
    return Transport(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", procs.log_dir / f"{name}.log", proc)


@dataclass
class WsClient:
    """Records every message of one WebSocket connection with the time it arrived."""

    ws: aiohttp.ClientWebSocketResponse
    events: list[dict] = field(default_factory=list)
    audio: list[bytes] = field(default_factory=list)
    audio_at: list[int] = field(default_factory=list)  # per audio message: how many events came before it
    close_code: int | None = None
    close_reason: str = ""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type == aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(message.data))
            elif message.type == aiohttp.WSMsgType.BINARY:
                self.audio.append(message.data)
                self.audio_at.append(len(self.events))
            else:  # CLOSE carries the code and reason; CLOSED/ERROR: the socket is gone
                if message.type == aiohttp.WSMsgType.CLOSE:
                    self.close_code, self.close_reason = message.data, message.extra or ""
                else:
                    self.close_code = self.ws.close_code or 1006
                self._changed.set()
                return
            self._changed.set()

    async def wait_until(self, condition, what: str, timeout: float = WAIT_S) -> None:
        """Until `condition()` holds (checked after every message), or fail saying what came."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.close_code is not None:
                raise AssertionError(f"closed ({self.close_code} {self.close_reason!r}) before {what}; "
                                     f"got {self.types()} and {len(self.audio)} audio messages")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f} s; got {self.types()} and {len(self.audio)} audio messages")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    async def wait_count(self, predicate, count: int, timeout: float = WAIT_S) -> list[dict]:
        """Until `count` events satisfy `predicate`; returns them all."""
        await self.wait_until(lambda: sum(1 for e in self.events if predicate(e)) >= count, f"{count} such events", timeout)
        return [e for e in self.events if predicate(e)]

    async def wait_for(self, predicate, timeout: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if self.close_code is not None:
                raise AssertionError(f"closed ({self.close_code} {self.close_reason!r}) before the event; got {self.types()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s; events so far: {self.types()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    async def wait_closed(self, timeout: float = WAIT_S) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.close_code is None and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        assert self.close_code is not None, f"still open after {timeout} s; events: {self.types()}"
        return self.close_code, self.close_reason

    def types(self) -> list[str]:
        return [e.get("type") or e.get("event") for e in self.events]

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind or e.get("event") == kind]


def is_type(kind: str, **fields):
    return lambda e: (e.get("type") == kind or e.get("event") == kind) and all(e.get(k) == v for k, v in fields.items())


class ws_session:
    """`async with ws_session(url) as client:` connects, reads in the background, and closes."""

    def __init__(self, url: str):
        self.url = url

    async def __aenter__(self) -> WsClient:
        self.http = aiohttp.ClientSession()
        ws = await self.http.ws_connect(self.url, max_msg_size=0, autoping=True)
        self.client = WsClient(ws)
        self.reader = asyncio.create_task(self.client.read())
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.http.close()


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


async def send_paced(send, frames: list[bytes], frame_ms: int = 20) -> None:
    """Send frames at real-time pace (the fake VAD counts 20 ms frames as they come)."""
    start = time.monotonic()
    for index, frame in enumerate(frames):
        try:
            await send(frame)
        except ConnectionError:
            return  # closed by the server: the caller's next wait reports the close code and reason
        await asyncio.sleep(max(0.0, start + (index + 1) * frame_ms / 1000 - time.monotonic()))


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]
