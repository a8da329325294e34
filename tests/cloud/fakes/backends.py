"""What the fake providers answer with: scripted, or real recognition and speech.

A fake provider (tests/cloud/fakes/*.py) only translates its wire protocol; the content comes
from a backend. Scripted backends make provider tests exact (this text, these words, this
tool call); the voicemesh backends put the embedded models behind the fake, through the real
voicemesh services over gRPC, so the swap test hears a real answer to a real question
through every provider's protocol.

Interfaces (duck-typed):
- STT: `await recognize(pcm16, sample_rate_hz, language) -> Recognized`; `interim(pcm16, rate)
  -> str` (text so far; "" for none).
- TTS: `synthesize(text, sample_rate_hz, voice) -> async iterator of PCM16 bytes`.
- Chat (LLM): `chat(messages, tools) -> async iterator of TextPart | ToolCallPart | Finish`,
  messages and tools in the OpenAI chat shape (dicts).
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np


# --- STT ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecognizedWord:
    text: str
    start_ms: int  # from the first sample of the audio recognised
    end_ms: int
    confidence: float = 0.9


@dataclass(frozen=True)
class Recognized:
    text: str
    words: tuple[RecognizedWord, ...] = ()
    confidence: float = 0.9


class ScriptedStt:
    """Recognises `text` in any audio, its words spread evenly over the audio."""

    def __init__(self, text: str = "what is the capital of france"):
        self.text = text

    async def recognize(self, pcm16: bytes, sample_rate_hz: int, language: str = "") -> Recognized:
        duration_ms = len(pcm16) * 1000 // (2 * sample_rate_hz)
        parts = self.text.split()
        step = duration_ms // max(len(parts), 1)
        words = tuple(RecognizedWord(w, i * step, (i + 1) * step) for i, w in enumerate(parts))
        return Recognized(self.text, words)

    def interim(self, pcm16: bytes, sample_rate_hz: int) -> str:
        return self.text.split()[0] if self.text else ""


class VoicemeshStt:
    """Real recognition: the embedded Whisper behind a voicemesh STT service at `address`."""

    def __init__(self, address: str):
        self.address = address

    async def recognize(self, pcm16: bytes, sample_rate_hz: int, language: str = "") -> Recognized:
        import grpc

        from voicemesh.v1 import common_pb2, stt_pb2, stt_pb2_grpc

        fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=sample_rate_hz, channels=1)
        chunk = sample_rate_hz * 2 // 10  # 100 ms

        def requests():
            yield stt_pb2.RecognizeRequest(config=stt_pb2.SttConfig(format=fmt, interim_results=False))
            yield stt_pb2.RecognizeRequest(turn_start=common_pb2.TurnContext(turn_id="t", audio_offset_ms=0))
            for i in range(0, len(pcm16), chunk):
                yield stt_pb2.RecognizeRequest(audio=common_pb2.AudioChunk(data=pcm16[i:i + chunk]))
            yield stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id="t"))

        async with grpc.aio.insecure_channel(self.address) as channel:
            call = stt_pb2_grpc.SttServiceStub(channel).Recognize(requests())
            async for response in call:
                if response.HasField("transcript") and response.transcript.is_final:
                    t = response.transcript
                    words = tuple(RecognizedWord(w.text, w.start_ms, w.end_ms, w.confidence or 0.9) for w in t.words)
                    call.cancel()
                    return Recognized(t.text, words, t.confidence or 0.9)
        return Recognized("")

    def interim(self, pcm16: bytes, sample_rate_hz: int) -> str:
        return ""  # one real decode per utterance is enough on two cores


# --- TTS ---------------------------------------------------------------------------------------
class ToneTts:
    """A 220 Hz tone, `ms_per_char` per character, in `chunk_ms` chunks."""

    def __init__(self, ms_per_char: int = 20, chunk_ms: int = 100):
        self.ms_per_char = ms_per_char
        self.chunk_ms = chunk_ms

    async def synthesize(self, text: str, sample_rate_hz: int, voice: str = "") -> AsyncIterator[bytes]:
        samples = sample_rate_hz * len(text) * self.ms_per_char // 1000
        t = np.arange(samples) / sample_rate_hz
        pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()
        step = sample_rate_hz * 2 * self.chunk_ms // 1000
        for i in range(0, len(pcm), step):
            yield pcm[i:i + step]


class VoicemeshTts:
    """Real speech: the embedded voice behind a voicemesh TTS service at `address`."""

    def __init__(self, address: str):
        self.address = address

    async def synthesize(self, text: str, sample_rate_hz: int, voice: str = "") -> AsyncIterator[bytes]:
        import grpc

        from voicemesh.v1 import common_pb2, tts_pb2, tts_pb2_grpc

        fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=sample_rate_hz, channels=1)
        requests = [
            tts_pb2.SynthesizeRequest(config=tts_pb2.TtsConfig(format=fmt)),
            tts_pb2.SynthesizeRequest(text=tts_pb2.TextPiece(segment_id=1, text=text, end_of_segment=True)),
        ]
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = tts_pb2_grpc.TtsServiceStub(channel).Synthesize(iter(requests))
            async for response in call:
                if response.HasField("audio"):
                    yield response.audio.chunk.data
                elif response.HasField("segment_done"):
                    call.cancel()
                    return


# --- Chat (LLM) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ToolCallPart:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class Finish:
    reason: str  # stop | length | tool_calls
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class ScriptedChat:
    """Answers round i with rounds[i] (the last round repeats); records what it was asked."""

    rounds: list[list] = field(default_factory=lambda: [[TextPart("Paris is the capital "), TextPart("of France."),
                                                        Finish("stop", 20, 8)]])
    asked: list[tuple[list, list]] = field(default_factory=list)

    async def chat(self, messages: list[dict], tools: list[dict]) -> AsyncIterator:
        self.asked.append((messages, tools))
        for part in self.rounds[min(len(self.asked) - 1, len(self.rounds) - 1)]:
            yield part


class OpenAiChat:
    """Real text: an OpenAI-compatible server (the embedded llama.cpp's) at `base_url` (…/v1)."""

    def __init__(self, base_url: str, model: str = "", api_key: str = ""):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key

    async def chat(self, messages: list[dict], tools: list[dict]) -> AsyncIterator:
        import aiohttp

        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": 128, "temperature": 0.0}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        usage, reason = {}, "stop"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.base_url}/chat/completions", json=body, headers=headers) as response:
                response.raise_for_status()
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        if text := (choice.get("delta") or {}).get("content"):
                            yield TextPart(text)
                        reason = choice.get("finish_reason") or reason
        yield Finish(reason, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
