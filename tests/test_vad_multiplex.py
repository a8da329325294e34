"""VadService.DetectMany: many sessions' VAD streams over one call.

On the real VAD service (Silero, Smart Turn, and again with the fake provider): each stream
gets exactly the events a Detect call on the same audio gets, and bad input ends only its own
stream, in-band. Through the
orchestrator (the fake services): sessions share the call, a session-per-call setting still
works, and when the VAD process dies and comes back, the sessions on the call end with a
VAD error and a later session opens a fresh call.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from support import (
    PCM16_16K, START_S, ConverseProbe, FakeScript, Processes, backend_env, event_is, fake_mesh, free_port, silence,
    stop_process, tone, wait_serving,
)
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, vad_pb2, vad_pb2_grpc
from voicemesh.client.wavio import load_for_sending

FIXTURES = Path(__file__).parent / "fixtures"
PIECE = 640  # 40 ms at 16 kHz


def _config(**overrides) -> vad_pb2.DetectRequest:
    return vad_pb2.DetectRequest(config=vad_pb2.VadConfig(format=PCM16_16K, **overrides))


def _audio(samples: np.ndarray) -> vad_pb2.DetectRequest:
    return vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=samples.astype("<i2").tobytes()))


def _pieces(samples: np.ndarray) -> list[vad_pb2.DetectRequest]:
    return [_audio(samples[i : i + PIECE]) for i in range(0, len(samples), PIECE)]


def _describe(response: vad_pb2.DetectResponse) -> tuple[str, int]:
    kind = response.WhichOneof("event")
    return kind, getattr(response, kind).offset_ms


def _detect_many(stub, streams: dict[int, list[vad_pb2.DetectRequest]], extra_batches=()) -> dict[int, list]:
    """Interleave the streams' messages, a piece of each per batch; returns every event by stream."""
    def batches():
        for step in range(max(len(messages) for messages in streams.values())):
            yield vad_pb2.DetectManyRequest(messages=[
                vad_pb2.DetectStreamMessage(stream_id=stream_id, request=messages[step])
                for stream_id, messages in streams.items() if step < len(messages)])
        yield from extra_batches

    events: dict[int, list] = {stream_id: [] for stream_id in streams}
    for response in stub.DetectMany(batches(), timeout=180):
        for event in response.events:
            events.setdefault(event.stream_id, []).append(event)
    return events


@pytest.fixture(scope="module")
def fake_vad(tmp_path_factory):
    """The real VAD servicer in front of its fake provider."""
    procs = Processes(tmp_path_factory.mktemp("fake-vad"))
    try:
        yield fake_mesh(procs, FakeScript(), services=("vad",), name="fake-vad")
    finally:
        procs.stop_all()


@pytest.fixture(scope="module", params=[pytest.param("models", marks=[pytest.mark.e2e, pytest.mark.models]), "fake"])
def vad_stub(request):
    """The VAD on Silero (and Smart Turn), or the same servicer with the fake provider."""
    mesh = request.getfixturevalue("real_mesh" if request.param == "models" else "fake_vad")
    channel = grpc.insecure_channel(mesh.address("vad"))
    yield vad_pb2_grpc.VadServiceStub(channel)
    channel.close()


def test_each_stream_gets_what_detect_gets(vad_stub):
    speech = np.concatenate((load_for_sending(FIXTURES / "question_capital.wav"), np.zeros(16000 * 4, np.int16)))
    alone = [_describe(r) for r in vad_stub.Detect(iter([_config(), *_pieces(speech)]), timeout=180)]
    assert [kind for kind, _ in alone] == ["speech_started", "speech_stopped"]

    quiet = np.zeros(len(speech), np.int16)
    streams = {7: [_config(), *_pieces(speech)], 8: [_config(), *_pieces(quiet)], 9: [_config(), *_pieces(speech)]}
    events = _detect_many(vad_stub, streams)
    assert [_describe(e.response) for e in events[7]] == alone
    assert [_describe(e.response) for e in events[9]] == alone
    assert events[8] == []


