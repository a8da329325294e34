"""One Converse stream per caller connection, whatever the protocol.

A protocol layer (WebSocket, Twilio, Telnyx, WebRTC) turns its wire messages into calls on a
ConverseBridge (audio, text, DTMF, end) and receives bot audio, "clear" and events through a
BridgeSink. The bridge batches caller audio into 40 ms chunks (message count is the gRPC
cost), derives "clear playback" from barge-in, and drops late audio of an interrupted turn.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import grpc

from voicemesh.runtime.streams import write_or_status
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

log = logging.getLogger("voicemesh.transport.bridge")
Speaking = pb.SpeakingEvent
WRITE_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)
BATCH_MS = 40
MAX_CHUNK_MS = 100
# The Converse API carries DTMF once ConverseRequest has a `dtmf` (DtmfInput{digit}) field.


def pcm16(rate_hz: int, channels: int = 1) -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=rate_hz, channels=channels)


def mulaw(rate_hz: int = 8000) -> common_pb2.AudioFormat:
    return common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=rate_hz, channels=1)


class BridgeSink(Protocol):
    """Where a connection's output goes. Each method may apply backpressure by awaiting."""

    async def audio(self, data: bytes) -> None: ...

    async def clear(self, turn_number: int) -> None: ...

    async def event(self, response: pb.ConverseResponse) -> None: ...


@dataclass
class Outcome:
    """How the Converse stream finished."""

    reason: str = ""  # SessionEnded reason name ("ENDED", "CANCELLED", "ERROR", "SHUTDOWN"), if one came
    code: grpc.StatusCode | None = None  # the stream's status, when it failed
    details: str = ""

    error: str = ""  # the fatal in-band Error that ended the session, if any

    @property
    def ok(self) -> bool:
        return self.code in (None, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) and self.reason != "ERROR"

    def describe(self) -> str:
        if self.reason == "ERROR":
            return f"session failed: {self.error or 'see the orchestrator logs'}"
        if not self.ok:
            return f"orchestrator: {self.code.name} {self.details}"
        return f"session ended: {(self.reason or 'closed').lower()}"


