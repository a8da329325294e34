"""Voice-to-voice on the same models: the embedded mesh (A) against the same engines in
Pipecat 1.14 (B), turn by turn on the same clips.

`python -m bench.v2v_compare --turns N` (from the main .venv; bench/.venv-pipecat must exist)
starts the embedded mesh (every service a process), llama.cpp's OpenAI-compatible server on
the mesh's GGUF (bench/v2v_llm_server.py) and the Pipecat process (bench/pipecat_embedded.py),
warms each side up with one turn, then runs the clips of bench/v2v_corpus.py alternately,
A B A B, N turns each, and writes bench/results/v2v.json and v2v.png. Every wait has a
deadline; every process started here is stopped by pid at the end, failure or not.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.procs import ROOT, free_port
from bench.v2v_corpus import SNR_DB, Clip, build_corpus, schedule
from bench.v2v_mesh import STAGES as MESH_STAGES, mesh_turn
from bench.v2v_stats import answered_right, pair_ratios, summarise_side
from bench.venv import bench_python

RESULTS = ROOT / "bench" / "results"
PIPECAT_STAGES = ("vad_stop_ms", "user_stopped_ms", "stt_final_ms", "llm_first_token_ms", "llm_ttfb_ms", "tts_ttfb_ms")
TURN_DEADLINE_S = 45.0  # from the start of a clip to giving up on its reply
# How long each side waits for a turn's final transcript before giving up on it: the mesh's
# default (voicemesh.orchestrator.turns DEFAULT_FINAL_GIVE_UP_S), given to Pipecat's user
# aggregator too (its own default is 5 s), so a slow STT delays both alike instead of making
# one of them answer an empty turn. --pipecat-stop-timeout 5 measures Pipecat as shipped.
STOP_TIMEOUT_S = 30.0


def log(text: str) -> None:
    print(f"[v2v {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class LineProcess:
    """A child speaking JSON lines on stdout; read with a deadline (a reader thread feeds a queue)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, env={**os.environ, **(env or {})}, start_new_session=True)
        self.log_path = log_path
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read_json(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no answer within {timeout:.0f} s; see {self.log_path}") from None
            if line is None:
                raise RuntimeError(f"exited with {self.process.wait()}; see {self.log_path}")
            if line.startswith("{"):
                return json.loads(line)

    def send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 15.0) -> None:
        try:
            self.process.stdin.close()  # both children end at EOF
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def pipecat_turn(side: LineProcess, clip: Clip, folder: Path) -> dict:
    path = clip.save(folder / "clip.pcm")
    side.send({"pcm": str(path), "speech_end": clip.speech_end, "deadline_s": TURN_DEADLINE_S})
    try:
        row = side.read_json(TURN_DEADLINE_S + 60)
    except TimeoutError as err:
        return {"failure": str(err)}
    row["right"] = answered_right(row.get("bot_text", ""), clip.expected)
    return row


def start_pipecat(python: Path, llm_url: str, log_path: Path, stop_timeout: float) -> LineProcess:
    """bench/pipecat_embedded.py on the mesh's model files, loaded (its {"ready"} read)."""
    from voicemesh.runtime.models import model_path
    from voicemesh.stt.models import WHISPER_BASE
    from voicemesh.vad.models import SMART_TURN

    side = LineProcess([str(python), "-m", "bench.pipecat_embedded", "--llm-url", llm_url,
                        "--whisper-dir", str(model_path(WHISPER_BASE)), "--smart-turn", str(model_path(SMART_TURN)),
                        "--stop-timeout", str(stop_timeout)], log_path, env={"HF_HUB_OFFLINE": "1"})
    side.read_json(300)
    return side


def with_clip(row: dict, clip: Clip) -> dict:
    return {"voice": clip.voice, "reference": clip.text, "expected": clip.expected, **row}