def test_bad_input_ends_only_its_own_stream(vad_stub):
    speech = np.concatenate((load_for_sending(FIXTURES / "question_capital.wav"), np.zeros(16000 * 4, np.int16)))
    flood = vad_pb2.DetectManyRequest(messages=[
        vad_pb2.DetectStreamMessage(stream_id=5, request=_audio(np.zeros(PIECE, np.int16))) for _ in range(600)])
    late = vad_pb2.DetectManyRequest(messages=[vad_pb2.DetectStreamMessage(stream_id=2, request=_config())])
    # Opened and closed in one request: its task is cancelled before it ever runs, and must
    # still be forgotten, or the call could never end (the helper waits for it to end).
    opened_and_closed = vad_pb2.DetectManyRequest(messages=[
        vad_pb2.DetectStreamMessage(stream_id=10, request=_config()), vad_pb2.DetectStreamMessage(stream_id=10, close=True)])
    streams = {
        1: [_config(), *_pieces(speech)],  # good: unaffected by the others
        2: [_audio(np.zeros(PIECE, np.int16))],  # no config first
        3: [_config(confidence=2.0)],  # out of range
        4: [_config(), vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=b"\x00" * 321))],  # odd-length PCM16
        5: [_config()],  # then 600 messages in one batch: more than a stream may queue
        6: [_config(), _config()],  # config twice
    }
    events = _detect_many(vad_stub, streams, extra_batches=[flood, late, opened_and_closed])

    def error(stream_id):
        assert len(events[stream_id]) == 1, events[stream_id]  # one error, nothing after it
        return events[stream_id][0].error.code, events[stream_id][0].error.message

    assert [_describe(e.response)[0] for e in events[1]] == ["speech_started", "speech_stopped"]
    assert error(2)[0] == "FAILED_PRECONDITION" and "first message must be `config`" in error(2)[1]
    assert error(3)[0] == "INVALID_ARGUMENT" and "confidence" in error(3)[1]
    assert error(4)[0] == "INVALID_ARGUMENT" and "whole number" in error(4)[1]
    assert error(5)[0] == "RESOURCE_EXHAUSTED" and "fell 500 messages behind" in error(5)[1]
    assert error(6)[0] == "INVALID_ARGUMENT" and "config may only be sent once" in error(6)[1]
    assert all(e.error.source == "vad" and e.error.fatal for sid in (2, 3, 4, 5, 6) for e in events[sid])
    assert 10 not in events  # closed by the client: nothing comes back for it
    assert vad_stub.Info(vad_pb2.VadServiceInfoRequest(), timeout=10).info.service == "vad"


# -- through the orchestrator ------------------------------------------------------------------


class _SplitMesh:
    """The fake services: the VAD in a process of its own (so it can die alone), the others in a
    mesh; orchestrators in front with a chosen VOICEMESH_VAD_MULTIPLEX."""

    def __init__(self, procs: Processes):
        self.procs = procs
        self.vad_port = free_port()
        self.vad = self.start_vad()
        self.others = backend_env(fake_mesh(procs, FakeScript(), services=("stt", "llm", "tts"), name="fakes-others"))

    def start_vad(self):
        vad = self.procs.serve_fake("vad", self.vad_port, FakeScript())
        wait_serving(f"127.0.0.1:{self.vad_port}", vad, timeout=START_S)
        return vad

    def orchestrator(self, multiplex: str) -> str:
        port = free_port()
        env = {"VOICEMESH_VAD_ADDR": f"127.0.0.1:{self.vad_port}", **self.others, "VOICEMESH_VAD_MULTIPLEX": multiplex}
        orchestrator = self.procs.serve("orchestrator", port, env)
        wait_serving(f"127.0.0.1:{port}", orchestrator, timeout=START_S)
        return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("vad-multiplex"))
    try:
        yield _SplitMesh(procs)
    finally:
        procs.stop_all()


async def _spoken_turn(address: str) -> tuple[int, int]:
    async with ConverseProbe(address, pb.SessionConfig(input_format=PCM16_16K)) as probe:
        # 32 ms steps: the fake VAD scores 32 ms windows (as Silero does), the segmenter decides.
        await probe.send_audio(np.concatenate((silence(0.32), tone(0.64), silence(1.0))))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        user = [s.offset_ms for s in probe.of("speaking")
                if s.kind in (pb.SpeakingEvent.KIND_USER_STARTED, pb.SpeakingEvent.KIND_USER_STOPPED)]
        return tuple(user)


@pytest.mark.parametrize("multiplex", ["2", "0"])
async def test_concurrent_sessions_each_get_their_own_events(split_mesh, multiplex):
    address = split_mesh.orchestrator(multiplex)
    results = await asyncio.gather(*(_spoken_turn(address) for _ in range(4)))
    assert results == [(320, 960)] * 4  # where each session's tone begins and ends


async def test_vad_death_ends_its_sessions_and_a_later_session_reconnects(split_mesh):
    address = split_mesh.orchestrator("1")
    assert await _spoken_turn(address) == (320, 960)  # the call is open
    async with ConverseProbe(address, pb.SessionConfig(input_format=PCM16_16K)) as probe:
        await probe.wait_for(lambda e: e.HasField("session_started"))
        stop_process(split_mesh.vad)  # the session learns it from the call, without sending anything
        await probe.wait_for(lambda e: e.HasField("session_ended"))
        errors = probe.of("error")
        assert errors and errors[0].source == "vad" and errors[0].fatal
        assert probe.of("session_ended")[0].reason == pb.SessionEnded.REASON_ERROR
    split_mesh.vad = split_mesh.start_vad()
    # The orchestrator's channel reconnects with backoff: retry until a session gets through, up
    # to a deadline; past it, the last attempt's error (with its events) is the failure.
    deadline = time.monotonic() + START_S
    while True:
        try:
            assert await _spoken_turn(address) == (320, 960)
            break
        except (AssertionError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
