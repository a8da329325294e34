"""Wire-level fake VAD, STT, LLM and TTS services for the bench: the real protos, fixed known
latencies, and nothing else.

Why the bench keeps a wire-level fake: its headline figure is the latency the *orchestrator*
adds, so everything behind it must cost as little as possible, and the fakes share a core with
the load client. The tests' fakes are the real services with `--provider fake`
(voicemesh.runtime.fakes; `Latencies.fake_script()` is this same behaviour for them, and
`voicemesh bench --fakes providers` runs the overhead and capacity stages on them): they run
the real servicers (validation, segmenter, resampling, sentence splitting, telemetry), four
processes instead of two, and on a 2-core machine that cost lands in the figures (bench/README.md
gives the comparison). Here each service is the smallest thing that answers the protocol.

`python -m bench.fakes --port N --services vad,stt,llm,tts` serves the chosen ones on one
port (the bench runs VAD+STT and LLM+TTS as two processes). Latencies come from
BENCH_LATENCIES (see bench.scenario.Latencies):

- VAD: a 20 ms frame is speech when its RMS is above SPEECH_RMS; SpeechStarted after
  vad_start_s of speech, SpeechStopped after vad_stop_s of silence. No other cost.
- STT: ignores the audio; the final transcript `stt_final_ms` after Finalize.
- LLM: the first sentence and the next word `llm_first_token_ms` after the request, then
  the rest one word every `llm_token_ms`.
- TTS: for each text piece, `tts_first_audio_ms`, then `tts_sentence_ms` of audio in
  `tts_chunk_ms` chunks at once (a fast TTS), then SegmentDone.
"""
from __future__ import annotations

import voicemesh.runtime.grpc_env  # noqa: F401 - first, as in every voicemesh process (see its docstring)

import argparse
import asyncio
import gc

import grpc
import numpy as np
import uvloop

from bench.scenario import FIRST_DELTA, FRAME_SAMPLES, REST_WORDS, SPEECH_RMS, TRANSCRIPT, Latencies, tone_audio
from voicemesh.runtime.mux import MultiplexedCall
from voicemesh.v1 import common_pb2, llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc

LAT = Latencies.from_env()
_SPEECH_MS = SPEECH_RMS * SPEECH_RMS * FRAME_SAMPLES  # sum of squares threshold per frame


def _info(service: str) -> common_pb2.ServiceInfo:
    return common_pb2.ServiceInfo(service=service, provider="bench-fake", model="fixed-latency")


class FakeVad(vad_pb2_grpc.VadServiceServicer):
    async def Detect(self, request_iterator, context):
        start_frames = round(LAT.vad_start_s * 50)
        stop_frames = round(LAT.vad_stop_s * 50)
        speaking, run, frames_seen, segment_start = False, 0, 0, 0
        leftover = b""
        async for request in request_iterator:
            if not request.HasField("audio"):
                continue
            data = leftover + request.audio.data
            whole = len(data) // (2 * FRAME_SAMPLES)
            leftover = data[whole * 2 * FRAME_SAMPLES :]
            if not whole:
                continue
            frames = (np.frombuffer(data, dtype="<i2", count=whole * FRAME_SAMPLES)
                      .reshape(whole, FRAME_SAMPLES).astype(np.float32))
            loud = np.einsum("ij,ij->i", frames, frames) > _SPEECH_MS
            for speech in loud.tolist():
                frames_seen += 1
                run = run + 1 if speech != speaking else 0
                if not speaking and run >= start_frames:
                    speaking, run = True, 0
                    segment_start = (frames_seen - start_frames) * 20
                    yield vad_pb2.DetectResponse(speech_started=vad_pb2.SpeechStarted(offset_ms=segment_start, probability=0.9))
                elif speaking and run >= stop_frames:
                    speaking, run = False, 0
                    end = (frames_seen - stop_frames) * 20
                    yield vad_pb2.DetectResponse(speech_stopped=vad_pb2.SpeechStopped(
                        offset_ms=end, probability=0.9, duration_ms=end - segment_start))

    async def DetectMany(self, request_iterator, context):
        """Every stream runs Detect, as the real service does (voicemesh.runtime.mux)."""
        call = MultiplexedCall(lambda requests: self.Detect(requests, context), vad_pb2.DetectManyResponse,
                               vad_pb2.DetectStreamEvent, "vad", "DetectMany", "Detect")
        async for response in call.serve(request_iterator):
            yield response

    async def Info(self, request, context):
        return vad_pb2.VadServiceInfoResponse(info=_info("vad"))