def run(turns: int, stop_timeout: float, interims: bool = True) -> dict:
    from voicemesh.cli.mesh import Mesh, free_ports

    python = bench_python()
    if python is None:
        raise SystemExit("bench/.venv-pipecat is missing: `make bench` builds it")
    voices, notes = build_corpus()
    clips = schedule(voices, turns)
    load_before = [round(x, 2) for x in os.getloadavg()]
    logs = RESULTS / "logs" / "v2v"
    llm = pipecat = None
    mesh_rows: list[dict] = []
    pipecat_rows: list[dict] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Mesh(ports=free_ports(), log_dir=logs, ready_timeout=300) as mesh:
        try:
            llm = LineProcess([sys.executable, "-m", "bench.v2v_llm_server", "--port", str(free_port())], logs / "llm-server.log")
            url = llm.read_json(300)["url"]
            pipecat = start_pipecat(python, url, logs / "pipecat.log", stop_timeout)
            log(f"ready in {time.monotonic() - started:.0f} s; warm-up turns (not counted)")
            asyncio.run(mesh_turn(mesh.orchestrator_address, clips[0], TURN_DEADLINE_S, interims))
            pipecat_turn(pipecat, clips[0], Path(tmp))
            for index, clip in enumerate(clips):
                a = with_clip(asyncio.run(mesh_turn(mesh.orchestrator_address, clip, TURN_DEADLINE_S, interims)), clip)
                b = with_clip(pipecat_turn(pipecat, clip, Path(tmp)), clip)
                mesh_rows.append(a)
                pipecat_rows.append(b)
                log(f"{index + 1}/{len(clips)} {clip.voice}: mesh {a.get('v2v_ms')} ms, pipecat {b.get('v2v_ms')} ms"
                    f" | {a.get('transcript', '')!r} / {b.get('transcript', '')!r}")
        finally:
            for child in (pipecat, llm):
                if child is not None:
                    child.stop()
    figures = results(mesh_rows, pipecat_rows, voices, notes, load_before, time.monotonic() - started)
    figures["settings"] = {"turn_deadline_s": TURN_DEADLINE_S, "pipecat_user_turn_stop_timeout_s": stop_timeout,
                           "mesh_final_transcript_give_up_s": STOP_TIMEOUT_S, "vad_stop_secs": 0.2,
                           "mesh_interim_transcripts": interims,
                           "whisper": "whisper-base, CPU int8, 2 threads, beam 1 on both sides",
                           "llm": "Qwen2.5 0.5B GGUF, llama.cpp 2 threads, temperature 0.2, max 256 tokens",
                           "tts": "hibari, voice heart, 2 threads"}
    return figures


def results(mesh_rows, pipecat_rows, voices, notes, load_before, seconds) -> dict:
    mesh = summarise_side(mesh_rows, MESH_STAGES)
    pipecat = summarise_side(pipecat_rows, PIPECAT_STAGES)
    ratio = pair_ratios(list(zip(mesh_rows, pipecat_rows, strict=True)))
    if mesh["p50"] and pipecat["p50"]:
        ratio["of_p50"] = round(mesh["p50"] / pipecat["p50"], 3)
    return {
        "machine": {"cores": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "seconds": round(seconds)},
        "voices": {name: [c.text for c in clips] for name, clips in voices.items()},
        "snr_db": SNR_DB,
        "notes": notes,
        "pipecat_embedded_v2v_ms": {"p50": pipecat["p50"], "p90": pipecat["p90"]},
        "mesh_embedded_v2v_ms": {"p50": mesh["p50"], "p90": mesh["p90"]},
        "v2v_ratio_vs_pipecat": ratio,
        "wer": {"mesh": mesh["wer"], "pipecat": pipecat["wer"],
                "per_voice": {v: {"mesh": mesh["per_voice"][v]["wer"], "pipecat": pipecat["per_voice"][v]["wer"]}
                              for v in mesh["per_voice"]}},
        "right_answer_rate": {"mesh": mesh["right_answer_rate"], "pipecat": pipecat["right_answer_rate"],
                              "per_voice": {v: {"mesh": mesh["per_voice"][v]["right_answer_rate"],
                                                "pipecat": pipecat["per_voice"][v]["right_answer_rate"]}
                                            for v in mesh["per_voice"]}},
        "stages_p50_ms": {"mesh": mesh["stages_p50"], "pipecat": pipecat["stages_p50"]},
        "mesh": mesh,
        "pipecat": pipecat,
        "turns": {"mesh": mesh_rows, "pipecat": pipecat_rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=20, help="turns per side (default 20)")
    parser.add_argument("--pipecat-stop-timeout", type=float, default=STOP_TIMEOUT_S,
                        help=f"Pipecat user_turn_stop_timeout (default {STOP_TIMEOUT_S:g} s: the mesh give-up; Pipecat: 5)")
    parser.add_argument("--mesh-interims", choices=("on", "off"), default="on",
                        help="the mesh session's interim transcripts (on: as the clients ship; off: a lever)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for v2v.json and v2v.png")
    args = parser.parse_args()
    if args.turns < 1:
        parser.error("--turns must be at least 1")
    figures = run(args.turns, args.pipecat_stop_timeout, args.mesh_interims == "on")
    path = write(figures, args.out / "v2v.json", "bench.v2v_plot")
    log(f"mesh p50 {figures['mesh_embedded_v2v_ms']['p50']} ms, pipecat p50 {figures['pipecat_embedded_v2v_ms']['p50']} ms, "
        f"ratio (pairwise median) {figures['v2v_ratio_vs_pipecat']['median']}; wrote {path}")


def write(figures: dict, path: Path, plotter: str) -> Path:
    """`path` (JSON) and its plot beside it (.png, drawn by module `plotter` in bench/.venv-pipecat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1) + "\n")
    plot = subprocess.run([str(bench_python()), "-m", plotter, str(path), str(path.with_suffix(".png"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if plot.returncode != 0:
        log(f"plot failed: {plot.stderr[-800:]}")
    return path

if __name__ == "__main__":
    main()
