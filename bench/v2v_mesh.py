"""Side A of the voice-to-voice comparison: one turn on the embedded mesh through Converse.

The session is bench/embedded.py's (Smart Turn on, stop_secs 0.2: `smart_turn_defaults`), the
caller bench/v2v_pacing.py's. Every milestone is taken where the client sees it, in ms from
the end of the speech in the clip: USER_STOPPED (VAD stop wait plus Smart Turn), the final
transcript, the first bot text, the first bot audio (voice-to-voice); the turn's Metrics event
adds the LLM's and TTS's own time to first result (from their request, which the mesh sends
speculatively on the STT's pause transcript).
"""
from __future__ import annotations

import asyncio
import time

from bench.embedded import smart_turn_defaults
from bench.v2v_corpus import Clip
from bench.v2v_pacing import paced_send, since
from bench.v2v_stats import answered_right
from voicemesh.client import config_request
from voicemesh.client.session import SessionTracker, open_session
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

STAGES = ("user_stopped_ms", "stt_final_ms", "first_bot_text_ms", "llm_ttfb_ms", "tts_ttfb_ms")


async def mesh_turn(addr: str, clip: Clip, deadline_s: float = 30.0, interims: bool = True) -> dict:
    moments: dict[str, list[float]] = {"user_stopped": [], "final": [], "bot_text": [], "audio": [], "turn_ended": []}
    finals: list[tuple[float, str]] = []
    bot_texts: list[tuple[float, str]] = []
    ttfb: dict[str, float] = {}
    done = asyncio.Event()
    speech_end_at: list[float] = []

    def on_event(response):
        kind, now = response.WhichOneof("event"), time.monotonic()
        if kind == "speaking" and response.speaking.kind == pb.SpeakingEvent.KIND_USER_STOPPED:
            moments["user_stopped"].append(now)
        elif kind == "user_transcript" and response.user_transcript.is_final and response.user_transcript.text.strip():
            moments["final"].append(now)
            finals.append((now, response.user_transcript.text.strip()))
        elif kind == "bot_text" and response.bot_text.text.strip():
            moments["bot_text"].append(now)
            bot_texts.append((now, response.bot_text.text.strip()))
        elif kind == "audio":
            moments["audio"].append(now)
        elif kind == "metrics":
            ttfb.update(response.metrics.ttfb_ms)
        elif kind == "turn_ended":
            moments["turn_ended"].append(now)
            # The turn that answered the clip is over: its audio came after the speech ended.
            if speech_end_at and any(a >= speech_end_at[0] for a in moments["audio"]):
                done.set()

    tracker = SessionTracker(on_event)
    config = config_request(client="voicemesh-bench")
    smart_turn_defaults(config.config)
    config.config.metrics = True  # the per-turn Metrics event: the LLM's and TTS's time to first result
    config.config.interim_transcripts = interims  # on, as the clients ship; off: no caption decodes while speaking

    async def write(data: bytes) -> None:
        await call.write(pb.ConverseRequest(audio=common_pb2.AudioChunk(data=data)))

    async with open_session(addr, config, tracker, end_timeout=10.0) as call:
        if call is None:
            return {"failure": tracker.result.failure or "no session"}
        watcher = asyncio.create_task(_set_when(tracker.ended, done))
        try:
            # The speech end is recorded as it is sent, so a TurnEnded can end the turn at once.
            await paced_send(clip.samples, clip.speech_end, write, done, deadline_s, speech_end_at.append)
        finally:
            watcher.cancel()
    end = speech_end_at[0] if speech_end_at else None
    # Metrics may follow TurnEnded: read them once the session is over.
    row = {
        "v2v_ms": since(moments["audio"], end),
        "user_stopped_ms": since(moments["user_stopped"], end),
        "stt_final_ms": since(moments["final"], end),
        "first_bot_text_ms": since(moments["bot_text"], end),
        "llm_ttfb_ms": ttfb.get("llm"),
        "tts_ttfb_ms": ttfb.get("tts"),
        "transcript": " ".join(text for _, text in finals),
        "bot_text": " ".join(text for at, text in bot_texts if end is None or at >= end),
    }
    row["right"] = answered_right(row["bot_text"], clip.expected)
    if row["v2v_ms"] is None:
        row["failure"] = tracker.result.failure or "no bot audio after the end of speech"
    return row


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
