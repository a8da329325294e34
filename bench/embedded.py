"""Voice-to-voice and barge-in on the embedded stack (real models, every service a process).

- Voice-to-voice: `voicemesh talk`'s session (`talk_session`) on question_capital.wav, N
  times, with the embedded stack's defaults made explicit (Smart Turn on, stop_secs 0.2);
  latency is end of user speech in the file to first bot audio at the client. The
  per-stage breakdown is what the client can see: USER_STOPPED (the VAD stop wait, then
  Smart Turn's end-of-turn decision), the final transcript (STT final), first audio (the
  reply after the final). The LLM's first token and
  TTS's first audio are also timed by calling those services directly (serial costs: in the
  pipeline they mostly run early, speculatively, during the VAD stop wait).
- Barge-in: counting_long.wav asks for a long reply; 1 s after its first audio arrives the
  client starts speaking again (the speech of question_capital.wav). Latency is from the
  onset of that speech (its first frame sent) to the moment bot audio has stopped at the
  client: the later of the interrupted turn's last audio arriving and the interruption
  event (USER_STARTED) arriving, on which a client drops what it has not played. Also
  reported: each of the two, and the end of playout of the audio already received (a
  client that does not flush; the orchestrator sends audio 250 ms ahead).
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from bench.stats import percentile
from voicemesh.client import config_request
from voicemesh.client.session import SessionTracker, open_session, talk_session
from voicemesh.v1 import common_pb2, llm_pb2, llm_pb2_grpc, orchestrator_pb2 as pb, tts_pb2, tts_pb2_grpc
from voicemesh.client.wavio import load_for_sending

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
Speaking = pb.SpeakingEvent
CHUNK_MS = 20
STOP_SECS = 0.2  # the VAD's pause before Smart Turn is asked (the default with Smart Turn on)


def smart_turn_defaults(config: pb.SessionConfig) -> None:
    config.turn.smart_turn = True
    config.vad.stop_secs = STOP_SECS


async def voice_to_voice(addr: str, runs: int) -> dict:
    samples = load_for_sending(FIXTURES / "question_capital.wav")
    rows = [await one_voice_to_voice(addr, samples) for _ in range(runs)]
    return summarise_voice_to_voice(rows)


async def one_voice_to_voice(addr: str, samples: np.ndarray) -> dict:
    """One session on `samples`: its first turn's latency and client-visible stages, and how many
    turns were spoken (speech segments in the input) and answered (bot audio arrived for them)."""
    seen: dict[str, float] = {}

    def on_event(response):
        kind = response.WhichOneof("event")
        now = time.monotonic()
        if kind == "speaking" and response.speaking.kind == Speaking.KIND_USER_STOPPED:
            seen.setdefault("user_stopped", now)
        elif kind == "user_transcript" and response.user_transcript.is_final:
            seen.setdefault("final", now)
        elif kind == "audio":
            seen.setdefault("first_audio", now)

    started = time.monotonic()
    result = await talk_session(addr, samples, on_event=on_event, wait_after=15.0, chunk_ms=CHUNK_MS,
                                configure=smart_turn_defaults)
    counts = {"turns_spoken": len(result.segments),
              "turns_answered": sum(1 for t in result.turns if t.latency_ms is not None),
              "session_s": round(time.monotonic() - started, 3)}
    turn = result.turns[0] if result.turns else None
    missing = sorted({"user_stopped", "final", "first_audio"} - seen.keys())
    if turn is None or turn.latency_ms is None or missing:
        failure = result.failure or (f"no {', '.join(missing)}" if missing else "no latency for the turn")
        return {"ok": False, "failure": failure, **counts}
    speech_end = seen["first_audio"] - turn.latency_ms / 1000
    return {
        "ok": True,
        "total_ms": turn.latency_ms,
        "server_ms": turn.server_latency_ms,
        "end_of_turn_ms": (seen["user_stopped"] - speech_end) * 1000 - STOP_SECS * 1000,
        "stt_final_ms": (seen["final"] - seen["user_stopped"]) * 1000,
        "reply_after_final_ms": (seen["first_audio"] - seen["final"]) * 1000,
        "bot_text": turn.bot_text,
        **counts,
    }


def summarise_voice_to_voice(rows: list[dict]) -> dict:
    good = [row for row in rows if row["ok"]]
    keys = ("end_of_turn_ms", "stt_final_ms", "reply_after_final_ms")
    return {
        "runs": len(rows),
        "ok_runs": len(good),
        "turns_spoken": sum(r.get("turns_spoken", 0) for r in rows),
        "turns_answered": sum(r.get("turns_answered", 0) for r in rows),
        "vad_stop_wait_ms": STOP_SECS * 1000,
        "p50": _pct([r["total_ms"] for r in good], 50),
        "p90": _pct([r["total_ms"] for r in good], 90),
        "server_p50": _pct([r["server_ms"] for r in good if r["server_ms"]], 50),
        "breakdown_p50": {key: _pct([r[key] for r in good], 50) for key in keys},
        "replies": sorted({r["bot_text"] for r in good}),
        "failures": [r["failure"] for r in rows if not r["ok"]],
    }


async def stage_costs(addrs: dict[str, str], runs: int) -> dict:
    """Serial cost of the LLM's first token and TTS's first audio, called directly."""
    import grpc

    llm_times, tts_times = [], []
    async with grpc.aio.insecure_channel(addrs["llm"]) as llm_channel, grpc.aio.insecure_channel(addrs["tts"]) as tts_channel:
        llm, tts = llm_pb2_grpc.LlmServiceStub(llm_channel), tts_pb2_grpc.TtsServiceStub(tts_channel)
        messages = [llm_pb2.ChatMessage(role="system",
                                        content="You are a helpful voice assistant. Answer in one or two short sentences."),
                    llm_pb2.ChatMessage(role="user", content="What is the capital of France?")]
        for _ in range(runs):
            start = time.monotonic()
            call = llm.Generate()
            await call.write(llm_pb2.GenerateRequest(chat=llm_pb2.ChatRequest(messages=messages)))
            await call.done_writing()
            async for response in call:
                if response.HasField("delta"):
                    llm_times.append((time.monotonic() - start) * 1000)
                    break
            call.cancel()
            start = time.monotonic()
            call = tts.Synthesize()
            fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=24000, channels=1)
            await call.write(tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=fmt)))
            await call.write(tts_pb2.SynthesizeRequest(
                text=tts_pb2.TextPiece(segment_id=1, text="The capital of France is Paris.", end_of_segment=True)))
            async for response in call:
                if response.HasField("audio"):
                    tts_times.append((time.monotonic() - start) * 1000)
                    break
            call.cancel()
    return {"llm_first_token_ms": _pct(llm_times, 50), "tts_first_audio_ms": _pct(tts_times, 50), "runs": runs}


async def barge_in(addr: str, runs: int, start_secs: float = 0.2) -> dict:
    long_request = load_for_sending(FIXTURES / "counting_long.wav")
    interruption = load_for_sending(FIXTURES / "question_capital.wav")[8000:32000]  # 0.5-2.0 s: the speech
    rows = []
    for _ in range(runs):
        rows.append(await _one_barge_in(addr, long_request, interruption))
    good = [r for r in rows if r.get("ok")]
    return {
        "runs": len(rows),
        "ok_runs": len(good),
        "start_secs": start_secs,
        "p50": _pct([max(r["stream_stop_ms"], r["signal_ms"]) for r in good], 50),
        "stream_stop_p50": _pct([r["stream_stop_ms"] for r in good], 50),
        "signal_p50": _pct([r["signal_ms"] for r in good], 50),
        "audible_without_flush_p50": _pct([r["playout_end_ms"] for r in good], 50),
        "failures": [r.get("failure", "") for r in rows if not r.get("ok")],
    }


async def _one_barge_in(addr: str, long_request: np.ndarray, interruption: np.ndarray) -> dict:
    chunk = 16000 * CHUNK_MS // 1000
    audio_arrivals: list[tuple[float, int, float]] = []  # (arrival, turn, seconds)
    user_started: list[float] = []

    def on_event(response):
        kind = response.WhichOneof("event")
        if kind == "audio":
            audio_arrivals.append((time.monotonic(), response.audio.turn_number, len(response.audio.chunk.data) / 48000))
        elif kind == "speaking" and response.speaking.kind == Speaking.KIND_USER_STARTED:
            user_started.append(time.monotonic())

    tracker = SessionTracker(on_event)
    config = config_request(client="voicemesh-bench")
    onset = None
    async with open_session(addr, config, tracker, end_timeout=5.0) as call:
        if call is None:
            return {"ok": False, "failure": tracker.result.failure}
        start, index = time.monotonic(), 0
        phase = "request"  # request -> wait for the bot -> interrupt -> tail of silence
        bot_started_at = None
        interrupt_index = 0
        deadline = start + 60
        while time.monotonic() < deadline and not tracker.ended.is_set():
            if phase == "request":
                data = long_request[index * chunk : (index + 1) * chunk]
                if len(data) < chunk:
                    phase = "wait"
            if phase == "wait":
                data = np.zeros(chunk, np.int16)
                if audio_arrivals and bot_started_at is None:
                    bot_started_at = audio_arrivals[0][0]
                if bot_started_at is not None and time.monotonic() >= bot_started_at + 1.0:
                    phase = "interrupt"
            if phase == "interrupt":
                data = interruption[interrupt_index * chunk : (interrupt_index + 1) * chunk]
                interrupt_index += 1
                if len(data) < chunk:
                    phase, tail_until = "tail", time.monotonic() + 1.5
            if phase == "tail":
                data = np.zeros(chunk, np.int16)
                if time.monotonic() >= tail_until:
                    break
            await call.write(pb.ConverseRequest(audio=common_pb2.AudioChunk(data=np.asarray(data, "<i2").tobytes())))
            if phase == "interrupt" and onset is None:
                onset = time.monotonic()
            index += 1
            await asyncio.sleep(max(0.0, start + index * CHUNK_MS / 1000 - time.monotonic()))
        if call is not None:
            await call.write(pb.ConverseRequest(control=pb.SessionControl(cancel=pb.CancelSession())))
    if onset is None or not audio_arrivals:
        return {"ok": False, "failure": tracker.result.failure or "the bot never spoke"}
    first_turn = audio_arrivals[0][1]
    interrupted = [a for a in audio_arrivals if a[1] == first_turn]
    last_arrival = interrupted[-1][0]
    played_until = interrupted[0][0]
    for arrival, _, seconds in interrupted:
        played_until = max(played_until, arrival) + seconds
    signal = next((t for t in user_started if t >= onset), None)
    if signal is None:
        return {"ok": False, "failure": "no USER_STARTED after the interruption's onset"}
    return {
        "ok": True,
        "stream_stop_ms": max(0.0, last_arrival - onset) * 1000,
        "signal_ms": (signal - onset) * 1000,
        "playout_end_ms": max(0.0, played_until - onset) * 1000,
    }


def _pct(values, q):
    value = percentile([v for v in values if v is not None], q)
    return None if value is None else round(value, 1)
