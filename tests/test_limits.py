"""Session limits on the real orchestrator in front of the fake services (each its own process):

- a client that stops reading its responses: the responses waiting for it stay under
  VOICEMESH_SESSION_QUEUE_BYTES, then that session alone ends with RESOURCE_EXHAUSTED (a message
  that says why); a concurrent session goes on answering;
- a client that sends audio faster than real time: beyond VOICEMESH_MAX_AUDIO_AHEAD_SECS (3 s
  here, 10 s by default) that session ends with RESOURCE_EXHAUSTED; a concurrent session goes on;
- VOICEMESH_MAX_SESSIONS: the call beyond it is refused with RESOURCE_EXHAUSTED before any
  session state (no SessionStarted), and a place freed is taken again.

Figures (printed, not asserted): the peak bytes queued for the slow reader and the orchestrator's
RSS before and after. Every wait is on a state (the orchestrator's Info, a Converse event, the
call's status) with a deadline.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from support import PCM16_16K, WAIT_S, ConverseProbe, Processes, event_is, fake_mesh, tone
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

QUEUE_BYTES = 128 * 1024
MAX_SESSIONS = 4
AHEAD_S = 3  # caller audio ahead of real time (the default is 10 s)
OUT_48K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=48000, channels=1)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("limits"))
    env = {"VOICEMESH_SESSION_QUEUE_BYTES": str(QUEUE_BYTES), "VOICEMESH_MAX_SESSIONS": str(MAX_SESSIONS),
           "VOICEMESH_MAX_AUDIO_AHEAD_SECS": str(AHEAD_S)}
    try:
        yield fake_mesh(procs, FakeScript(llm_first_token_ms=5.0, llm_token_ms=5.0, tts_first_audio_ms=5.0), env=env)
    finally:
        procs.stop_all()


async def info(address: str) -> dict[str, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Info(pb.OrchestratorServiceInfoRequest(), timeout=10)
    return dict(reply.info.details)


async def wait_info(address: str, check, what: str) -> dict[str, str]:
    deadline = time.monotonic() + WAIT_S
    while True:
        details = await info(address)
        if check(details):
            return details
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the orchestrator's Info says {details}")
        await asyncio.sleep(0.1)  # a poll interval: the state decides


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def healthy_turns(address: str, stop: asyncio.Event) -> int:
    """A session taking typed turns until `stop`: every one answered, no error, never ended."""
    async with ConverseProbe(address) as probe:
        turns = 0
        while not stop.is_set() or turns < 2:
            turns += 1
            await probe.send_text(f"question {turns}")
            ended = (await probe.wait_for(event_is("turn_ended", turn_number=turns))).turn_ended
            assert ended.reason == pb.TurnEnded.REASON_ANSWERED, (ended, probe.kinds())
        assert not probe.of("error") and not probe.of("session_ended"), probe.kinds()
        return turns


async def test_a_client_that_stops_reading_is_ended_alone_with_resource_exhausted(mesh):
    address = mesh.orchestrator_address
    pid = mesh.children["orchestrator"].process.pid
    before = await info(address)
    rss_before = rss_kib(pid)
    stop = asyncio.Event()
    healthy = asyncio.create_task(healthy_turns(address, stop))
    # Without BDP probing its window stays small (grpc's default grows it to megabytes, which
    # gRPC itself buffers before the session's queue starts to fill: see docs/reliability.md).
    async with grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse()
        await call.write(pb.ConverseRequest(config=pb.SessionConfig(output_format=OUT_48K)))
        await call.write(pb.ConverseRequest(text=pb.TextInput(text="tell me a long story")))  # 30 sentences of audio
        # It reads nothing until the orchestrator has given up on it.
        ended = int(before.get("ended_by_limits", "0"))
        await wait_info(address, lambda d: int(d.get("ended_by_limits", "0")) > ended, "the slow reader to be ended")
        rss_after = rss_kib(pid)
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in call:
                received += 1
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failure.value
    assert "not reading its responses" in failure.value.details() and "VOICEMESH_SESSION_QUEUE_BYTES" in failure.value.details()
    stop.set()
    turns = await asyncio.wait_for(healthy, WAIT_S)  # the other session was untouched
    print(f"\nFIGURE limits/slow-reader: limit={QUEUE_BYTES} B, messages it got after the end={received}, "
          f"orchestrator RSS {rss_before} -> {rss_after} KiB, healthy session turns={turns}", file=sys.stderr)


def send_at_full_speed(address: str, seconds: int) -> tuple[grpc.RpcError | None, int]:
    """A client streaming audio as fast as it can (the sync API: its requests are written from a
    thread of grpc's own, which stops at the first write the server no longer takes, so the status
    the client reads is the server's; grpc.aio turns a write in flight at that moment into a
    client-side INTERNAL). Returns the status error and how many responses came before it."""
    audio = np.tile(tone(1.0), seconds)

    def requests():
        yield pb.ConverseRequest(config=pb.SessionConfig(input_format=PCM16_16K))
        for begin in range(0, len(audio), 640):  # 40 ms chunks
            yield pb.ConverseRequest(audio=common_pb2.AudioChunk(data=audio[begin : begin + 640].tobytes()))

    with grpc.insecure_channel(address) as channel:
        responses = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse(requests(), timeout=WAIT_S)
        received = 0
        try:
            for _ in responses:
                received += 1
        except grpc.RpcError as err:
            return err, received
    return None, received


async def test_a_client_sending_faster_than_real_time_is_ended_alone(mesh):
    stop = asyncio.Event()
    healthy = asyncio.create_task(healthy_turns(mesh.orchestrator_address, stop))
    started = time.monotonic()
    error, received = await asyncio.to_thread(send_at_full_speed, mesh.orchestrator_address, 30)
    took = time.monotonic() - started
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "faster than real time" in error.details(), error.details()
    assert f"VOICEMESH_MAX_AUDIO_AHEAD_SECS={AHEAD_S}" in error.details(), error.details()
    stop.set()
    turns = await asyncio.wait_for(healthy, WAIT_S)
    print(f"\nFIGURE limits/fast-sender: 30 s of audio at full speed ended after {took:.2f} s ({received} responses first); "
          f"{error.details()!r}; healthy session turns={turns}", file=sys.stderr)


async def test_sessions_beyond_the_cap_are_refused_before_any_state(mesh):
    address = mesh.orchestrator_address
    await wait_info(address, lambda d: d["active_sessions"] == "0", "the earlier tests' sessions to close")
    probes = [ConverseProbe(address) for _ in range(MAX_SESSIONS)]
    for probe in probes:
        await probe.__aenter__()
    try:
        for probe in probes:
            await probe.wait_for(lambda e: e.HasField("session_started"))
        # Refused at once, before its config is read: it writes nothing (a write racing the
        # refusal would fail on this side) and reads the status.
        async with grpc.aio.insecure_channel(address) as channel:
            call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse(timeout=WAIT_S)
            responses = [response async for response in _until_status(call)]
            refused = call
        assert await refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (await refused.code(), await refused.details())
        assert f"VOICEMESH_MAX_SESSIONS={MAX_SESSIONS}" in await refused.details(), await refused.details()
        assert responses == []  # no SessionStarted: nothing was made for it
        await probes[0].cancel()
        await probes[0].wait_closed()
        await wait_info(address, lambda d: d["active_sessions"] == str(MAX_SESSIONS - 1), "a place to free")
        async with ConverseProbe(address) as admitted:
            await admitted.send_text("hello")
            await admitted.wait_for(event_is("turn_ended", turn_number=1))
        print(f"\nFIGURE limits/max-sessions: cap={MAX_SESSIONS}, refused: {await refused.details()!r}", file=sys.stderr)
    finally:
        for probe in probes:
            await probe.__aexit__(None, None, None)


async def _until_status(call):
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError:
        pass  # the status is read from the call
