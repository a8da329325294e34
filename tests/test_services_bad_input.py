"""Bad input to each real service ends that stream with a clear status; the service keeps serving.
Each case runs against the embedded models and against the same servicers in front of their
fake providers (`--provider fake`): validation is the servicer's, whatever the provider."""
from __future__ import annotations

import grpc
import pytest

from support import BACKENDS, FakeScript, Processes, fake_mesh
from voicemesh.v1 import common_pb2, llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc

INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)


def _status(channel, method, requests) -> tuple[grpc.StatusCode, str]:
    try:
        for _ in method(iter(requests), timeout=60):
            pass
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def _audio(data: bytes):
    return common_pb2.AudioChunk(data=data)


def _fmt(encoding=1, rate=16000):
    return common_pb2.AudioFormat(encoding=encoding, sample_rate_hz=rate, channels=1)


AUDIO_CASES = {
    "closed before any message": (lambda R, C: [], PRECONDITION, "closed before its first message (config)"),
    "first message not config": (lambda R, C: [R(audio=_audio(b"\x00\x00" * 160))], PRECONDITION,
                                 "first message must be `config`"),
    "unknown encoding": (lambda R, C: [R(config=C(format=_fmt(encoding=9)))], INVALID, "unsupported encoding"),
    "sample rate outside 8-48 kHz": (lambda R, C: [R(config=C(format=_fmt(rate=96000)))], INVALID, "outside 8000-48000"),
    "empty pcm": (lambda R, C: [R(config=C(format=PCM16_16K)), R(audio=_audio(b""))], INVALID, "empty audio chunk"),
    "odd-length pcm16": (lambda R, C: [R(config=C(format=PCM16_16K)), R(audio=_audio(b"\x00" * 321))], INVALID, "whole number"),
    "oversized chunk": (lambda R, C: [R(config=C(format=PCM16_16K)), R(audio=_audio(b"\x00\x00" * 17000))], INVALID,
                        "longer than 1 s"),
    "over the transport limit": (lambda R, C: [R(config=C(format=PCM16_16K)), R(audio=_audio(b"\x00" * (5 << 20)))],
                                 grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
}


@pytest.fixture(scope="module")
def fake_services(tmp_path_factory):
    """The four servicers in front of their fake providers, no orchestrator."""
    procs = Processes(tmp_path_factory.mktemp("fake-services"))
    try:
        yield fake_mesh(procs, FakeScript(), services=BACKENDS)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module", params=[pytest.param("models", marks=[pytest.mark.e2e, pytest.mark.models]), "fake"])
def channels(request):
    mesh = request.getfixturevalue("real_mesh" if request.param == "models" else "fake_services")
    options = [("grpc.max_send_message_length", 64 << 20)]
    opened = {kind: grpc.insecure_channel(mesh.address(kind), options=options) for kind in BACKENDS}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.mark.parametrize("case", sorted(AUDIO_CASES))
@pytest.mark.parametrize("kind", ["vad", "stt"])
def test_audio_services_reject_bad_input(channels, kind, case):
    build, code, message = AUDIO_CASES[case]
    if kind == "vad":
        stub, request, config = vad_pb2_grpc.VadServiceStub(channels[kind]), vad_pb2.DetectRequest, vad_pb2.VadConfig
        method, info = stub.Detect, lambda: stub.Info(vad_pb2.VadServiceInfoRequest(), timeout=10)
    else:
        stub, request, config = stt_pb2_grpc.SttServiceStub(channels[kind]), stt_pb2.RecognizeRequest, stt_pb2.SttConfig
        method, info = stub.Recognize, lambda: stub.Info(stt_pb2.SttServiceInfoRequest(), timeout=10)
    status, details = _status(channels[kind], method, build(request, config))
    assert status == code, details
    assert message in details
    assert info().info.service == kind  # the process is still serving
    good = [request(config=config(format=PCM16_16K)), request(audio=_audio(b"\x00\x00" * 1600))]
    assert _status(channels[kind], method, good)[0] == grpc.StatusCode.OK


TTS_CASES = {
    "closed before any message": ([], PRECONDITION, "closed before its first message (config)"),
    "first message not config": ([tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(text="hi"))], PRECONDITION,
                                 "first message must be `config`"),
    "unknown voice": ([tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(voice="nobody", format=PCM16_16K))], INVALID,
                      "unknown voice"),
    "speed out of range": ([tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(speed=5, format=PCM16_16K))], INVALID, "speed"),
    "unknown encoding": ([tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=_fmt(encoding=5)))], INVALID,
                         "unsupported encoding"),
    "sample rate outside 8-48 kHz": ([tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=_fmt(rate=4000)))], INVALID,
                                     "outside 8000-48000"),
}


@pytest.mark.parametrize("case", sorted(TTS_CASES))
def test_tts_rejects_bad_input(channels, case):
    requests, code, message = TTS_CASES[case]
    stub = tts_pb2_grpc.TtsServiceStub(channels["tts"])
    status, details = _status(channels["tts"], stub.Synthesize, requests)
    assert status == code, details
    assert message in details
    good = [tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=PCM16_16K)),
            tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=1, text="Still here.", end_of_segment=True))]
    responses = list(stub.Synthesize(iter(good), timeout=60))
    assert responses[-1].segment_done.spoken_text == "Still here."


def _chat(*messages, tools=()):
    return llm_pb2.GenerateRequest(chat=llm_pb2.ChatRequest(messages=list(messages), tools=list(tools)))


LLM_CASES = {
    "closed before any message": ([], PRECONDITION, "closed before its first message (chat)"),
    "first message not chat": ([llm_pb2.GenerateRequest(tool_result=llm_pb2.ToolResult(tool_call_id="x"))], PRECONDITION,
                               "first message must be `chat`"),
    "no messages": ([_chat()], INVALID, "messages is empty"),
    "unknown role": ([_chat(llm_pb2.ChatMessage(role="robot", content="hi"))], INVALID, "is not one of"),
    "tool schema not JSON": ([_chat(llm_pb2.ChatMessage(role="user", content="hi"),
                                    tools=[llm_pb2.Tool(name="f", parameters_json="{oops")])], INVALID, "not valid JSON"),
    "bad tool name": ([_chat(llm_pb2.ChatMessage(role="user", content="hi"),
                             tools=[llm_pb2.Tool(name="no spaces", parameters_json="{}")])], INVALID, "tool name"),
}


@pytest.mark.parametrize("case", sorted(LLM_CASES))
def test_llm_rejects_bad_input(channels, case):
    requests, code, message = LLM_CASES[case]
    stub = llm_pb2_grpc.LlmServiceStub(channels["llm"])
    status, details = _status(channels["llm"], stub.Generate, requests)
    assert status == code, details
    assert message in details
    assert stub.Info(llm_pb2.LlmServiceInfoRequest(), timeout=10).info.service == "llm"
