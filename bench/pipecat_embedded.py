"""Side B of the voice-to-voice comparison: the embedded stack's engines in Pipecat 1.14, in
one process (bench/.venv-pipecat; never imports the project's stubs).

Per turn, a fresh PipelineWorker, as Pipecat builds one per call:
  input transport (fed 20 ms frames at real time by bench/v2v_pacing.py)
  -> WhisperSTTService (faster-whisper, the mesh's whisper-base folder; a SegmentedSTTService:
     it transcribes the segment once the VAD has stopped)
  -> the user aggregator, with Pipecat's SileroVADAnalyzer (stop_secs 0.2, as the mesh) and
     LocalSmartTurnAnalyzerV3 on the mesh's ONNX file (Pipecat's default stop strategy)
  -> OpenAILLMService on the same GGUF behind llama.cpp's OpenAI-compatible server
     (bench/v2v_llm_server.py, a separate process)
  -> HibariTTSService (below: hibari in-process, the way Pipecat runs its local TTS engines)
  -> output transport (paced at real time; its first write is "first bot audio")
  -> assistant aggregator.
Models load once and are shared across turns (the mesh's services are warm too).

Protocol: after loading, prints {"ready": true}; then per stdin line {"pcm": path of raw
PCM16 16 kHz, "speech_end": sample, "deadline_s": s} runs one turn and prints one JSON line:
ms from the end of the speech to VADUserStoppedSpeaking (vad_stop_ms), UserStoppedSpeaking
(user_stopped_ms), the TranscriptionFrame (stt_final_ms), the first LLM token
(llm_first_token_ms), the first audio written (v2v_ms); the LLM's and TTS's own time to first
result (llm_ttfb_ms, tts_ttfb_ms), the transcript and the reply. EOF ends the process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from loguru import logger
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    InputAudioRawFrame, LLMContextFrame, LLMFullResponseEndFrame, LLMTextFrame, StartFrame, TranscriptionFrame,
    UserStoppedSpeakingFrame, VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.workers.runner import WorkerRunner

from bench.v2v_pipecat_engines import HibariEngine, HibariTTSService, MeshDecodingWhisper, load_whisper
from bench.v2v_pacing import paced_send, since

IN_RATE_HZ, OUT_RATE_HZ = 16000, 24000
STOP_SECS = 0.2  # the VAD's pause before Smart Turn is asked: the mesh's embedded default
SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."  # the orchestrator's


class FeedInput(BaseInputTransport):
    def __init__(self, started: asyncio.Event, **kwargs):
        super().__init__(**kwargs)
        self._started = started

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        self._started.set()


class PacedOutput(BaseOutputTransport):
    """Writes bot audio at real time, as Pipecat's network transports do; a write is the
    moment the audio would leave for the caller."""

    def __init__(self, writes: list[float], **kwargs):
        super().__init__(**kwargs)
        self.writes = writes
        self.first_write = asyncio.Event()
        self._next_send = 0.0  # not _next: FrameProcessor links processors with that name

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame) -> bool:
        now = time.monotonic()
        if self._next_send > now:
            await asyncio.sleep(self._next_send - now)
        sent = time.monotonic()
        self.writes.append(sent)
        self.first_write.set()
        self._next_send = max(self._next_send, sent - 0.1) + len(frame.audio) / (2 * OUT_RATE_HZ)
        return True


class Milestones(BaseObserver):
    """When each frame of interest was first pushed (a frame is pushed again by every
    processor that passes it on: only the first push counts), with the texts."""

    def __init__(self, llm, **kwargs):
        super().__init__(**kwargs)
        self.llm = llm
        self.moments: dict[str, list[float]] = defaultdict(list)
        self.transcripts: list[tuple[float, str]] = []
        self.reply: list[tuple[float, str]] = []
        self.reply_done = asyncio.Event()
        self._seen: set[int] = set()

    async def on_push_frame(self, data: FramePushed):
        frame, now = data.frame, time.monotonic()
        if frame.id in self._seen:  # Pipecat's unique frame id (an object's id() is reused once it is freed)
            return
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            self.moments["vad_stop"].append(now)
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self.moments["user_stopped"].append(now)
        elif isinstance(frame, TranscriptionFrame):
            self.moments["final"].append(now)
            self.transcripts.append((now, frame.text.strip()))
        elif isinstance(frame, LLMContextFrame):
            self.moments["llm_request"].append(now)
        elif isinstance(frame, LLMTextFrame) and data.source is self.llm:
            self.moments["llm_token"].append(now)
            self.reply.append((now, frame.text))
        elif isinstance(frame, LLMFullResponseEndFrame) and data.source is self.llm:
            self.reply_done.set()
        else:
            return
        self._seen.add(frame.id)


class Engines:
    """What stays loaded across turns."""

    def __init__(self, args):
        self.args = args
        self.whisper = load_whisper(args.whisper_dir, args.stt_threads)
        self.hibari = HibariEngine(threads=args.tts_threads)

    def pipeline(self, started: asyncio.Event, writes: list[float]):
        transport_in = FeedInput(started, params=TransportParams(audio_in_enabled=True, audio_in_sample_rate=IN_RATE_HZ))
        stt = MeshDecodingWhisper(self.whisper, self.args.whisper_dir)
        vad = SileroVADAnalyzer(params=VADParams(stop_secs=STOP_SECS))
        smart_turn = LocalSmartTurnAnalyzerV3(smart_turn_model_path=self.args.smart_turn)
        strategies = UserTurnStrategies(stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=smart_turn)])
        context = LLMContext()
        user, assistant = LLMContextAggregatorPair(
            context, user_params=LLMUserAggregatorParams(vad_analyzer=vad, user_turn_strategies=strategies,
                                                         user_turn_stop_timeout=self.args.stop_timeout))
        # The mesh's generation defaults (voicemesh.llm GenerationParams).
        llm = OpenAILLMService(api_key="local", base_url=self.args.llm_url, settings=OpenAILLMService.Settings(
            model="qwen2.5-0.5b-instruct", system_instruction=SYSTEM_PROMPT, temperature=0.2, max_tokens=256, top_p=0.95))
        tts = HibariTTSService(self.hibari)
        out = PacedOutput(writes, params=TransportParams(audio_out_enabled=True, audio_out_sample_rate=OUT_RATE_HZ))
        return Pipeline([transport_in, stt, user, llm, tts, out, assistant]), transport_in, llm, out, tts


async def run_turn(engines: Engines, samples: np.ndarray, speech_end: int, deadline_s: float) -> dict:
    started, writes = asyncio.Event(), []
    pipeline, transport_in, llm, out, tts = engines.pipeline(started, writes)
    milestones = Milestones(llm)
    task = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=IN_RATE_HZ, audio_out_sample_rate=OUT_RATE_HZ),
                        observers=[milestones], check_dangling_tasks=False, idle_timeout_secs=None)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(task)
    running = asyncio.create_task(runner.run())
    done, end = asyncio.Event(), None
    try:
        await asyncio.wait_for(started.wait(), 30)

        async def write(data: bytes) -> None:
            await transport_in.push_audio_frame(InputAudioRawFrame(audio=data, sample_rate=IN_RATE_HZ, num_channels=1))

        async def reply_over():  # the whole reply text is in, and its audio has started
            await milestones.reply_done.wait()
            await out.first_write.wait()
            done.set()

        watcher = asyncio.create_task(reply_over())
        end = await paced_send(samples, speech_end, write, done, deadline_s)
        watcher.cancel()
    finally:
        await task.cancel()
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 30)
    moments = milestones.moments
    llm_request = next((m for m in moments["llm_request"] if end is not None and m >= end), None)
    tts_request = next((m for m in tts.first_request if end is not None and m >= end), None)
    row = {
        "v2v_ms": since(writes, end),
        "vad_stop_ms": since(moments["vad_stop"], end),
        "user_stopped_ms": since(moments["user_stopped"], end),
        "stt_final_ms": since(moments["final"], end),
        "llm_first_token_ms": since(moments["llm_token"], end),
        "llm_ttfb_ms": since(moments["llm_token"], llm_request),
        "tts_ttfb_ms": since(tts.first_audio, tts_request),
        "transcript": " ".join(text for _, text in milestones.transcripts),
        "bot_text": "".join(text for at, text in milestones.reply if end is None or at >= end).strip(),
    }
    if row["v2v_ms"] is None:
        row["failure"] = "no bot audio after the end of speech" if end is not None else "the clip was not sent"
    return row


async def main(args) -> None:
    engines = Engines(args)
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            request = json.loads(line)
            samples = np.frombuffer(Path(request["pcm"]).read_bytes(), dtype="<i2")
            row = await run_turn(engines, samples, int(request["speech_end"]), float(request.get("deadline_s", 30)))
        except Exception as err:  # noqa: BLE001 - reported to the driver, which counts it as a failed turn
            row = {"failure": f"{type(err).__name__}: {err}"}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--whisper-dir", required=True, help="the faster-whisper model folder (whisper-base)")
    parser.add_argument("--smart-turn", required=True, help="the Smart Turn v3 ONNX file")
    parser.add_argument("--stop-timeout", type=float, default=5.0,
                        help="LLMUserAggregatorParams.user_turn_stop_timeout: how long the user aggregator waits "
                             "for the turn to be decided (Pipecat's default 5 s)")
    parser.add_argument("--stt-threads", type=int, default=2)
    parser.add_argument("--tts-threads", type=int, default=2)
    parser.add_argument("--log-level", default="WARNING")
    arguments = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level=arguments.log_level)
    try:
        import uvloop

        uvloop.run(main(arguments))
    except ImportError:
        asyncio.run(main(arguments))
