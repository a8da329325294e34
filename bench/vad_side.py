"""The VAD service on its own (Silero): N real-time Detect streams, as the orchestrator sends them.

`python -m bench.vad_side --addr HOST:PORT --sessions N --duration S` prints one JSON object.
Each stream sends 60 ms chunks of 16 kHz PCM16 at real time: the speech of
question_capital.wav, then silence, in a 4 s cycle (phases spread over the cycle). Event
latency is from sending the chunk that let the segmenter decide (the one holding the end of
stop_secs of whole windows after the event's offset) to the SpeechStopped event's arrival:
the service's processing and queueing delay. The bench compares p99 at N streams with p50
at 1 stream.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import grpc
import numpy as np
import uvloop

from bench.stats import cpu_seconds, percentile
from voicemesh.v1 import common_pb2, vad_pb2, vad_pb2_grpc
from voicemesh.client.wavio import load_for_sending, speech_segments

CHUNK_MS = 60
RATE = 16000
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "question_capital.wav"


def cycle_audio(cycle_s: float) -> tuple[np.ndarray, int]:
    """One cycle of audio and the sample where its speech ends."""
    samples = load_for_sending(FIXTURE)
    segment = speech_segments(samples, RATE)[0]
    audio = np.zeros(int(cycle_s * RATE), np.int16)
    speech = samples[max(0, segment.start - 1600) : segment.end]
    audio[: len(speech)] = speech
    return audio, len(speech)


async def stream(stub, index: int, audio: np.ndarray, stop_secs: float, stop_at: float,
                 latencies: list[float], errors: list[str]) -> None:
    chunk = RATE * CHUNK_MS // 1000
    cycle = len(audio)
    phase = (index * 7919 * chunk) % cycle // chunk * chunk
    # SpeechStopped's offset is the end of the last speech window; the segmenter decides
    # after stop_secs of whole 512-sample windows beyond it, inside the chunk holding that.
    stop_samples = round(stop_secs * RATE / 512) * 512
    sent_at: dict[int, float] = {}  # chunk number in the stream -> when it was sent
    call = stub.Detect()

    async def read():
        async for response in call:
            if response.HasField("speech_stopped"):
                decided = response.speech_stopped.offset_ms * RATE // 1000 + stop_samples
                sent = sent_at.get(decided // chunk)
                if sent is not None:
                    latencies.append((time.monotonic() - sent) * 1000)

    reader = asyncio.create_task(read())
    try:
        fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=RATE, channels=1)
        await call.write(vad_pb2.DetectRequest(config=vad_pb2.VadConfig(
            format=fmt, start_secs=0.16, stop_secs=stop_secs, smart_turn=False)))  # Silero alone
        start, sent = time.monotonic(), 0
        while time.monotonic() < stop_at:
            in_cycle = (phase + sent * chunk) % cycle
            data = audio[in_cycle : in_cycle + chunk]
            await call.write(vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=data.tobytes())))
            sent_at[sent] = time.monotonic()
            sent_at.pop(sent - 500, None)  # keep the last 30 s
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * CHUNK_MS / 1000 - time.monotonic()))
    except grpc.aio.AioRpcError as err:
        errors.append(err.details())
    finally:
        call.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def main(args) -> dict:
    audio, _ = cycle_audio(args.cycle)
    latencies: list[float] = []
    errors: list[str] = []
    async with grpc.aio.insecure_channel(args.addr) as channel:
        stub = vad_pb2_grpc.VadServiceStub(channel)
        stop_at = time.monotonic() + args.ramp + args.duration
        tasks = []
        for index in range(args.sessions):
            tasks.append(asyncio.create_task(stream(stub, index, audio, args.stop_secs, stop_at, latencies, errors)))
            await asyncio.sleep(args.ramp / max(1, args.sessions))
        await asyncio.sleep(args.warmup)
        del latencies[:]  # count only after the ramp and warm-up
        cpu0, t0 = (cpu_seconds(args.server_pid) if args.server_pid else 0.0), time.monotonic()
        await asyncio.gather(*tasks)
        cpu = (cpu_seconds(args.server_pid) - cpu0) / (time.monotonic() - t0) if args.server_pid else None
    return {"sessions": args.sessions, "events": len(latencies),
            "event_latency_ms": {"p50": _r(percentile(latencies, 50)), "p99": _r(percentile(latencies, 99))},
            "server_cpu_cores": _r(cpu), "errors": errors[:3], "error_count": len(errors)}


def _r(value):
    return None if value is None else round(value, 2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--cycle", type=float, default=4.0)
    parser.add_argument("--stop-secs", type=float, default=0.32)
    parser.add_argument("--server-pid", type=int, default=0)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
