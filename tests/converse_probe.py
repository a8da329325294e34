"""A test client for Converse: send scripted input, record every event with its arrival time.

Waits are on events, each with a deadline that fails with the events seen so far. The default
deadline is long (WAIT_S): a wait returns as soon as its event comes, so only a failing test
pays for it, and on a loaded machine things can take 5-10 times as long as on an idle one."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
WAIT_S = 60.0  # default deadline of a wait; a liveness bound, never a speed claim


def tone(seconds: float, rate: int = 16000, amplitude: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


class ConverseProbe:
    def __init__(self, address: str, config: pb.SessionConfig | None = None, metadata=()):
        self.channel = grpc.aio.insecure_channel(address)
        self.call = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel).Converse(metadata=metadata or None)
        self.config = config or pb.SessionConfig(input_format=PCM16_16K)
        self.events: list[tuple[float, pb.ConverseResponse]] = []
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self._reader: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "ConverseProbe":
        await self.call.write(pb.ConverseRequest(config=self.config))
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self.call.cancel()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.events.append((time.monotonic(), response))
                self._changed.set()
            self.status = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self.status, self.details = err.code(), err.details()
        finally:
            self._changed.set()

    async def send_audio(self, samples: np.ndarray, chunk_ms: int = 40, realtime: bool = True, rate: int = 16000) -> None:
        step = rate * chunk_ms // 1000
        start = time.monotonic()
        for index, begin in enumerate(range(0, len(samples), step)):
            await self.call.write(pb.ConverseRequest(audio=common_pb2.AudioChunk(data=samples[begin : begin + step].tobytes())))
            if realtime:
                await asyncio.sleep(max(0.0, start + (index + 1) * chunk_ms / 1000 - time.monotonic()))

    async def send(self, request: pb.ConverseRequest) -> None:
        await self.call.write(request)

    async def send_text(self, text: str) -> None:
        await self.call.write(pb.ConverseRequest(text=pb.TextInput(text=text)))

    async def end(self) -> None:
        await self.call.write(pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession())))

    async def cancel(self) -> None:
        await self.call.write(pb.ConverseRequest(control=pb.SessionControl(cancel=pb.CancelSession())))

    async def speak_until(self, samples: np.ndarray, predicate, timeout: float = WAIT_S, chunk_ms: int = 40,
                          rate: int = 16000) -> pb.ConverseResponse:
        """Send `samples` in real time, then keep the microphone open (silence, in real time)
        until an event satisfies `predicate`; returns it. For a conversation that must wait
        for the bot, however long it takes, before the user goes on."""
        stop = asyncio.Event()

        async def microphone() -> None:
            await self.send_audio(samples, chunk_ms, rate=rate)
            quiet = silence(chunk_ms / 1000, rate)
            while not stop.is_set():  # one chunk at a time, so it never stops inside a write
                await self.send_audio(quiet, chunk_ms, rate=rate)

        mic = asyncio.create_task(microphone())
        try:
            return await self.wait_for(predicate, timeout)
        finally:
            stop.set()
            await asyncio.gather(mic, return_exceptions=True)  # a write after the stream ended: wait_for said why

    async def wait_for(self, predicate, timeout: float = WAIT_S) -> pb.ConverseResponse:
        """Wait until an event satisfies `predicate`; returns it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if self.status is not None:
                raise AssertionError(f"stream ended ({self.status}: {self.details}) before the event; got {self.kinds()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting; events so far: {self.kinds()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_closed(self, timeout: float = WAIT_S) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"stream still open after {timeout:.0f} s; events so far: {self.kinds()}") from None

    def kinds(self, skip_audio: bool = True) -> list[str]:
        """Event names in order; speaking events as their kind, e.g. 'speaking:BOT_STARTED'."""
        names = []
        for _, event in self.events:
            kind = event.WhichOneof("event")
            if kind == "audio" and skip_audio:
                continue
            if kind == "speaking":
                kind = "speaking:" + pb.SpeakingEvent.Kind.Name(event.speaking.kind).removeprefix("KIND_")
            if kind == "user_transcript" and not event.user_transcript.is_final:
                kind = "user_transcript:interim"
            names.append(kind)
        return names

    def of(self, kind: str) -> list:
        return [getattr(event, kind) for _, event in self.events if event.WhichOneof("event") == kind]

    def audio_bytes(self) -> bytes:
        return b"".join(a.chunk.data for a in self.of("audio"))


def event_is(event_kind: str, **fields):
    def predicate(event: pb.ConverseResponse) -> bool:
        if event.WhichOneof("event") != event_kind:
            return False
        body = getattr(event, event_kind)
        return all(getattr(body, name) == value for name, value in fields.items())

    return predicate
