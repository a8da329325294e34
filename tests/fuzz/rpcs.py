"""Every RPC of every service, with the request sequences a fuzz case sends to it.

A valid first message is the config (chat for Generate) a correct client sends, with the
fields a client must get right drawn from sane values and the rest wild; the messages after
it are the stream's other requests, mostly valid; every position may instead hold a wild
message of the request type or garbage bytes (strategies.rpc_sequence).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from hypothesis import strategies as st

from fuzz.strategies import FORMAT_HINTS, TEXT, TEXTS, garbage, one_of_payloads, pcm16, rpc_sequence, valid, wild
from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as opb, stt_pb2, tts_pb2, vad_pb2

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)


@dataclass(frozen=True)
class Rpc:
    name: str  # "VadService/Detect"
    kind: str  # the mesh child that serves it
    request_cls: type
    response_cls: type
    streaming: bool
    requests: st.SearchStrategy  # list[bytes] for a stream, bytes for a unary call

    @property
    def method(self) -> str:
        return f"/voicemesh.v1.{self.name}"


def _fmt_hints(**extra) -> dict:
    return {**FORMAT_HINTS, **extra}


def _format(rate_choices=(8000, 16000, 24000, 48000)) -> st.SearchStrategy:
    rates = {**FORMAT_HINTS, "voicemesh.v1.AudioFormat.sample_rate_hz": st.sampled_from(rate_choices)}
    return st.one_of(st.just(PCM16_16K), valid(common_pb2.AudioFormat.DESCRIPTOR, rates))


EDGE_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-45, 1e308, -1.0])


def _unit(low=0.0, high=1.0):
    """Unset, in range, or (one time in five) an edge value the range check must catch."""
    return st.one_of(st.just(0.0), st.floats(low, high), st.floats(low, high), st.floats(low, high), EDGE_FLOATS)


TURN = valid(common_pb2.TurnContext.DESCRIPTOR, {
    "voicemesh.v1.TurnContext.turn_id": st.sampled_from(["s-1", "s-2", ""]),
    "voicemesh.v1.TraceContext.traceparent": st.sampled_from(
        ["", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "00-zz-yy-01", "garbage"]),
})
AUDIO = valid(common_pb2.AudioChunk.DESCRIPTOR, FORMAT_HINTS)

# ---- VAD ------------------------------------------------------------------------------------
VAD_CONFIG = valid(vad_pb2.VadConfig.DESCRIPTOR, _fmt_hints(**{
    "voicemesh.v1.VadConfig.format": _format(), "voicemesh.v1.VadConfig.confidence": _unit(),
    "voicemesh.v1.VadConfig.start_secs": _unit(0, 5), "voicemesh.v1.VadConfig.stop_secs": _unit(0, 3),
    "voicemesh.v1.VadConfig.min_volume": _unit(), "voicemesh.v1.VadConfig.smart_turn": st.just(False),
    "voicemesh.v1.VadConfig.max_silence_secs": _unit(0, 10)}))
DETECT_FIRST = VAD_CONFIG.map(lambda c: vad_pb2.DetectRequest(config=c))
DETECT_REST = st.one_of(AUDIO.map(lambda a: vad_pb2.DetectRequest(audio=a)), AUDIO.map(lambda a: vad_pb2.DetectRequest(audio=a)),
                        TURN.map(lambda t: vad_pb2.DetectRequest(turn=t)))
STREAM_IDS = st.integers(0, 4)


def _detect_many() -> st.SearchStrategy:
    """Batches of stream messages; each stream's requests are a Detect sequence's."""
    message = st.one_of(
        st.tuples(STREAM_IDS, DETECT_FIRST).map(lambda p: vad_pb2.DetectStreamMessage(stream_id=p[0], request=p[1])),
        st.tuples(STREAM_IDS, DETECT_REST).map(lambda p: vad_pb2.DetectStreamMessage(stream_id=p[0], request=p[1])),
        STREAM_IDS.map(lambda i: vad_pb2.DetectStreamMessage(stream_id=i, close=True)),
        wild(vad_pb2.DetectStreamMessage.DESCRIPTOR))
    batch = st.lists(message, max_size=8).map(lambda ms: vad_pb2.DetectManyRequest(messages=ms))
    return rpc_sequence(vad_pb2.DetectManyRequest, batch, batch, max_rest=8)


# ---- STT ------------------------------------------------------------------------------------
STT_CONFIG = valid(stt_pb2.SttConfig.DESCRIPTOR, _fmt_hints(**{"voicemesh.v1.SttConfig.format": _format()}))
RECOGNIZE_REST = st.one_of(
    AUDIO.map(lambda a: stt_pb2.RecognizeRequest(audio=a)), AUDIO.map(lambda a: stt_pb2.RecognizeRequest(audio=a)),
    TURN.map(lambda t: stt_pb2.RecognizeRequest(turn_start=t)),
    st.sampled_from(["s-1", "s-2", ""]).map(lambda t: stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=t))))

# ---- LLM ------------------------------------------------------------------------------------
ROLE = st.sampled_from(["user", "user", "assistant", "system", "tool", "robot", ""])
WEATHER = llm_pb2.Tool(name="get_weather", description="The weather in a city",
                       parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')
CHAT = valid(llm_pb2.ChatRequest.DESCRIPTOR, {
    "voicemesh.v1.ChatMessage.role": ROLE, "voicemesh.v1.ChatMessage.content": TEXT,
    "voicemesh.v1.ToolCall.arguments_json": st.sampled_from(['{"city": "Paris"}', "{}", "[1]", "{oops", ""]),
    "voicemesh.v1.Tool.parameters_json": st.sampled_from(["{}", WEATHER.parameters_json, "null", "{oops"]),
    "voicemesh.v1.Tool.name": st.sampled_from(["get_weather", "f", "no spaces", ""]),
    "voicemesh.v1.GenerationParams.max_tokens": st.integers(0, 5000),
})
CHAT = st.one_of(CHAT, st.sampled_from(TEXTS).map(lambda text: llm_pb2.ChatRequest(
    messages=[llm_pb2.ChatMessage(role="user", content=text)], tools=[WEATHER])))
TOOL_RESULT = valid(llm_pb2.ToolResult.DESCRIPTOR, {
    "voicemesh.v1.ToolResult.tool_call_id": st.sampled_from(["call_0", "call_1", "call_2", "x", ""])})

# ---- TTS ------------------------------------------------------------------------------------
TTS_CONFIG = valid(tts_pb2.TtsConfig.DESCRIPTOR, _fmt_hints(**{
    "voicemesh.v1.TtsConfig.format": _format(), "voicemesh.v1.TtsConfig.voice": st.sampled_from(["", "", "", "nobody"]),
    "voicemesh.v1.TtsConfig.speed": st.one_of(st.just(0.0), st.floats(0.4, 2.1))}))
TEXT_PIECE = valid(tts_pb2.TextPiece.DESCRIPTOR, {
    "voicemesh.v1.TextPiece.segment_id": st.integers(0, 3), "voicemesh.v1.TextPiece.text": TEXT})
SYNTH_REST = st.one_of(TEXT_PIECE.map(lambda t: tts_pb2.SynthesizeRequest(text=t)),
                       TEXT_PIECE.map(lambda t: tts_pb2.SynthesizeRequest(text=t)),
                       st.just(tts_pb2.SynthesizeRequest(flush=tts_pb2.Flush())),
                       # over the 20,000 characters of a call: rare, or most streams would end on it
                       st.sampled_from([tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(text="x" * 20_001))] + [
                           tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(text="Sure.", end_of_segment=True))] * 5))

# ---- Converse -------------------------------------------------------------------------------
# A voice the TTS does not have: until the orchestrator refuses it at config time (docs/fuzzing.md,
# finding 6) a turn's reply races the TTS's INVALID_ARGUMENT and sometimes fails INTERNAL, so only
# the seeded `make fuzz` draws it; CI (derandomized) must not flake on a known, reported finding.
VOICES = ["", "", "", "", "nobody"] if os.environ.get("VOICEMESH_FUZZ_SEED") else [""]
SESSION_CONFIG = valid(opb.SessionConfig.DESCRIPTOR, _fmt_hints(**{
    "voicemesh.v1.SessionConfig.input_format": _format(), "voicemesh.v1.SessionConfig.output_format": _format(),
    "voicemesh.v1.SessionConfig.system_prompt": st.sampled_from(["", "Be brief."]),
    "voicemesh.v1.SessionConfig.voice": st.sampled_from(VOICES),
    "voicemesh.v1.VadOptions.confidence": _unit(), "voicemesh.v1.VadOptions.start_secs": _unit(0, 1),
    "voicemesh.v1.VadOptions.stop_secs": _unit(0, 1), "voicemesh.v1.VadOptions.min_volume": _unit(),
    "voicemesh.v1.TurnOptions.smart_turn": st.just(False),
    "voicemesh.v1.TurnOptions.final_transcript_timeout_secs": _unit(0, 3),
    "voicemesh.v1.TurnOptions.final_transcript_give_up_secs": _unit(3, 10),
    "voicemesh.v1.TurnOptions.max_silence_secs": _unit(1, 10),
    "voicemesh.v1.LifecycleOptions.idle_timeout_secs": _unit(0, 5),
    "voicemesh.v1.LifecycleOptions.user_idle_secs": _unit(0, 5),
    "voicemesh.v1.LifecycleOptions.max_duration_secs": _unit(0, 10),
    "voicemesh.v1.ToolOptions.timeout_secs": _unit(0, 2),
    "voicemesh.v1.ToolOptions.tools": st.lists(st.sampled_from([WEATHER, WEATHER, llm_pb2.Tool(name="f")]), max_size=2),
    "voicemesh.v1.Greeting.text": TEXT, "voicemesh.v1.Say.text": TEXT,
    "voicemesh.v1.RecordingOptions.wav_path": st.sampled_from(["", "", "fuzz.wav", "../escape.wav", "/etc/passwd"]),
    "voicemesh.v1.RecordingOptions.sample_rate_hz": st.sampled_from([0, 8000, 16000, 7, 96000]),
    "voicemesh.v1.ToolCall.arguments_json": st.sampled_from(['{"city": "Paris"}', "{}", "{oops"]),
}))
CONTROL = st.one_of(
    st.just(opb.SessionControl(end=opb.EndSession())), st.just(opb.SessionControl(cancel=opb.CancelSession())),
    st.just(opb.SessionControl(interrupt=opb.Interrupt())),
    st.booleans().map(lambda m: opb.SessionControl(mute=opb.Mute(muted=m))),
    TEXT.map(lambda t: opb.SessionControl(say=opb.Say(text=t))), wild(opb.SessionControl.DESCRIPTOR))
CONVERSE_REST = st.one_of(
    pcm16().map(lambda d: opb.ConverseRequest(audio=common_pb2.AudioChunk(data=d))),
    pcm16().map(lambda d: opb.ConverseRequest(audio=common_pb2.AudioChunk(data=d))),
    TEXT.map(lambda t: opb.ConverseRequest(text=opb.TextInput(text=t))),
    CONTROL.map(lambda c: opb.ConverseRequest(control=c)),
    st.sampled_from("0123456789*#ABCDx").map(lambda d: opb.ConverseRequest(dtmf=opb.DtmfInput(digit=d))),
    valid(opb.ToolCallResult.DESCRIPTOR, {"voicemesh.v1.ToolCallResult.tool_call_id": st.sampled_from(["call_0", "x"])}).map(
        lambda r: opb.ConverseRequest(tool_result=r)))


def _info(request_cls) -> st.SearchStrategy[bytes]:
    """An Info request is empty: unknown fields, and bytes that are not a message at all."""
    return one_of_payloads(st.just(request_cls()), garbage(), st.binary(max_size=32))


def _rpcs() -> dict[str, Rpc]:
    streams = [
        ("VadService/Detect", "vad", vad_pb2.DetectRequest, vad_pb2.DetectResponse,
         rpc_sequence(vad_pb2.DetectRequest, DETECT_FIRST, DETECT_REST)),
        ("VadService/DetectMany", "vad", vad_pb2.DetectManyRequest, vad_pb2.DetectManyResponse, _detect_many()),
        ("SttService/Recognize", "stt", stt_pb2.RecognizeRequest, stt_pb2.RecognizeResponse,
         rpc_sequence(stt_pb2.RecognizeRequest, STT_CONFIG.map(lambda c: stt_pb2.RecognizeRequest(config=c)), RECOGNIZE_REST)),
        ("LlmService/Generate", "llm", llm_pb2.GenerateRequest, llm_pb2.GenerateResponse,
         rpc_sequence(llm_pb2.GenerateRequest, CHAT.map(lambda c: llm_pb2.GenerateRequest(chat=c)),
                      TOOL_RESULT.map(lambda r: llm_pb2.GenerateRequest(tool_result=r)), max_rest=4)),
        ("TtsService/Synthesize", "tts", tts_pb2.SynthesizeRequest, tts_pb2.SynthesizeResponse,
         rpc_sequence(tts_pb2.SynthesizeRequest, TTS_CONFIG.map(lambda c: tts_pb2.SynthesizeRequest(config=c)), SYNTH_REST)),
        ("OrchestratorService/Converse", "orchestrator", opb.ConverseRequest, opb.ConverseResponse,
         rpc_sequence(opb.ConverseRequest, SESSION_CONFIG.map(lambda c: opb.ConverseRequest(config=c)), CONVERSE_REST,
                      last=opb.ConverseRequest(control=opb.SessionControl(end=opb.EndSession())))),
    ]
    infos = [("VadService/Info", "vad", vad_pb2.VadServiceInfoRequest, vad_pb2.VadServiceInfoResponse),
             ("SttService/Info", "stt", stt_pb2.SttServiceInfoRequest, stt_pb2.SttServiceInfoResponse),
             ("LlmService/Info", "llm", llm_pb2.LlmServiceInfoRequest, llm_pb2.LlmServiceInfoResponse),
             ("TtsService/Info", "tts", tts_pb2.TtsServiceInfoRequest, tts_pb2.TtsServiceInfoResponse),
             ("OrchestratorService/Info", "orchestrator", opb.OrchestratorServiceInfoRequest,
              opb.OrchestratorServiceInfoResponse)]
    table = {name: Rpc(name, kind, req, resp, True, seq) for name, kind, req, resp, seq in streams}
    table.update({name: Rpc(name, kind, req, resp, False, _info(req)) for name, kind, req, resp in infos})
    return table


RPCS = _rpcs()