class ConverseBridge:
    def __init__(self, channel: grpc.aio.Channel, config: pb.SessionConfig, sink: BridgeSink, label: str):
        self.config = config
        self.sink = sink
        self.label = label  # protocol and peer, for logs
        self.session_id = config.session_id
        self.call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse()
        self.outcome = Outcome()
        self.dtmf_digits: list[str] = []
        self.opened_at = time.monotonic()
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._started = asyncio.get_running_loop().create_future()
        fmt = config.input_format
        frame_bytes = (2 if fmt.encoding == common_pb2.AUDIO_ENCODING_PCM16 else 1) * (fmt.channels or 1)
        self._frame_bytes = frame_bytes
        self._batch_bytes = fmt.sample_rate_hz * BATCH_MS // 1000 * frame_bytes
        self._max_bytes = fmt.sample_rate_hz * MAX_CHUNK_MS // 1000 * frame_bytes
        self._pending = bytearray()
        self._seq = 0
        self._closing = False
        # Playback state, for "clear": the bot is speaking between BOT_STARTED and BOT_STOPPED.
        self._bot_speaking = False
        self._cleared_turns: set[int] = set()
        self._playing_turn = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, timeout: float = 10.0) -> pb.SessionStarted:
        """Send the config and wait for SessionStarted; raises ConnectionError with the reason."""
        try:
            await write_or_status(self.call, pb.ConverseRequest(config=self.config))
        except grpc.aio.AioRpcError as err:  # the call's own status: refused (UNAUTHENTICATED ...) or unreachable
            self.outcome.code, self.outcome.details = err.code(), err.details() or ""
            raise ConnectionError(self.outcome.describe()) from None
        except WRITE_ERRORS as err:
            raise ConnectionError(f"orchestrator unreachable: {err}") from None
        self._reader = asyncio.create_task(self._read(), name=f"converse-{self.label}")
        try:
            started = await asyncio.wait_for(asyncio.shield(self._started), timeout)
        except asyncio.TimeoutError:
            self.call.cancel()
            raise ConnectionError(f"orchestrator did not start the session within {timeout:.0f} s") from None
        if started is None:
            raise ConnectionError(self.outcome.describe())
        self.session_id = started.session_id
        log.info("session opened", extra={"session_id": self.session_id, "connection": self.label})
        return started

    async def wait(self) -> Outcome:
        """Until the Converse stream is over."""
        if self._reader is not None:
            await asyncio.shield(self._reader)
        return self.outcome

    async def close(self) -> None:
        """Cancel the stream (the caller hung up or the connection broke) and wait for the reader."""
        self._closing = True
        self.call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    @property
    def done(self) -> bool:
        return self._reader is not None and self._reader.done()

    # -- caller to orchestrator ------------------------------------------------------------

    async def send_audio(self, data: bytes) -> None:
        """Caller audio in the session's input format; whole frames only (the protocol layer checks)."""
        self._pending += data
        while len(self._pending) >= self._batch_bytes:
            size = min(len(self._pending), self._max_bytes)
            size -= size % self._frame_bytes
            chunk, self._pending = bytes(self._pending[:size]), self._pending[size:]
            await self._write(pb.ConverseRequest(audio=common_pb2.AudioChunk(data=chunk, seq=self._seq)))
            self._seq += 1

    async def send_text(self, text: str) -> None:
        await self._write(pb.ConverseRequest(text=pb.TextInput(text=text)))

    async def send_dtmf(self, digit: str) -> None:
        """A keypad digit: counted, logged, and forwarded to Converse as DtmfInput."""
        self.dtmf_digits.append(digit)
        log.info("dtmf received", extra={"session_id": self.session_id, "connection": self.label, "digit": digit})
        await self._write(pb.ConverseRequest(dtmf=pb.DtmfInput(digit=digit)))

    async def end(self) -> None:
        """Graceful end: flush audio, let the bot finish its reply; the orchestrator then ends the stream."""
        if self._pending:
            chunk, self._pending = bytes(self._pending), bytearray()
            chunk = chunk[: len(chunk) - len(chunk) % self._frame_bytes]
            if chunk:
                await self._write(pb.ConverseRequest(audio=common_pb2.AudioChunk(data=chunk, seq=self._seq)))
        await self._write(pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession())))

    async def cancel(self) -> None:
        await self._write(pb.ConverseRequest(control=pb.SessionControl(cancel=pb.CancelSession())))

    async def _write(self, request: pb.ConverseRequest) -> None:
        if self.done:
            return
        async with self._write_lock:
            try:
                await self.call.write(request)
            except WRITE_ERRORS:
                pass  # the stream is over; the reader reports why

    # -- orchestrator to caller ------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for response in self.call:
                await self._dispatch(response)
            self.outcome.code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self.outcome.code, self.outcome.details = err.code(), err.details() or ""
            if not self._closing and err.code() != grpc.StatusCode.CANCELLED:
                log.info("converse failed", extra={"session_id": self.session_id, "connection": self.label,
                                                   "code": err.code().name, "details": err.details()})
        except Exception:  # noqa: BLE001 - a sink failure ends this connection only
            log.exception("bridge failed", extra={"connection": self.label})
            self.outcome.code, self.outcome.details = grpc.StatusCode.INTERNAL, "transport failed; see its logs"
            self.call.cancel()
        finally:
            if not self._started.done():
                self._started.set_result(None)

    async def _dispatch(self, response: pb.ConverseResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "audio":
            turn = response.audio.turn_number
            if turn not in self._cleared_turns:  # late audio of an interrupted reply is dropped
                self._playing_turn = turn
                await self.sink.audio(response.audio.chunk.data)
            return
        if kind == "session_started" and not self._started.done():
            self._started.set_result(response.session_started)
        elif kind == "speaking":
            if response.speaking.kind == Speaking.KIND_BOT_STARTED:
                self._bot_speaking = True
            elif response.speaking.kind == Speaking.KIND_BOT_STOPPED:
                self._bot_speaking = False
            elif response.speaking.kind == Speaking.KIND_USER_STARTED and self._bot_speaking:
                await self._clear(self._playing_turn)  # barge-in: stop playback at once
        elif kind == "clear_playback":  # the orchestrator's own barge-in signal
            await self._clear(response.clear_playback.turn_number)
            return
        elif kind == "turn_ended" and response.turn_ended.interrupted:
            await self._clear(response.turn_ended.turn_number)
        elif kind == "error" and response.error.fatal:
            error = response.error
            self.outcome.error = f"{error.source}: {error.code} {error.message}"
        elif kind == "session_ended":
            self.outcome.reason = pb.SessionEnded.Reason.Name(response.session_ended.reason).removeprefix("REASON_")
        await self.sink.event(response)

    async def _clear(self, turn_number: int) -> None:
        if turn_number in self._cleared_turns:
            return
        self._cleared_turns.add(turn_number)
        log.info("clear playback", extra={"session_id": self.session_id, "connection": self.label, "turn": turn_number})
        await self.sink.clear(turn_number)
