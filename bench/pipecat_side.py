"""The anchor: the same pipeline shape in Pipecat 1.14, in one process (bench/.venv-pipecat).

transport-in -> VADProcessor (Pipecat's VAD state machine over an energy analyzer) -> fake
STT -> fake LLM -> fake TTS -> transport-out, one PipelineTask per session, all sessions in
this process. The fakes have the mesh fakes' latencies (bench.scenario.Latencies). The input
transport is fed 20 ms frames at real time by a feeder task per session; the output
transport paces audio at real time the way Pipecat's network transports do (send a chunk,
then sleep its duration) and is where "first bot audio at the client" is taken.

`python -m bench.pipecat_side --sessions N --duration S [--lean]` prints one JSON object in
the same shape as bench.load, with `server_cpu_cores` this process's CPU over the window.
--lean: RTVI, turn tracking and the idle timeout off (the defaults have them on).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
from pipecat.frames.frames import (
    Frame, InputAudioRawFrame, LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame, StartFrame,
    TranscriptionFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame, VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineTask
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.utils.time import time_now_iso8601
from pipecat.workers.runner import WorkerRunner

from bench.scenario import (
    FIRST_DELTA, FRAME_MS, IN_RATE_HZ, OUT_RATE_HZ, REST_WORDS, SILENCE_FRAME, SPEECH_RMS, Latencies, Schedule,
    phase_frames, speech_frame, tone_audio,
)
from bench.stats import SessionStats, cpu_seconds, loop_lag, summarise

LAT = Latencies.from_env()
_SENTENCE_END = re.compile(r"[.?!]+\s+\S")


class EnergyVad(VADAnalyzer):
    """Confidence 1 for a window louder than SPEECH_RMS, else 0 (Silero's window size)."""

    def num_frames_required(self) -> int:
        return 512

    def voice_confidence(self, buffer: bytes) -> float:
        import numpy as np

        samples = np.frombuffer(buffer, dtype="<i2").astype(np.float32)
        return 1.0 if float(np.dot(samples, samples)) > SPEECH_RMS * SPEECH_RMS * samples.size else 0.0


class FeedInput(BaseInputTransport):
    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)


class PacedOutput(BaseOutputTransport):
    """Plays bot audio out at real time; the write time is the client's arrival time."""

    def __init__(self, stats: SessionStats, turn: list[int], **kwargs):
        super().__init__(**kwargs)
        self.stats, self.turn = stats, turn
        self._next_send = 0.0

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame) -> bool:
        now = time.monotonic()
        if self._next_send > now:
            await asyncio.sleep(self._next_send - now)
        sent = time.monotonic()
        seconds = len(frame.audio) / (2 * OUT_RATE_HZ)
        self.stats.audio(self.turn[0], sent, seconds)
        self._next_send = max(self._next_send, sent - 0.1) + seconds  # restart the clock after a pause
        return True


class FakeStt(FrameProcessor):
    def __init__(self, turn: list[int]):
        super().__init__()
        self.turn = turn

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            self.create_task(self._final())

    async def _final(self):
        await asyncio.sleep(LAT.stt_final_ms / 1000)
        self.turn[0] += 1
        await self.push_frame(TranscriptionFrame("what is the capital of france", "user", time_now_iso8601()))


class FakeLlm(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.create_task(self._reply())
        else:
            await self.push_frame(frame, direction)

    async def _reply(self):
        await asyncio.sleep(LAT.llm_first_token_ms / 1000)
        await self.push_frame(LLMFullResponseStartFrame())
        await self.push_frame(LLMTextFrame(FIRST_DELTA))
        for word in REST_WORDS:
            await asyncio.sleep(LAT.llm_token_ms / 1000)
            await self.push_frame(LLMTextFrame(" " + word))
        await self.push_frame(LLMFullResponseEndFrame())


class FakeTts(FrameProcessor):
    """Sentences (released when the character after the end is seen) -> tone audio."""

    def __init__(self):
        super().__init__()
        self.text = ""
        self.audio = tone_audio(LAT.tts_sentence_ms)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMTextFrame):
            self.text += frame.text
            while (match := _SENTENCE_END.search(self.text)) is not None:
                sentence, self.text = self.text[: match.end() - 1], self.text[match.end() - 1 :]
                await self._speak(sentence)
        elif isinstance(frame, LLMFullResponseEndFrame):
            if self.text.strip():
                await self._speak(self.text)
            self.text = ""
            await self.push_frame(TTSStoppedFrame())
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _speak(self, sentence: str):
        await asyncio.sleep(LAT.tts_first_audio_ms / 1000)
        await self.push_frame(TTSStartedFrame())
        step = 2 * OUT_RATE_HZ * LAT.tts_chunk_ms // 1000
        for start in range(0, len(self.audio), step):
            await self.push_frame(TTSAudioRawFrame(self.audio[start : start + step], OUT_RATE_HZ, 1))


