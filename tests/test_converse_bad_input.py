"""Bad input on Converse ends only that stream, with a clear status; other sessions go on."""
from __future__ import annotations

import grpc
import pytest

from support import PCM16_16K, ConverseProbe, event_is
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc


async def _first_status(address: str, requests: list[pb.ConverseRequest]) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        # A deadline, not a speed claim: a stream the orchestrator never ends fails the test
        # with DEADLINE_EXCEEDED (reported as the status) instead of hanging it.
        call = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Converse(timeout=120)
        for request in requests:
            await call.write(request)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()
        return grpc.StatusCode.OK, ""


def _config(**fields) -> pb.ConverseRequest:
    return pb.ConverseRequest(config=pb.SessionConfig(**fields))


def _audio(data: bytes) -> pb.ConverseRequest:
    return pb.ConverseRequest(audio=common_pb2.AudioChunk(data=data))


CASES = {
    "first message not config": (
        [_audio(b"\x00\x00" * 320)], grpc.StatusCode.FAILED_PRECONDITION, "first message must be `config`"),
    "unknown encoding": (
        [_config(input_format=common_pb2.AudioFormat(encoding=7, sample_rate_hz=16000))],
        grpc.StatusCode.INVALID_ARGUMENT, "unsupported encoding"),
    "unspecified encoding": (
        [_config(input_format=common_pb2.AudioFormat(sample_rate_hz=16000))],
        grpc.StatusCode.INVALID_ARGUMENT, "unsupported encoding"),
    "sample rate too low": (
        [_config(input_format=common_pb2.AudioFormat(encoding=1, sample_rate_hz=4000))],
        grpc.StatusCode.INVALID_ARGUMENT, "outside 8000-48000"),
    "sample rate too high": (
        [_config(output_format=common_pb2.AudioFormat(encoding=1, sample_rate_hz=96000))],
        grpc.StatusCode.INVALID_ARGUMENT, "outside 8000-48000"),
    "empty audio": (
        [_config(input_format=PCM16_16K), _audio(b"")], grpc.StatusCode.INVALID_ARGUMENT, "empty audio chunk"),
    "odd-length pcm16": (
        [_config(input_format=PCM16_16K), _audio(b"\x00" * 641)], grpc.StatusCode.INVALID_ARGUMENT, "not a whole number"),
    "chunk longer than a second": (
        [_config(input_format=PCM16_16K), _audio(b"\x00\x00" * 20000)], grpc.StatusCode.INVALID_ARGUMENT, "longer than 1 s"),
    "message over the transport limit": (
        [_config(input_format=PCM16_16K), _audio(b"\x00\x00" * (3 << 20))],
        grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    "unknown dtmf digit": (
        [_config(input_format=PCM16_16K), pb.ConverseRequest(dtmf=pb.DtmfInput(digit="x"))],
        grpc.StatusCode.INVALID_ARGUMENT, "dtmf digit"),
    "first clause words over the limit": (
        [_config(turn=pb.TurnOptions(first_clause_words=51))],
        grpc.StatusCode.INVALID_ARGUMENT, "turn.first_clause_words 51 is over 50"),
    "config twice": (
        [_config(input_format=PCM16_16K), _config(input_format=PCM16_16K)],
        grpc.StatusCode.INVALID_ARGUMENT, "may only be sent once"),
    "audio after end": (
        # A turn is in progress, so the session is still ending when the audio arrives.
        [_config(input_format=PCM16_16K), pb.ConverseRequest(text=pb.TextInput(text="hi")),
         pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession())), _audio(b"\x00\x00" * 320)],
        grpc.StatusCode.FAILED_PRECONDITION, "after end"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_ends_only_that_stream(fake_mesh, case):
    requests, code, message = CASES[case]
    async with ConverseProbe(fake_mesh) as bystander:  # a healthy session running alongside
        await bystander.send_text("still here")
        status, details = await _first_status(fake_mesh, requests)
        assert status == code, details
        assert message in details
        await bystander.wait_for(event_is("turn_ended", turn_number=1))
        assert [t.text for t in bystander.of("bot_text")] == ["You said: still here."]
        await bystander.send_text("and again")
        await bystander.wait_for(event_is("turn_ended", turn_number=2))


async def test_closing_without_end_is_cancel(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send_text("hello")
        await probe.wait_for(lambda e: e.HasField("turn_started"))
        await probe.call.done_writing()
        ended = await probe.wait_for(lambda e: e.HasField("session_ended"))
        assert ended.session_ended.reason == pb.SessionEnded.REASON_CANCELLED
