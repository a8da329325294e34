"""Load client: N concurrent Converse sessions on the bench scenario, measured at the client.

`python -m bench.load --addr HOST:PORT --sessions N --duration S` prints one JSON object:
per-turn latencies (end of user speech -> first bot audio of that turn), underruns (see
bench.stats.Playback), turns missed, errors, and this process's own CPU and event-loop lag
(when the client itself is overloaded its numbers are not to be trusted; the report says so).

End of user speech is when the client finished writing the last speech frame of a turn.
The k-th speech burst of a session is matched to turn number k of that session.
"""
from __future__ import annotations

import voicemesh.runtime.grpc_env  # noqa: F401 - first, as in every voicemesh process (see its docstring)

import argparse
import asyncio
import json
import os
import time

import grpc
import uvloop

from bench.scenario import (
    FRAME_MS, IN_RATE_HZ, OUT_RATE_HZ, SILENCE_FRAME, Latencies, Schedule, phase_frames, speech_frame,
)
from bench.stats import SessionStats, cpu_seconds, loop_lag, summarise
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

PCM16 = common_pb2.AUDIO_ENCODING_PCM16


def session_config(lat: Latencies, index: int) -> pb.ConverseRequest:
    return pb.ConverseRequest(config=pb.SessionConfig(
        session_id=f"bench-{os.getpid()}-{index}",
        input_format=common_pb2.AudioFormat(encoding=PCM16, sample_rate_hz=IN_RATE_HZ, channels=1),
        output_format=common_pb2.AudioFormat(encoding=PCM16, sample_rate_hz=OUT_RATE_HZ, channels=1),
        vad=pb.VadOptions(start_secs=lat.vad_start_s, stop_secs=lat.vad_stop_s),
        interim_transcripts=False,
    ))


async def run_session(channel, index: int, lat: Latencies, schedule: Schedule, stop_at: float, stats: SessionStats,
                      started: asyncio.Event) -> None:
    call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse()
    speech, cycle, phase = schedule.speech_frames(), schedule.cycle_frames(), phase_frames(index, schedule)
    speech_data = speech_frame()
    bytes_per_second = 2 * OUT_RATE_HZ

    async def read() -> None:
        async for response in call:
            kind = response.WhichOneof("event")
            if kind == "audio":
                stats.audio(response.audio.turn_number, time.monotonic(), len(response.audio.chunk.data) / bytes_per_second)
            elif kind == "session_started":
                started.set()
            elif kind == "error":
                stats.error = response.error.message

    reader = asyncio.create_task(read())
    try:
        await call.write(session_config(lat, index))
        await asyncio.wait_for(started.wait(), 30)
        start = time.monotonic()
        frame = 0
        while time.monotonic() < stop_at and not reader.done():
            position = (frame - phase) % cycle if frame >= phase else cycle  # before the phase: silence
            await call.write(pb.ConverseRequest(audio=common_pb2.AudioChunk(
                data=speech_data if position < speech else SILENCE_FRAME, seq=frame, offset_ms=frame * FRAME_MS)))
            if position == speech - 1:
                stats.speech_ends.append(time.monotonic())
            frame += 1
            await asyncio.sleep(max(0.0, start + frame * FRAME_MS / 1000 - time.monotonic()))
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, asyncio.TimeoutError) as err:
        stats.error = stats.error or repr(err)
    finally:
        call.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        if reader.done() and not reader.cancelled() and isinstance(reader.exception(), grpc.aio.AioRpcError):
            if reader.exception().code() != grpc.StatusCode.CANCELLED:
                stats.error = stats.error or reader.exception().details()


async def main(args) -> dict:
    lat = Latencies.from_env()
    schedule = Schedule(cycle_s=args.cycle, warmup_s=args.warmup)
    options = [("grpc.so_reuseport", 0)]
    channels = [grpc.aio.insecure_channel(args.addr, options=options) for _ in range(-(-args.sessions // args.per_channel))]
    stats = [SessionStats(args.jitter_ms / 1000) for _ in range(args.sessions)]
    started = [asyncio.Event() for _ in range(args.sessions)]
    t0 = time.monotonic()
    stop_at = t0 + args.duration + args.ramp
    tasks = []
    for index in range(args.sessions):  # ramp the sessions up instead of opening all at once
        tasks.append(asyncio.create_task(run_session(
            channels[index // args.per_channel], index, lat, schedule, stop_at, stats[index], started[index])))
        await asyncio.sleep(args.ramp / max(1, args.sessions))
    measure_from = time.monotonic() + schedule.warmup_s
    lags: list[float] = []
    cpu_start, lag_task = cpu_seconds(os.getpid()), asyncio.create_task(loop_lag(stop_at, lags))
    await asyncio.gather(*tasks, lag_task)
    cpu_used = cpu_seconds(os.getpid()) - cpu_start
    await asyncio.gather(*(channel.close() for channel in channels))
    return summarise(stats, lat.fakes_total_ms, measure_from, stop_at - schedule.cycle_s, cpu_used,
                     time.monotonic() - measure_from + schedule.warmup_s, lags)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load after the ramp")
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--cycle", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--per-channel", type=int, default=1, help="sessions sharing one client channel")
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