class FakeStt(stt_pb2_grpc.SttServiceServicer):
    async def Recognize(self, request_iterator, context):
        async for request in request_iterator:
            if request.WhichOneof("request") == "finalize":
                await asyncio.sleep(LAT.stt_final_ms / 1000)
                turn_id = request.finalize.turn_id
                yield stt_pb2.RecognizeResponse(transcript=stt_pb2.Transcript(
                    text=TRANSCRIPT, is_final=True, confidence=1.0, turn_id=turn_id))
                yield stt_pb2.RecognizeResponse(end_of_utterance=stt_pb2.EndOfUtterance(turn_id=turn_id))

    async def Info(self, request, context):
        return stt_pb2.SttServiceInfoResponse(info=_info("stt"))


class FakeLlm(llm_pb2_grpc.LlmServiceServicer):
    async def Generate(self, request_iterator, context):
        await anext(aiter(request_iterator))
        await asyncio.sleep(LAT.llm_first_token_ms / 1000)
        yield llm_pb2.GenerateResponse(delta=llm_pb2.TextDelta(text=FIRST_DELTA))
        for word in REST_WORDS:
            await asyncio.sleep(LAT.llm_token_ms / 1000)
            yield llm_pb2.GenerateResponse(delta=llm_pb2.TextDelta(text=" " + word))
        yield llm_pb2.GenerateResponse(done=llm_pb2.Done(finish_reason=llm_pb2.FINISH_REASON_STOP))

    async def Info(self, request, context):
        return llm_pb2.LlmServiceInfoResponse(info=_info("llm"))


class FakeTts(tts_pb2_grpc.TtsServiceServicer):
    def __init__(self):
        self.chunk_cache: dict[int, list[bytes]] = {}

    def _chunks(self, rate: int) -> list[bytes]:
        if rate not in self.chunk_cache:
            audio = tone_audio(LAT.tts_sentence_ms, rate)
            step = 2 * rate * LAT.tts_chunk_ms // 1000
            self.chunk_cache[rate] = [audio[i : i + step] for i in range(0, len(audio), step)]
        return self.chunk_cache[rate]

    async def Synthesize(self, request_iterator, context):
        config = (await anext(aiter(request_iterator))).config
        chunks = self._chunks(config.format.sample_rate_hz or 24000)
        seq = 0
        async for request in request_iterator:
            if not request.HasField("text"):
                continue
            piece = request.text
            await asyncio.sleep(LAT.tts_first_audio_ms / 1000)
            for data in chunks:
                chunk = common_pb2.AudioChunk(data=data, seq=seq)
                seq += 1
                yield tts_pb2.SynthesizeResponse(audio=tts_pb2.SegmentAudio(segment_id=piece.segment_id, chunk=chunk))
            yield tts_pb2.SynthesizeResponse(segment_done=tts_pb2.SegmentDone(
                segment_id=piece.segment_id, spoken_text=piece.text.strip(), audio_duration_ms=int(LAT.tts_sentence_ms)))

    async def Info(self, request, context):
        return tts_pb2.TtsServiceInfoResponse(info=_info("tts"), voices=["tone"])


REGISTER = {
    "vad": lambda server: vad_pb2_grpc.add_VadServiceServicer_to_server(FakeVad(), server),
    "stt": lambda server: stt_pb2_grpc.add_SttServiceServicer_to_server(FakeStt(), server),
    "llm": lambda server: llm_pb2_grpc.add_LlmServiceServicer_to_server(FakeLlm(), server),
    "tts": lambda server: tts_pb2_grpc.add_TtsServiceServicer_to_server(FakeTts(), server),
}


async def main(port: int, services: list[str]) -> None:
    # The real services' flow control (voicemesh.runtime.config.grpc_server_options): a fixed
    # 64 KB window per stream, no BDP probing, so the fakes buffer what the real services would.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 0)])
    for name in services:
        REGISTER[name](server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"port {port} is taken")
    await server.start()
    gc.collect()
    gc.freeze()  # as the real services do once started (voicemesh.runtime.server)
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--services", default="vad,stt,llm,tts")
    args = parser.parse_args()
    uvloop.run(main(args.port, args.services.split(",")))