async def run_session(index: int, schedule: Schedule, stop_at: float, stats: SessionStats, lean: bool) -> None:
    turn = [0]
    vad = EnergyVad(params=VADParams(confidence=0.5, start_secs=LAT.vad_start_s, stop_secs=LAT.vad_stop_s, min_volume=0.0))
    transport_in = FeedInput(params=TransportParams(audio_in_enabled=True, audio_in_sample_rate=IN_RATE_HZ))
    transport_out = PacedOutput(stats, turn, params=TransportParams(audio_out_enabled=True, audio_out_sample_rate=OUT_RATE_HZ))
    pipeline = Pipeline([transport_in, VADProcessor(vad_analyzer=vad), FakeStt(turn), FakeLlm(), FakeTts(), transport_out])
    extra = dict(enable_rtvi=False, enable_turn_tracking=False, idle_timeout_secs=None) if lean else {}
    task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=IN_RATE_HZ, audio_out_sample_rate=OUT_RATE_HZ),
                        check_dangling_tasks=False, **extra)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(task)
    running = asyncio.create_task(runner.run())
    speech, cycle, phase = schedule.speech_frames(), schedule.cycle_frames(), phase_frames(index, schedule)
    speech_data = speech_frame()
    await asyncio.sleep(0.5)  # let the pipeline start
    start, frame = time.monotonic(), 0
    try:
        while time.monotonic() < stop_at and not running.done():
            position = (frame - phase) % cycle if frame >= phase else cycle
            data = speech_data if position < speech else SILENCE_FRAME
            await transport_in.push_audio_frame(InputAudioRawFrame(audio=data, sample_rate=IN_RATE_HZ, num_channels=1))
            if position == speech - 1:
                stats.speech_ends.append(time.monotonic())
            frame += 1
            await asyncio.sleep(max(0.0, start + frame * FRAME_MS / 1000 - time.monotonic()))
    except Exception as err:  # noqa: BLE001 - recorded and reported, the other sessions go on
        stats.error = repr(err)
    finally:
        await task.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def main(args) -> dict:
    schedule = Schedule(cycle_s=args.cycle, warmup_s=args.warmup)
    stats = [SessionStats(args.jitter_ms / 1000) for _ in range(args.sessions)]
    stop_at = time.monotonic() + args.duration + args.ramp
    tasks = []
    for index in range(args.sessions):
        tasks.append(asyncio.create_task(run_session(index, schedule, stop_at, stats[index], args.lean)))
        await asyncio.sleep(args.ramp / max(1, args.sessions))
    measure_from = time.monotonic() + schedule.warmup_s
    await asyncio.sleep(schedule.warmup_s)
    lags: list[float] = []
    cpu0, t0 = cpu_seconds(os.getpid()), time.monotonic()
    await loop_lag(stop_at, lags)
    cpu1, t1 = cpu_seconds(os.getpid()), time.monotonic()
    await asyncio.gather(*tasks, return_exceptions=True)
    result = summarise(stats, LAT.fakes_total_ms, measure_from, stop_at - schedule.cycle_s, cpu1 - cpu0, t1 - t0, lags)
    result["server_cpu_cores"] = result.pop("client_cpu_cores")  # here the server is this process
    result["server_lag_ms"] = result.pop("client_lag_ms")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--cycle", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--lean", action="store_true")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="ERROR")  # quiet, like the mesh side (its teardown warns of cancelled tasks)
    try:
        import uvloop  # noqa: F401 - Pipecat does not install it; asyncio's loop otherwise
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(main(args))))
