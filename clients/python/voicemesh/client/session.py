"""A Converse session from the client's side: stream a recording to the orchestrator in real
time and time each reply (`talk_session`, behind `voicemesh talk`), and the session plumbing
(`SessionTracker`, `open_session`) that the typed chat shares.

Latency is measured from the input audio itself, not from server events: the end of each
speech segment (found by `wavio.speech_segments`) happens when the chunk holding its last
sample is sent, and the turn's latency runs from then to the first bot audio of the reply.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from voicemesh.client.channel import END_REQUEST, OUTPUT_RATE_HZ, WRITE_ERRORS, config_request, open_channel, wait_event
from voicemesh.client.wavio import SEND_RATE_HZ, Segment, assign_latencies, send_time, speech_segments, to_pcm16
from voicemesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

CHUNK_MS = 40
END_REASONS = {v.number: v.name.removeprefix("REASON_") for v in orchestrator_pb2.SessionEnded.Reason.DESCRIPTOR.values}
TURN_REASONS = {v.number: v.name.removeprefix("REASON_") for v in orchestrator_pb2.TurnEnded.Reason.DESCRIPTOR.values}
pb = orchestrator_pb2


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class ServerError:
    code: str
    message: str
    source: str = ""
    fatal: bool = False

    def __str__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"{self.code}{where}: {self.message}" + (" (fatal)" if self.fatal else "")


@dataclass
class TurnResult:
    number: int
    user_transcript: str = ""
    bot_text: str = ""
    latency_ms: float | None = None  # client-measured, from the input audio
    server_latency_ms: float | None = None  # TurnEnded.latency_ms
    interrupted: bool = False
    ended: bool = False
    reason: str = ""  # TurnEnded reason: "ANSWERED", "INTERRUPTED", "NO_SPEECH", ...
    delayed: bool = False  # a TurnDelayed came (the final transcript was late)

    def to_json(self) -> dict:
        return {
            "number": self.number,
            "user_transcript": self.user_transcript,
            "bot_text": self.bot_text,
            "latency_ms": _round(self.latency_ms),
            "server_latency_ms": _round(self.server_latency_ms),
            "interrupted": self.interrupted,
            "reason": self.reason,
            "delayed": self.delayed,
        }


@dataclass
class TalkResult:
    session_id: str = ""
    turns: list[TurnResult] = field(default_factory=list)
    user_transcripts: list[str] = field(default_factory=list)  # final transcripts, in arrival order
    bot_audio: bytearray = field(default_factory=bytearray)  # PCM16 mono at output_rate_hz
    output_rate_hz: int = OUTPUT_RATE_HZ
    segments: list[Segment] = field(default_factory=list)  # speech found in the input
    errors: list[ServerError] = field(default_factory=list)  # Error events
    end_reason: str = ""  # SessionEnded reason name ("ENDED", "ERROR", ...); "" if none came
    failure: str = ""  # gRPC status or protocol problem that ended the call

    @property
    def bot_texts(self) -> list[str]:
        return [turn.bot_text for turn in self.turns if turn.bot_text]

    @property
    def audio_seconds(self) -> float:
        return len(self.bot_audio) / 2 / self.output_rate_hz

    @property
    def ok(self) -> bool:
        return not self.failure and self.end_reason not in ("ERROR", "") and not any(e.fatal for e in self.errors)

    def to_json(self) -> dict:
        return {
            "user_transcripts": list(self.user_transcripts),
            "bot_texts": self.bot_texts,
            "turns": [turn.to_json() for turn in self.turns],
            "audio_seconds": round(self.audio_seconds, 3),
            "session_id": self.session_id,
        }


class SessionTracker:
    """Folds Converse responses into a TalkResult and the facts the sender waits on."""

    def __init__(self, on_event: Callable[[orchestrator_pb2.ConverseResponse], None] | None = None):
        self.result = TalkResult()
        self.on_event = on_event
        self.turns: dict[int, TurnResult] = {}
        self.open_turns: set[int] = set()
        self.first_audio: dict[int, float] = {}  # turn -> monotonic arrival of its first audio
        self.user_speaking = 0  # USER_STARTED minus USER_STOPPED
        self.last_turn_end = float("-inf")
        self.last_event = time.monotonic()
        self.latest_turn = 0
        self.started = asyncio.Event()
        self.ended = asyncio.Event()  # set once the response stream is over, for any reason
        self.changed = asyncio.Event()  # set (and replaced) on every event, for waiters

    def turn(self, number: int) -> TurnResult:
        number = number or self.latest_turn  # tolerate a missing turn number
        if number not in self.turns:
            self.turns[number] = TurnResult(number)
        return self.turns[number]

    def handle(self, response: orchestrator_pb2.ConverseResponse) -> None:
        now = self.last_event = time.monotonic()
        kind = response.WhichOneof("event")
        event = getattr(response, kind) if kind else None
        result = self.result
        if kind == "session_started":
            result.session_id = event.session_id
            result.output_rate_hz = event.output_format.sample_rate_hz or OUTPUT_RATE_HZ
            self.started.set()
        elif kind == "audio":
            number = event.turn_number or self.latest_turn
            self.first_audio.setdefault(number, now)
            result.bot_audio += event.chunk.data
        elif kind == "user_transcript" and event.is_final and event.text.strip():
            text = event.text.strip()
            turn = self.turn(event.turn_number)
            turn.user_transcript = f"{turn.user_transcript} {text}".strip()
            result.user_transcripts.append(text)
        elif kind == "bot_text" and event.text.strip():
            turn = self.turn(event.turn_number)
            turn.bot_text = f"{turn.bot_text} {event.text.strip()}".strip()
        elif kind == "speaking":
            if event.kind == pb.SpeakingEvent.KIND_USER_STARTED:
                self.user_speaking += 1
            elif event.kind == pb.SpeakingEvent.KIND_USER_STOPPED:
                self.user_speaking = max(0, self.user_speaking - 1)
        elif kind == "turn_started":
            self.latest_turn = max(self.latest_turn, event.turn_number)
            self.turn(event.turn_number)
            self.open_turns.add(event.turn_number)
        elif kind == "turn_ended":
            turn = self.turn(event.turn_number)
            turn.ended, turn.interrupted = True, event.interrupted
            turn.reason = TURN_REASONS.get(event.reason, str(event.reason))
            turn.server_latency_ms = event.latency_ms or None
            self.open_turns.discard(event.turn_number)
            self.last_turn_end = now
        elif kind == "turn_delayed":
            self.turn(event.turn_number).delayed = True
        elif kind == "error":
            result.errors.append(ServerError(event.code, event.message, event.source, event.fatal))
        elif kind == "session_ended":
            result.end_reason = END_REASONS.get(event.reason, str(event.reason))
        if self.on_event is not None:
            self.on_event(response)
        # A fresh Event per change: a waiter holding the old one sees it set even if it
        # only starts waiting after this event was handled, so no change is ever missed.
        self.changed.set()
        self.changed = asyncio.Event()

    def reply_complete(self, last_speech_end: float | None) -> bool:
        """Every started turn has ended, nobody is speaking, and the last utterance was answered."""
        if self.open_turns or self.user_speaking > 0:
            return False
        return last_speech_end is None or self.last_turn_end >= last_speech_end

    def finish(self) -> TalkResult:
        self.result.turns = [self.turns[n] for n in sorted(self.turns)]
        return self.result


async def read_responses(call, tracker: SessionTracker) -> None:
    """Feed every response to the tracker; record how the call ended."""
    try:
        async for response in call:
            tracker.handle(response)
        if not tracker.result.end_reason:
            tracker.result.failure = "PROTOCOL: the server closed the stream without SessionEnded"
    except grpc.aio.AioRpcError as err:
        # A local cancel after SessionEnded, or after a failure already recorded, is not news.
        local_cancel = err.code() == grpc.StatusCode.CANCELLED and (tracker.result.end_reason or tracker.result.failure)
        if not local_cancel and not tracker.result.failure:
            tracker.result.failure = f"{err.code().name}: {err.details()}"
    finally:
        tracker.ended.set()


@contextlib.asynccontextmanager
async def open_session(addr: str, config: orchestrator_pb2.ConverseRequest, tracker: SessionTracker,
                       start_timeout: float = 30.0, end_timeout: float = 30.0):
    """One Converse call: yields it once SessionStarted has come, or None when it never did
    (the tracker's result says why). On a normal exit sends End and waits for the stream to
    close; on any exit cancels what is still open and closes the channel."""
    channel = open_channel(addr)
    call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse()
    reader = asyncio.create_task(read_responses(call, tracker))
    result = tracker.result
    try:
        with contextlib.suppress(*WRITE_ERRORS):  # on failure the reader records why
            await call.write(config)
        started = await wait_event(tracker.started, tracker.ended, start_timeout)
        if not started and not tracker.ended.is_set():
            result.failure = f"DEADLINE_EXCEEDED: no SessionStarted within {start_timeout:.0f} s"
        yield call if started else None
        if started and not tracker.ended.is_set():
            with contextlib.suppress(*WRITE_ERRORS):
                await call.write(END_REQUEST)
            if not await wait_event(tracker.ended, tracker.ended, end_timeout) and not result.end_reason:
                result.failure = f"DEADLINE_EXCEEDED: no SessionEnded within {end_timeout:.0f} s of End"
    finally:
        if not tracker.ended.is_set():
            call.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await channel.close()


async def talk_session(
    addr: str,
    samples_16k: np.ndarray,
    *,
    system_prompt: str = "",
    voice: str = "",
    wait_after: float = 20.0,
    session_id: str = "",
    on_event: Callable[[orchestrator_pb2.ConverseResponse], None] | None = None,
    start_timeout: float = 30.0,
    end_timeout: float = 30.0,
    chunk_ms: int = CHUNK_MS,
    configure: Callable[[orchestrator_pb2.SessionConfig], None] | None = None,
) -> TalkResult:
    """Run one Converse session with `samples_16k` (16 kHz mono; int16, or float in [-1, 1])
    streamed in real time, then silence until the bot has answered (or `wait_after` seconds
    pass with no server event), then End. Never raises for server-side failures: see
    `TalkResult.ok`, `.failure`, `.errors`. `configure` may adjust the session config first."""
    samples = samples_16k if samples_16k.dtype == np.int16 else to_pcm16(np.asarray(samples_16k, np.float32), SEND_RATE_HZ)
    chunk = SEND_RATE_HZ * chunk_ms // 1000
    segments = speech_segments(samples, SEND_RATE_HZ)
    tracker = SessionTracker(on_event)
    tracker.result.segments = segments
    sent_at: list[float] = []  # monotonic time each chunk actually left
    config = config_request(system_prompt, voice, session_id, client="voicemesh-talk")
    if configure is not None:
        configure(config.config)
    async with open_session(addr, config, tracker, start_timeout, end_timeout) as call:
        if call is not None:
            await _stream_audio(call, tracker, samples, chunk, wait_after, sent_at)
    # A segment ends when the chunk holding its last sample is sent.
    ends = [sent_at[(seg.end - 1) // chunk] for seg in segments if (seg.end - 1) // chunk < len(sent_at)]
    for number, latency in assign_latencies(ends, tracker.first_audio).items():
        tracker.turn(number).latency_ms = latency
    return tracker.finish()


async def _stream_audio(call, tracker: SessionTracker, samples: np.ndarray, chunk: int, wait_after: float,
                        sent_at: list[float]) -> None:
    """The input in real time, then silence until the last turn is answered or the server idles."""
    chunk_seconds, chunk_ms = chunk / SEND_RATE_HZ, 1000 * chunk // SEND_RATE_HZ
    last_segment = tracker.result.segments[-1] if tracker.result.segments else None
    # The clock starts once the session is ready, so no audio queues up behind setup.
    start = time.monotonic()
    index, audio_done, last_speech_end = 0, None, None
    while not tracker.ended.is_set():
        if index * chunk < len(samples):
            data = samples[index * chunk : (index + 1) * chunk].astype("<i2").tobytes().ljust(2 * chunk, b"\0")
        else:
            if audio_done is None:
                audio_done = time.monotonic()
                last_speech_end = sent_at[(last_segment.end - 1) // chunk] if last_segment else None
            idle = time.monotonic() - max(audio_done, tracker.last_event)
            if tracker.reply_complete(last_speech_end) or idle >= wait_after:
                return
            data = bytes(2 * chunk)
        request = pb.ConverseRequest(audio=common_pb2.AudioChunk(data=data, seq=index, offset_ms=index * chunk_ms))
        await asyncio.sleep(max(0.0, send_time(start, index, chunk_seconds) - time.monotonic()))
        try:
            await call.write(request)
        except WRITE_ERRORS:
            return
        sent_at.append(time.monotonic())
        index += 1
