"""The fake providers themselves: their script, the VAD's windows through the real segmenter,
and the STT's held finals (in process, and over the control RPC of a served fake STT)."""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from support import FakeScript, Processes, fake_mesh, release_finals, silence, tone
from voicemesh.runtime.fakes import SCRIPT_ENV, TRANSCRIPTS_ENV
from voicemesh.stt.providers.base import SttEndOfUtterance, SttTranscript
from voicemesh.stt.providers.fake import FakeSttProvider
from voicemesh.v1 import common_pb2, stt_pb2, stt_pb2_grpc
from voicemesh.vad.providers.fake import FakeVadProvider
from voicemesh.vad.segmenter import SegmenterParams, SpeechSegmenter, window_volume

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)


def test_script_from_inline_json_a_file_and_the_transcripts_variable(tmp_path):
    assert FakeScript.load({}) == FakeScript()
    inline = FakeScript.load({SCRIPT_ENV: json.dumps({"stt_final_ms": 40, "transcripts": ["a", "b"]})})
    assert inline.stt_final_ms == 40 and inline.transcripts == ("a", "b")
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"reply": "Fixed.", "fallback": "same words"}))
    from_file = FakeScript.load({SCRIPT_ENV: str(path), TRANSCRIPTS_ENV: "one,two"})
    assert from_file.reply == "Fixed." and from_file.transcripts == ("one", "two")
    assert [from_file.final_text(n) for n in range(3)] == ["one", "two", "same words"]
    assert FakeScript().final_text(4) == "utterance 5"
    assert FakeScript.load(FakeScript(ms_per_char=5).to_env()) == FakeScript(ms_per_char=5)  # a round trip
    with pytest.raises(ValueError, match="unknown fields"):
        FakeScript.from_dict({"stt_finall_ms": 40})


async def test_fake_vad_windows_drive_the_real_segmenter():
    """32 ms windows, loud ones probability 1: the segmenter places the segment on the tone."""
    stream = FakeVadProvider(FakeScript()).open_stream()
    segmenter = SpeechSegmenter(SegmenterParams())
    audio = np.concatenate((silence(0.32), tone(0.64), silence(1.0)))
    events, fed = [], 0
    for begin in range(0, len(audio), 640):  # 40 ms pieces: windows span them
        piece = audio[begin : begin + 640]
        for result in await stream.process(piece):
            assert result.end_offset_samples % 512 == 0 and result.probability in (0.0, 1.0)
            window = audio[result.end_offset_samples - 512 : result.end_offset_samples]
            events += segmenter.push(result.end_offset_samples, result.probability, window_volume(window))
        fed += len(piece)
    assert [(e.kind.value, e.offset_ms) for e in events] == [("started", 320), ("stopped", 960)]


def _stream(provider: FakeSttProvider, session_id: str):
    return provider.open_stream(SimpleNamespace(session_id=session_id))  # the config a provider could be given


async def _results(stream, count: int) -> list:
    iterator = aiter(stream.results())
    return [await asyncio.wait_for(anext(iterator), 10) for _ in range(count)]


async def _utterance(stream, turn_id: str) -> None:
    await stream.turn_start(turn_id, 0)
    await stream.push_audio(tone(0.4).tobytes())
    await stream.finalize()


async def test_held_finals_wait_for_their_release_in_order():
    provider = FakeSttProvider(FakeScript(transcripts=("first", "second")))
    held, free = _stream(provider, "hold-a"), _stream(provider, "free")
    await _utterance(held, "t1")
    await _utterance(held, "t2")
    await _utterance(free, "f1")
    interim, final, end = await _results(free, 3)  # not held: at once
    assert (interim.is_final, final.text, end.turn_id) == (False, "first", "f1")
    interims = await _results(held, 2)  # interims are never held
    assert [(r.turn_id, r.is_final) for r in interims] == [("t1", False), ("t2", False)]
    assert held._out.empty()  # both finals wait
    provider.release("hold-a")
    finals = await _results(held, 4)
    assert [(type(r).__name__, r.turn_id, getattr(r, "text", "")) for r in finals] == [
        ("SttTranscript", "t1", "first"), ("SttEndOfUtterance", "t1", ""),
        ("SttTranscript", "t2", "second"), ("SttEndOfUtterance", "t2", "")]
    await _utterance(held, "t3")  # released: later finals are not held
    assert [type(r) for r in (await _results(held, 3))[1:]] == [SttTranscript, SttEndOfUtterance]


