"""Scripted fake VAD, STT, LLM and TTS services that speak the real voicemesh protos.

They run in their own process (`python -m tests.fakes.scripted --port N`), all four on one
port, with fixed, known behaviour so orchestrator tests can assert exact event sequences:

- VAD: a 20 ms frame is speech when its RMS is above SPEECH_RMS; start/stop after the
  configured start_secs/stop_secs, like the real segmenter.
- STT: the final transcript of the n-th utterance is the n-th entry of FAKE_TRANSCRIPTS
  (comma-separated env), else "utterance <n>"; after each turn start, an interim every
  200 ms of audio with WORDS_PER_SECOND words per second of audio so far ("w1 w2 ...").
  A late STT on demand: in a session whose id starts with "hold-", every final (and its
  end of utterance) is held, in order, until the test calls Control/Release with that
  session id (`release_finals`); "hold-cough-" also makes every final after the first empty
  (a cough after a question); in a session whose id starts with "silent-", finals are empty.
- LLM: replies "You said: <last user message>." word by word, TOKEN_DELAY_S apart; a
  message containing "long story" gets a 30-sentence reply (for barge-in tests). With
  tools declared, "weather in X and Y" calls get_weather once per city (in parallel), then
  answers "The tools said: <results>." (or nothing, when every result says skip_reply).
- TTS: each sentence becomes a 440 Hz tone, MS_PER_CHAR long, in 40 ms chunks, after
  TTS_FIRST_AUDIO_S; SegmentDone carries the sentence text.
Counters of started and cancelled calls are exposed through Info details.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os

import grpc
import numpy as np

from voicemesh.runtime.audio import pcm16_to_mulaw
from voicemesh.runtime.mux import MultiplexedCall
from voicemesh.v1 import common_pb2, llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc

SPEECH_RMS = 1000.0
WORDS_PER_SECOND = 5
TOKEN_DELAY_S = 0.01
TTS_FIRST_AUDIO_S = 0.02
MS_PER_CHAR = 20
COUNTERS = {"llm_calls": 0, "llm_cancelled": 0, "tts_calls": 0, "tts_cancelled": 0}


def _info(service: str) -> common_pb2.ServiceInfo:
    return common_pb2.ServiceInfo(service=service, provider="fake", model="scripted", details={k: str(v) for k, v in COUNTERS.items()})


class FakeVad(vad_pb2_grpc.VadServiceServicer):
    async def Detect(self, request_iterator, context):
        config = None
        speaking, run, offset = False, 0, 0  # run: consecutive frames disagreeing with the state
        segment_start = 0
        leftover = np.zeros(0, dtype=np.int16)
        async for request in request_iterator:
            if request.HasField("config"):
                config = request.config
                continue
            if not request.HasField("audio"):
                continue
            start_frames = round((config.start_secs or 0.2) / 0.02)
            stop_frames = round((config.stop_secs or 0.8) / 0.02)
            samples = np.concatenate((leftover, np.frombuffer(request.audio.data, dtype="<i2")))
            frames = len(samples) // 320
            leftover = samples[frames * 320 :]
            for index in range(frames):
                frame = samples[index * 320 : (index + 1) * 320].astype(np.float64)
                offset += 20
                is_speech = float(np.sqrt(np.mean(frame**2))) > SPEECH_RMS
                run = run + 1 if is_speech != speaking else 0
                if not speaking and run >= start_frames:
                    speaking, run = True, 0
                    segment_start = offset - start_frames * 20
                    yield vad_pb2.DetectResponse(speech_started=vad_pb2.SpeechStarted(offset_ms=segment_start, probability=0.9))
                elif speaking and run >= stop_frames:
                    speaking, run = False, 0
                    end = offset - stop_frames * 20
                    yield vad_pb2.DetectResponse(speech_stopped=vad_pb2.SpeechStopped(offset_ms=end, probability=0.9, duration_ms=end - segment_start))

    async def DetectMany(self, request_iterator, context):
        """Every stream runs Detect, as the real service does (voicemesh.runtime.mux)."""
        call = MultiplexedCall(lambda requests: self.Detect(requests, context), vad_pb2.DetectManyResponse,
                               vad_pb2.DetectStreamEvent, "vad", "DetectMany", "Detect")
        async for response in call.serve(request_iterator):
            yield response

    async def Info(self, request, context):
        return vad_pb2.VadServiceInfoResponse(info=_info("vad"))


RELEASES: dict[str, asyncio.Event] = {}  # session id -> set once its held finals may go
RELEASE_METHOD = "/fakes.Control/Release"


async def _release(request: bytes, context) -> bytes:
    RELEASES.setdefault(request.decode(), asyncio.Event()).set()
    return b""


def release_finals(address: str, session_id: str) -> None:
    """Let the held finals of a "hold-" session go (from a test, over gRPC)."""
    with grpc.insecure_channel(address) as channel:
        channel.unary_unary(RELEASE_METHOD)(session_id.encode(), timeout=30)


class FakeStt(stt_pb2_grpc.SttServiceServicer):
    async def Recognize(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._recognize(request_iterator, out))
        try:
            while (response := await out.get()) is not None:
                yield response
        finally:
            reader.cancel()

    async def _recognize(self, request_iterator, out: asyncio.Queue) -> None:
        scripted = [t for t in os.environ.get("FAKE_TRANSCRIPTS", "").split(",") if t]
        utterances = 0
        turn_id, heard_ms, next_interim_ms = "", 0, 0
        session_id, held = "", []
        flusher = None

        async def flush_when_released(release: asyncio.Event) -> None:
            await release.wait()
            for response in held:
                out.put_nowait(response)
            held.clear()

        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "config":
                session_id = request.config.session_id
                if session_id.startswith("hold-"):
                    flusher = asyncio.create_task(flush_when_released(RELEASES.setdefault(session_id, asyncio.Event())))
            elif kind == "turn_start":
                turn_id, heard_ms, next_interim_ms = request.turn_start.turn_id, 0, 200
            elif kind == "audio" and turn_id:
                samples = np.frombuffer(request.audio.data, dtype="<i2").astype(np.float64)
                if samples.size and float(np.sqrt(np.mean(samples**2))) > SPEECH_RMS:  # words come from speech only
                    heard_ms += len(request.audio.data) * 1000 // 32000
                if heard_ms >= next_interim_ms:
                    next_interim_ms += 200
                    words = " ".join(f"w{n}" for n in range(1, 1 + heard_ms * WORDS_PER_SECOND // 1000))
                    if words:
                        out.put_nowait(stt_pb2.RecognizeResponse(transcript=stt_pb2.Transcript(text=words, turn_id=turn_id)))
            elif kind == "finalize":
                text = scripted[utterances] if utterances < len(scripted) else f"utterance {utterances + 1}"
                coughs = session_id.startswith("hold-cough-") and utterances > 0
                text = "" if session_id.startswith("silent-") or coughs else text
                utterances += 1
                turn_id = request.finalize.turn_id
                final = (stt_pb2.RecognizeResponse(transcript=stt_pb2.Transcript(text=text, is_final=True, confidence=1.0, turn_id=turn_id)),
                         stt_pb2.RecognizeResponse(end_of_utterance=stt_pb2.EndOfUtterance(turn_id=turn_id)))
                if flusher is not None and not flusher.done():
                    held.extend(final)  # a late STT: these go when the test releases them
                else:
                    for response in final:
                        out.put_nowait(response)
                turn_id = ""
        if flusher is not None:
            flusher.cancel()
        out.put_nowait(None)

    async def Info(self, request, context):
        return stt_pb2.SttServiceInfoResponse(info=_info("stt"))


class FakeLlm(llm_pb2_grpc.LlmServiceServicer):
    async def Generate(self, request_iterator, context):
        COUNTERS["llm_calls"] += 1
        requests = aiter(request_iterator)
        first = await anext(requests)
        users = [m.content for m in first.chat.messages if m.role == "user"]
        user = users[-1] if users else "nothing"
        cities = [city for city in ("Paris", "London", "Tokyo") if city in user]
        if first.chat.tools and "weather" in user and cities:
            async for response in self._tool_round(requests, cities):
                yield response
            return
        assistant = [m.content for m in first.chat.messages if m.role == "assistant"]
        if "what did you say" in user:
            reply = f"Before, I said: {assistant[-1] if assistant else 'nothing'}"
        elif "count messages" in user:
            reply = f"I see {len(first.chat.messages)} messages."
        elif "long story" in user:
            reply = " ".join(f"This is sentence number {n} of a long story." for n in range(1, 31))
        else:
            reply = f"You said: {user}."
        try:
            for word in reply.split(" "):
                await asyncio.sleep(TOKEN_DELAY_S)
                yield llm_pb2.GenerateResponse(delta=llm_pb2.TextDelta(text=word + " "))
            usage = llm_pb2.Usage(input_tokens=len(first.chat.messages), output_tokens=len(reply.split()))
            yield llm_pb2.GenerateResponse(done=llm_pb2.Done(finish_reason=llm_pb2.FINISH_REASON_STOP, usage=usage))
        except asyncio.CancelledError:
            COUNTERS["llm_cancelled"] += 1
            raise

    async def _tool_round(self, requests, cities):
        ids = [f"call_{n}" for n in range(len(cities))]
        for call_id, city in zip(ids, cities, strict=True):
            arguments = json.dumps({"city": city})
            yield llm_pb2.GenerateResponse(tool_call=llm_pb2.ToolCall(id=call_id, name="get_weather", arguments_json=arguments))
        yield llm_pb2.GenerateResponse(awaiting_tool_results=llm_pb2.AwaitingToolResults(tool_call_ids=ids))
        results = {}
        while len(results) < len(ids):
            result = (await anext(requests)).tool_result
            results[result.tool_call_id] = result
        if all(r.skip_reply for r in results.values()):
            yield llm_pb2.GenerateResponse(done=llm_pb2.Done(finish_reason=llm_pb2.FINISH_REASON_STOP))
            return
        said = " and ".join(results[call_id].content for call_id in ids)
        for word in f"The tools said: {said}.".split(" "):
            yield llm_pb2.GenerateResponse(delta=llm_pb2.TextDelta(text=word + " "))
        yield llm_pb2.GenerateResponse(done=llm_pb2.Done(finish_reason=llm_pb2.FINISH_REASON_STOP))

    async def Info(self, request, context):
        return llm_pb2.LlmServiceInfoResponse(info=_info("llm"))


class FakeTts(tts_pb2_grpc.TtsServiceServicer):
    async def Synthesize(self, request_iterator, context):
        COUNTERS["tts_calls"] += 1
        config = (await anext(aiter(request_iterator))).config
        rate = config.format.sample_rate_hz
        chunk_samples = rate * 40 // 1000
        seq = 0
        try:
            async for request in request_iterator:
                if not request.HasField("text"):
                    continue
                piece = request.text
                await asyncio.sleep(TTS_FIRST_AUDIO_S)
                total = rate * MS_PER_CHAR * len(piece.text) // 1000
                tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(total) / rate)).astype("<i2")
                for start in range(0, total, chunk_samples):
                    piece_samples = tone[start : start + chunk_samples]
                    data = pcm16_to_mulaw(piece_samples) if config.format.encoding == common_pb2.AUDIO_ENCODING_MULAW else piece_samples.tobytes()
                    chunk = common_pb2.AudioChunk(data=data, seq=seq)
                    seq += 1
                    yield tts_pb2.SynthesizeResponse(audio=tts_pb2.SegmentAudio(segment_id=piece.segment_id, chunk=chunk))
                done = tts_pb2.SegmentDone(segment_id=piece.segment_id, spoken_text=piece.text.strip(), audio_duration_ms=total * 1000 // rate)
                yield tts_pb2.SynthesizeResponse(segment_done=done)
        except asyncio.CancelledError:
            COUNTERS["tts_cancelled"] += 1
            raise

    async def Info(self, request, context):
        return tts_pb2.TtsServiceInfoResponse(info=_info("tts"), voices=["tone"])


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    vad_pb2_grpc.add_VadServiceServicer_to_server(FakeVad(), server)
    stt_pb2_grpc.add_SttServiceServicer_to_server(FakeStt(), server)
    llm_pb2_grpc.add_LlmServiceServicer_to_server(FakeLlm(), server)
    tts_pb2_grpc.add_TtsServiceServicer_to_server(FakeTts(), server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "fakes.Control", {"Release": grpc.unary_unary_rpc_method_handler(_release)}),))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"port {port} is taken")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
