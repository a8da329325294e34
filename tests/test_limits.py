"""Session limits on the real orchestrator in front of the fake services (each its own process):

- a client that stops reading its responses: the responses waiting for it stay under
  VOICEMESH_SESSION_QUEUE_BYTES, then that session alone ends with RESOURCE_EXHAUSTED (a message
  that says why); a concurrent session goes on answering;
- a client that sends audio faster than real time: beyond VOICEMESH_MAX_AUDIO_AHEAD_SECS (3 s
  here, 10 s by default) that session ends with RESOURCE_EXHAUSTED; a concurrent session goes on;
- VOICEMESH_MAX_SESSIONS: the call beyond it is refused with RESOURCE_EXHAUSTED before any
  session state (no SessionStarted), and a place freed is taken again;
- VOICEMESH_CONFIG_TIMEOUT_SECS: a call that opens and sends no SessionConfig is ended with
  DEADLINE_EXCEEDED and its place freed, so at VOICEMESH_MAX_SESSIONS=1 a silent opener does
  not keep a real session out;
- a VAD or STT service at its own cap (RESOURCE_EXHAUSTED on a new stream, from a BackendGate in
  front of the real service): the session reopens the stream with backoff, as for UNAVAILABLE;
  when every attempt is refused it goes on (non-fatal Error, typed turns answered) and takes the
  stream back once there is room.

Figures (printed, not asserted): the peak bytes queued for the slow reader and the orchestrator's
RSS before and after. Every wait is on a state (the orchestrator's Info, a Converse event, the
call's status) with a deadline.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from support import (
    PCM16_16K, START_S, WAIT_S, ConverseProbe, Processes, backend_env, event_is, fake_mesh, free_port, silence, tone,
    wait_serving,
)
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

QUEUE_BYTES = 128 * 1024
MAX_SESSIONS = 4
AHEAD_S = 3  # caller audio ahead of real time (the default is 10 s)
CONTEXT_MESSAGES = 3  # the LLM context window when a config sets none (the default is 40)
OUT_48K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=48000, channels=1)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("limits"))
    env = {"VOICEMESH_SESSION_QUEUE_BYTES": str(QUEUE_BYTES), "VOICEMESH_MAX_SESSIONS": str(MAX_SESSIONS),
           "VOICEMESH_MAX_AUDIO_AHEAD_SECS": str(AHEAD_S), "VOICEMESH_CONTEXT_MAX_MESSAGES": str(CONTEXT_MESSAGES)}
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


@pytest.mark.parametrize("asked, kept", [(0, CONTEXT_MESSAGES), (5, 5)])
async def test_the_context_window_defaults_to_the_orchestrators_limit(mesh, asked, kept):
    """A config without context.max_messages gets VOICEMESH_CONTEXT_MAX_MESSAGES; one that sets
    it keeps its own. The fake LLM answers "count messages" with the count it was sent."""
    config = pb.SessionConfig(input_format=PCM16_16K, context=pb.ContextOptions(max_messages=asked))
    async with ConverseProbe(mesh.orchestrator_address, config) as probe:
        for number, text in enumerate(["one", "two", "three", "four", "count messages"], start=1):
            await probe.send_text(text)
            await probe.wait_for(event_is("turn_ended", turn_number=number))
        assert probe.of("bot_text")[-1].text == f"I see {kept + 1} messages.", probe.of("bot_text")  # + the system prompt


async def test_sessions_beyond_the_cap_are_refused_before_any_state(mesh):
    address = mesh.orchestrator_address
    await wait_info(address, lambda d: d["active_sessions"] == "0", "the earlier tests' sessions to close")
    probes = [ConverseProbe(address) for _ in range(MAX_SESSIONS)]
    for probe in probes:
        await probe.__aenter__()
    try:
        for probe in probes:
            await probe.wait_for(lambda e: e.HasField("session_started"))
        # Refused before any state, but after its first message: the config's write cannot race
        # the refusal (grpc.aio would report INTERNAL for it), so the caller reads the reason.
        async with grpc.aio.insecure_channel(address) as channel:
            call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse(timeout=WAIT_S)
            await call.write(pb.ConverseRequest(config=pb.SessionConfig()))
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


# -- a backend at its own cap, and the config deadline ------------------------------------------

STREAMING = ("/voicemesh.v1.VadService/Detect", "/voicemesh.v1.VadService/DetectMany", "/voicemesh.v1.SttService/Recognize")
CONFIG_TIMEOUT_S = 2  # VOICEMESH_CONFIG_TIMEOUT_SECS of the one-slot orchestrator (10 s by default)


class BackendGate(grpc.GenericRpcHandler):
    """A loopback gRPC front for one real backend process, passing its calls through as bytes (the
    real wire protocol both ways). For its streaming calls it can also act as the replica in trouble:
    refuse new ones with RESOURCE_EXHAUSTED, as a service at its own cap does (`refuse`), or hang
    (`hang`: the calls open now, and with `new_calls` every later one, accept and then read and answer
    nothing, as a stopped replica). Unary calls (Info, health) always pass."""

    def __init__(self, upstream: str):
        self.channel = grpc.insecure_channel(upstream)
        self.calls: Counter[str] = Counter()  # streaming calls seen, by method name
        self.refused = 0
        self._refuse_left: float = 0  # new streaming calls still to refuse (inf: every one)
        self._hang_new = False
        self._open: set[threading.Event] = set()  # each open call's "stalled" flag
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=64), options=[("grpc.http2.bdp_probe", 0)])
        self.server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def refuse(self, count: float = float("inf")) -> None:
        with self._lock:
            self._refuse_left = count

    def hang(self, new_calls: bool) -> None:
        with self._lock:
            for stalled in self._open:
                stalled.set()
            self._hang_new = new_calls

    def stop(self) -> None:
        self.server.stop(grace=None)
        self.channel.close()

    def service(self, details):
        if details.method in STREAMING:
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: self._stream(details.method, requests, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.channel.unary_unary(details.method)(
            request, timeout=WAIT_S))

    def _stream(self, method: str, requests, context):
        stalled, ended = threading.Event(), threading.Event()
        with self._lock:
            self.calls[method.rsplit("/", 1)[1]] += 1
            refused = self._refuse_left > 0
            self._refuse_left -= 1 if refused else 0
            self.refused += refused
            if self._hang_new:
                stalled.set()
            self._open.add(stalled)
        context.add_callback(ended.set)
        context.add_callback(lambda: self._open.discard(stalled))
        if refused:  # after the config, as a servicer that checks its cap in the handler does
            next(requests, None)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{method}: this replica holds its limit of streams; "
                                                              "retry later or on another replica")
        if stalled.is_set():  # hung from the start: it accepted the call, and reads nothing
            ended.wait()
            return

        def forwarded():
            for request in requests:
                if stalled.is_set():
                    break
                yield request
            ended.wait()  # hung, or the caller half-closed: the upstream call stays open until the caller goes

        upstream = self.channel.stream_stream(method)(forwarded())
        context.add_callback(upstream.cancel)
        try:
            for response in upstream:
                if stalled.is_set():
                    break
                yield response
        except grpc.RpcError as err:
            if not ended.is_set():
                context.abort(err.code(), err.details())
        ended.wait()


@pytest.fixture(scope="module")
def gated(mesh, tmp_path_factory):
    """A second orchestrator over the same backends, with one session slot and a short config
    deadline, its VAD (a Detect call per session) and STT calls through BackendGates."""
    procs = Processes(tmp_path_factory.mktemp("gated"))
    gates = {kind: BackendGate(mesh.address(kind)) for kind in ("vad", "stt")}
    port = free_port()
    env = {**backend_env(mesh), "VOICEMESH_VAD_ADDR": gates["vad"].address, "VOICEMESH_STT_ADDR": gates["stt"].address,
           "VOICEMESH_MAX_SESSIONS": "1", "VOICEMESH_CONFIG_TIMEOUT_SECS": str(CONFIG_TIMEOUT_S), "VOICEMESH_VAD_MULTIPLEX": "0"}
    try:
        proc = procs.serve("orchestrator", port, env, name="orchestrator-gated")
        wait_serving(f"127.0.0.1:{port}", proc, START_S)
        yield f"127.0.0.1:{port}", gates
    finally:
        procs.stop_all()
        for gate in gates.values():
            gate.stop()


async def admitted_session(address: str) -> tuple[ConverseProbe, int]:
    """A session, retried while the orchestrator refuses it for VOICEMESH_MAX_SESSIONS (as a client
    should: docs/reliability.md); returns it started, and how many times it was refused first."""
    refusals = 0
    deadline = time.monotonic() + WAIT_S
    while True:
        probe = ConverseProbe(address)
        try:
            await probe.__aenter__()
            await probe.wait_for(lambda e: e.HasField("session_started"))
            return probe, refusals
        except AssertionError:
            await probe.__aexit__(None, None, None)
            if probe.status != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            refusals += 1
            await asyncio.sleep(0.2)  # the client's retry backoff; the session's admission decides


async def test_a_silent_opener_is_ended_and_does_not_starve_a_real_session(gated):
    address, _ = gated
    await wait_info(address, lambda d: d["active_sessions"] == "0", "the earlier sessions to close")
    async with grpc.aio.insecure_channel(address) as channel:
        silent = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse()  # opens, sends nothing
        await wait_info(address, lambda d: d["active_sessions"] == "1" or silent.done(), "the silent call to take the slot")
        real = asyncio.create_task(admitted_session(address))
        responses = [response async for response in _until_status(silent)]
        assert await silent.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (await silent.code(), await silent.details())
        assert f"VOICEMESH_CONFIG_TIMEOUT_SECS={CONFIG_TIMEOUT_S}" in await silent.details(), await silent.details()
        assert responses == []
        probe, refusals = await real
    try:
        await probe.send_text("hello")
        ended = (await probe.wait_for(event_is("turn_ended", turn_number=1))).turn_ended
        assert ended.reason == pb.TurnEnded.REASON_ANSWERED, probe.kinds()
    finally:
        await probe.__aexit__(None, None, None)
    print(f"\nFIGURE limits/config-timeout: {await silent.details()!r}; the real session was refused {refusals} times "
          "while the silent call held the slot", file=sys.stderr)


async def spoken_turn(probe: ConverseProbe, number: int) -> pb.TurnEnded:
    speech = np.concatenate((tone(0.6), silence(1.0)))
    ended = (await probe.speak_until(speech, event_is("turn_ended", turn_number=number))).turn_ended
    assert ended.reason == pb.TurnEnded.REASON_ANSWERED, (ended, probe.kinds())
    return ended


@pytest.mark.parametrize("kind", ["stt", "vad"])
async def test_a_backend_at_capacity_is_retried_like_unavailable(gated, kind):
    address, gates = gated
    await wait_info(address, lambda d: d["active_sessions"] == "0", "the earlier sessions to close")
    gates[kind].refuse(2)  # the session's first stream and first reopen are refused; the second reopen is taken
    probe, _ = await admitted_session(address)
    try:
        told = (await probe.wait_for(lambda e: e.HasField("error") and e.error.source == kind)).error
        assert told.code == "RESOURCE_EXHAUSTED" and not told.fatal, told
        assert "reopened (2 attempts" in told.message and "goes on" in told.message, told
        await spoken_turn(probe, 1)
        assert not probe.of("session_ended") and len(probe.of("error")) == 1, probe.kinds()
    finally:
        await probe.__aexit__(None, None, None)
        gates[kind].refuse(0)
    print(f"\nFIGURE limits/{kind}-at-capacity: {told.message!r}", file=sys.stderr)


async def test_a_backend_refusing_every_attempt_leaves_the_session_going(gated):
    address, gates = gated
    await wait_info(address, lambda d: d["active_sessions"] == "0", "the earlier sessions to close")
    gates["stt"].refuse()
    probe, _ = await admitted_session(address)
    try:
        full = (await probe.wait_for(lambda e: e.HasField("error") and "at capacity" in e.error.message)).error
        assert full.source == "stt" and full.code == "RESOURCE_EXHAUSTED" and not full.fatal, full
        assert "reopened 5 times" in full.message and "typed input still works" in full.message, full
        await probe.send_text("are you there")
        ended = (await probe.wait_for(event_is("turn_ended", turn_number=1))).turn_ended
        assert ended.reason == pb.TurnEnded.REASON_ANSWERED, probe.kinds()
        gates["stt"].refuse(0)  # room again: the next attempt takes the stream
        back = (await probe.wait_for(lambda e: e.HasField("error") and "it was reopened (" in e.error.message)).error
        assert back.source == "stt" and not back.fatal, back
        await spoken_turn(probe, 2)
        assert not probe.of("session_ended"), probe.kinds()
    finally:
        gates["stt"].refuse(0)
        await probe.__aexit__(None, None, None)
    print(f"\nFIGURE limits/stt-full: {full.message!r}; then {back.message!r}", file=sys.stderr)