async def test_release_before_the_session_opens_and_the_empty_finals():
    provider = FakeSttProvider(FakeScript(transcripts=("question", "more")))
    provider.release("hold-early")
    early = _stream(provider, "hold-early")
    await _utterance(early, "t1")
    assert (await _results(early, 2))[1].text == "question"
    cough = _stream(provider, "hold-cough-x")
    await _utterance(cough, "t1")
    await _utterance(cough, "t2")
    provider.release("hold-cough-x")
    texts = [r.text for r in await _results(cough, 6) if isinstance(r, SttTranscript) and r.is_final]
    assert texts == ["question", ""]  # a cough after the question
    silent = _stream(provider, "silent-x")
    await _utterance(silent, "t1")
    assert [r.text for r in await _results(silent, 2) if not isinstance(r, SttEndOfUtterance)][-1] == ""


async def test_a_final_comes_stt_final_ms_after_finalize_and_close_waits_for_it():
    stream = _stream(FakeSttProvider(FakeScript(words_per_second=0, stt_final_ms=50)), "s")
    await stream.turn_start("t1", 0)
    await stream.finalize()
    started = time.monotonic()
    await stream.close()  # the end of results comes after the final on its way
    results = [r async for r in stream.results()]
    assert [type(r) for r in results] == [SttTranscript, SttEndOfUtterance]
    assert time.monotonic() - started >= 0.045


@pytest.fixture(scope="module")
def fake_stt(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("fake-stt"))
    try:
        yield fake_mesh(procs, FakeScript(transcripts=("held words",)), services=("stt",)).address("stt")
    finally:
        procs.stop_all()


def _info(address: str) -> dict[str, str]:
    with grpc.insecure_channel(address) as channel:
        return dict(stt_pb2_grpc.SttServiceStub(channel).Info(stt_pb2.SttServiceInfoRequest(), timeout=10).info.details)


async def test_the_control_rpc_releases_a_served_sessions_finals(fake_stt):
    """Through the real servicer: the final is held, and comes once the control RPC released it.
    Results leave in order, so the next turn's interim arriving first shows the final was held."""
    def request(**fields):
        return stt_pb2.RecognizeRequest(**fields)

    def words(turn_id):
        audio = common_pb2.AudioChunk(data=tone(0.2).tobytes())  # 200 ms of speech: one interim word
        return [request(turn_start=common_pb2.TurnContext(turn_id=turn_id)), request(audio=audio)]

    async with grpc.aio.insecure_channel(fake_stt) as channel:
        call = stt_pb2_grpc.SttServiceStub(channel).Recognize()

        async def send(*requests):
            for one in requests:
                await call.write(one)

        async def read():
            return await asyncio.wait_for(call.read(), 30)

        await send(request(config=stt_pb2.SttConfig(format=PCM16_16K, session_id="hold-wire")), *words("t1"))
        assert (await read()).transcript.turn_id == "t1"  # the interim: the stream is open
        await send(request(finalize=stt_pb2.Finalize(turn_id="t1")), *words("t2"))
        interim = (await read()).transcript
        assert (interim.turn_id, interim.is_final) == ("t2", False)  # not t1's final: it is held
        assert (await asyncio.to_thread(_info, fake_stt))["held"] == "2"  # the final and its end of utterance
        await asyncio.to_thread(release_finals, fake_stt, "hold-wire")
        final, end = await read(), await read()
        seen = (final.transcript.text, final.transcript.is_final, end.end_of_utterance.turn_id)
        assert seen == ("held words", True, "t1")
        await send(request(finalize=stt_pb2.Finalize(turn_id="t2")))  # released: from now on at once
        final, end = await read(), await read()
        assert (final.transcript.text, end.end_of_utterance.turn_id) == ("utterance 2", "t2")
        await call.done_writing()
        assert await read() == grpc.aio.EOF
        assert (await asyncio.to_thread(_info, fake_stt))["held"] == "0"


async def test_the_bench_latencies_script_the_same_reply_as_the_wire_fakes():
    from bench.scenario import FIRST_DELTA, REST_WORDS, TRANSCRIPT, Latencies
    from voicemesh.llm.providers.base import ChatTurn, GenerationParams, TextDelta
    from voicemesh.llm.providers.fake import FakeLlmProvider

    script = FakeScript.from_dict(Latencies().fake_script())
    assert script.final_text(7) == TRANSCRIPT and script.words_per_second == 0 and script.stt_final_ms == 40
    events = [e async for e in FakeLlmProvider(script).stream([ChatTurn("user", "hi")], [], GenerationParams())]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas[0].strip() == FIRST_DELTA and [d.strip() for d in deltas[1:]] == REST_WORDS
