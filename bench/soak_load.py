"""The soak's load client: N long-lived Converse sessions on the bench scenario, every turn timed.

`python -m bench.soak_load --addr HOST:PORT --sessions N --duration S` runs bench.load's caller
(20 ms frames at real time, a 0.96 s tone every 4 s cycle) in every session for the whole run,
and prints one JSON object: each turn as [seconds since start, added ms, underruns], each missed
turn's time, and the errors. Unlike bench.load it keeps the time of each turn, so bench/soak.py
can bin latency over the run and see a drift, not only its overall p99; and at the end each
session stops speaking but keeps its microphone open (silence) until every turn it spoke has
been answered or superseded, for at most `--drain` seconds (a liveness bound), so a missed
turn is one never answered, not one answered late.
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

from bench.load import session_config
from bench.scenario import FRAME_MS, OUT_RATE_HZ, SILENCE_FRAME, Latencies, Schedule, phase_frames, speech_frame
from bench.stats import SessionStats, cpu_seconds
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc


def all_answered(stats: SessionStats) -> bool:
    return all(k in stats.first_audio for k in range(1, len(stats.speech_ends) + 1))


def settled(stats: SessionStats, turns: dict) -> bool:
    """Every burst has its reply, or every turn the session saw start has ended since the last burst
    (a burst spoken before the previous reply came supersedes that turn: it never gets audio)."""
    if all_answered(stats):
        return True
    last_end = stats.speech_ends[-1] if stats.speech_ends else 0.0
    return turns["started"] == turns["ended"] and turns["last_ended_at"] > last_end


async def run_session(channel, index: int, lat: Latencies, schedule: Schedule, stop_at: float, drain_s: float,
                      stats: SessionStats, reasons: dict) -> None:
    """bench.load's caller, with a drain: after `stop_at` (at a cycle's start, never inside a
    burst) only silence, until the session has settled or `drain_s` has passed. `reasons` counts
    the TurnEnded reasons (shared by all sessions)."""
    call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse()
    speech, cycle, phase = schedule.speech_frames(), schedule.cycle_frames(), phase_frames(index, schedule)
    speech_data, started = speech_frame(), asyncio.Event()
    turns = {"started": 0, "ended": 0, "last_ended_at": 0.0}

    async def read() -> None:
        async for response in call:
            kind = response.WhichOneof("event")
            if kind == "audio":
                stats.audio(response.audio.turn_number, time.monotonic(), len(response.audio.chunk.data) / (2 * OUT_RATE_HZ))
            elif kind == "session_started":
                started.set()
            elif kind == "turn_started":
                turns["started"] += 1
            elif kind == "turn_ended":
                turns["ended"] += 1
                turns["last_ended_at"] = time.monotonic()
                name = pb.TurnEnded.Reason.Name(response.turn_ended.reason)
                reasons[name] = reasons.get(name, 0) + 1
            elif kind == "error":
                stats.error = stats.error or response.error.message

    reader = asyncio.create_task(read())
    try:
        await call.write(session_config(lat, index))
        await asyncio.wait_for(started.wait(), 60)
        start, frame, draining = time.monotonic(), 0, False
        while not reader.done():
            now = time.monotonic()
            position = (frame - phase) % cycle if frame >= phase else cycle  # before the phase: silence
            draining = draining or (now >= stop_at and position >= speech)
            if draining and (settled(stats, turns) or now >= stop_at + drain_s):
                break
            loud = position < speech and not draining
            await call.write(pb.ConverseRequest(audio=common_pb2.AudioChunk(
                data=speech_data if loud else SILENCE_FRAME, seq=frame, offset_ms=frame * FRAME_MS)))
            if loud and position == speech - 1:
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


def turns_of(stats: list[SessionStats], t0: float, fakes_ms: float) -> tuple[list, list, list]:
    """(turns, missed, errors): burst k of a session is its turn k (bench.load's rule)."""
    turns, missed, errors = [], [], []
    for session in stats:
        if session.error:
            errors.append(session.error)
        for k, end in enumerate(session.speech_ends, start=1):
            if k in session.first_audio:
                turns.append([round(end - t0, 3), round((session.first_audio[k] - end) * 1000 - fakes_ms, 2),
                              session.playback[k].underruns])
            elif not session.error:  # never answered, though the session waited for it
                missed.append(round(end - t0, 3))
    return turns, missed, errors


async def main(args) -> dict:
    lat = Latencies.from_env()
    schedule = Schedule(cycle_s=args.cycle, warmup_s=0.0)
    channels = [grpc.aio.insecure_channel(args.addr, options=[("grpc.so_reuseport", 0)]) for _ in range(args.sessions)]
    stats = [SessionStats(args.jitter_ms / 1000) for _ in range(args.sessions)]
    t0 = time.monotonic()
    stop_at = t0 + args.ramp + args.duration
    cpu0 = cpu_seconds(os.getpid())
    tasks, reasons = [], {}
    for index in range(args.sessions):  # ramp up instead of opening all at once
        tasks.append(asyncio.create_task(run_session(channels[index], index, lat, schedule, stop_at, args.drain,
                                                     stats[index], reasons)))
        await asyncio.sleep(args.ramp / max(1, args.sessions))
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    await asyncio.gather(*(channel.close() for channel in channels))
    turns, missed, errors = turns_of(stats, t0, lat.fakes_total_ms)
    return {"sessions": args.sessions, "duration_s": round(wall, 1), "turns": turns, "missed": missed,
            "turn_ended_reasons": reasons, "errors": errors[:10], "error_count": len(errors),
            "client_cpu_cores": round((cpu_seconds(os.getpid()) - cpu0) / max(wall, 1e-6), 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load after the ramp")
    parser.add_argument("--ramp", type=float, default=10.0)
    parser.add_argument("--cycle", type=float, default=4.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--drain", type=float, default=120.0, help="at most this long for the last replies (a liveness bound)")
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
