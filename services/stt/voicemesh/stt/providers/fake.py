"""A scripted STT provider (see voicemesh.runtime.fakes for the script), with a late STT on
demand: a session whose id starts with "hold-" holds every final (and its end of utterance),
in order, until its release comes over `/fakes.Control/Release` (request: the session id),
a unary RPC this provider adds to its own server (`rpc_handlers`, registered by the runtime).
The release is applied in the RPC's handler on the server's loop: the held results are queued
before the RPC answers, so a caller that got the answer knows they are on their way. A release
that comes before the session opens applies when it does.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np

from voicemesh.runtime.fakes import (
    CONTROL_SERVICE, COUGH_PREFIX, HOLD_PREFIX, RELEASE, SILENT_PREFIX, FakeScript, is_loud,
)
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.stt.providers.base import SttEndOfUtterance, SttProvider, SttResult, SttStream, SttStreamConfig, SttTranscript

RATE_HZ = 16000


class FakeSttStream(SttStream):
    def __init__(self, provider: "FakeSttProvider", session_id: str, holding: bool):
        self._provider = provider
        self._script = provider.script
        self.session_id = session_id
        self.holding = holding
        self._held: list[SttResult] = []
        self._out: asyncio.Queue[SttResult | None] = asyncio.Queue()
        self._timers: list[asyncio.TimerHandle] = []  # finals on their way (stt_final_ms)
        self._turn_id = ""
        self._in_turn = False  # between a turn start and its final
        self._heard_ms = 0
        self._next_interim_ms = 0
        self._utterances = 0

    async def push_audio(self, pcm16: bytes) -> None:
        script = self._script
        if not self._in_turn or not script.words_per_second:
            return
        if is_loud(np.frombuffer(pcm16, dtype="<i2"), script.speech_rms):  # words come from speech only
            self._heard_ms += len(pcm16) * 1000 // (2 * RATE_HZ)
        if self._heard_ms >= self._next_interim_ms:
            self._next_interim_ms += script.interim_every_ms
            words = " ".join(f"w{n}" for n in range(1, 1 + self._heard_ms * script.words_per_second // 1000))
            if words:
                self._out.put_nowait(SttTranscript(text=words, is_final=False, turn_id=self._turn_id))

    async def turn_start(self, turn_id: str, audio_offset_ms: int) -> None:
        self._turn_id, self._in_turn = turn_id, True
        self._heard_ms, self._next_interim_ms = 0, self._script.interim_every_ms

    async def finalize(self) -> None:
        if not self._in_turn:
            return  # nothing heard since the last final (the servicer finalizes at the end of the stream)
        self._in_turn = False
        text = self._script.final_text(self._utterances)
        coughs = self.session_id.startswith(COUGH_PREFIX) and self._utterances > 0
        if self.session_id.startswith(SILENT_PREFIX) or coughs:
            text = ""
        self._utterances += 1
        self._provider.finals += 1
        final = [SttTranscript(text=text, is_final=True, confidence=1.0, turn_id=self._turn_id),
                 SttEndOfUtterance(offset_ms=0, turn_id=self._turn_id)]
        if self.holding:
            self._held.extend(final)  # a late STT: these go when the test releases them
        else:
            self._deliver(final, self._script.stt_final_ms)

    def release(self) -> None:
        self.holding = False
        self._deliver(self._held, 0.0)
        self._held = []

    def _deliver(self, results: list, delay_ms: float) -> None:
        if delay_ms <= 0:
            for result in results:
                self._out.put_nowait(result)
            return
        loop = asyncio.get_running_loop()
        self._timers = [handle for handle in self._timers if handle.when() > loop.time()]
        for result in results:  # the same delay for each, so they fire in order
            self._timers.append(loop.call_later(delay_ms / 1000, self._out.put_nowait, result))

    async def results(self) -> AsyncIterator[SttResult]:
        while (result := await self._out.get()) is not None:
            yield result

    async def close(self) -> None:
        self._provider.forget(self)
        self._deliver([None], self._script.stt_final_ms)  # after any final still on its way

    async def abort(self) -> None:
        self._provider.forget(self)
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._out.put_nowait(None)


class FakeSttProvider(SttProvider):
    name = "fake"

    def __init__(self, script: FakeScript | None = None):
        self.script = script or FakeScript.load()
        self.released: set[str] = set()  # "hold-" sessions whose finals may go
        self.holding: dict[str, set[FakeSttStream]] = {}
        self.streams = self.finals = 0

    async def load(self) -> None:
        pass

    def open_stream(self, config: SttStreamConfig) -> SttStream:
        session_id = config.session_id
        holding = session_id.startswith(HOLD_PREFIX) and session_id not in self.released
        stream = FakeSttStream(self, session_id, holding)
        if holding:
            self.holding.setdefault(session_id, set()).add(stream)
        self.streams += 1
        return stream

    def release(self, session_id: str) -> None:
        """Let the held finals of a "hold-" session go, now and from now on."""
        self.released.add(session_id)
        for stream in self.holding.pop(session_id, ()):
            stream.release()

    def forget(self, stream: FakeSttStream) -> None:
        streams = self.holding.get(stream.session_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self.holding[stream.session_id]

    def rpc_handlers(self) -> list[grpc.GenericRpcHandler]:
        """The control service, served on this provider's own server (see the module docstring)."""
        async def release(request: bytes, context) -> bytes:
            self.release(request.decode())
            return b""

        methods = {RELEASE: grpc.unary_unary_rpc_method_handler(release)}
        return [grpc.method_handlers_generic_handler(CONTROL_SERVICE, methods)]

    def info(self) -> ProviderInfo:
        held = sum(len(stream._held) for streams in self.holding.values() for stream in streams)
        details = {"streams": str(self.streams), "finals": str(self.finals), "held": str(held), **self.script.details}
        return ProviderInfo(provider="fake", model="scripted", sample_rates_hz=(RATE_HZ,), details=details)
