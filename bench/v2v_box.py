"""Conversations per box: how many concurrent spoken conversations the 2 cores hold before
voice-to-voice p90 doubles, the embedded mesh against Pipecat on the same models.

`python -m bench.v2v_box [--levels 1,2,3,4,6,8] [--turns 6]` (from the main .venv; bench/.venv-pipecat
must exist). The two sides are deployed the way each is run:

- the mesh: one embedded mesh (every service a process, shared by all conversations), N
  concurrent callers each speaking `--turns` clips in turn through Converse (bench/v2v_mesh.py);
- Pipecat: one process per call (bench/pipecat_embedded.py, each loading its own Whisper,
  Silero, Smart Turn and hibari), N of them, all on the one llama.cpp server on the same GGUF
  (bench/v2v_llm_server.py), as a per-call deployment shares its LLM endpoint.

Levels alternate sides (mesh N, Pipecat N, then N+1), so the machine's drift lands on both; the
callers of a level start 1 s apart so their turns do not line up, and each starts a turn every
10 s (at once if the last one ran longer), the same offered load on both sides. A level's "conversations
held" rule: every turn answered and its p90 at most twice that side's p90 at one conversation.
While each level runs, every process's CPU seconds are read from /proc: CPU-seconds per minute
of conversation = a process's CPU over the level / (N x turns x 10 s), the conversation time offered
(the same on both sides; each call process's figure is its share of the total). Results go to
bench/results/v2v_box.json (and .png, drawn in bench/.venv-pipecat); `conversations_per_box`
is copied into latest.json by `make bench`. Every process started here is stopped by pid.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from bench.contention import cpu_seconds
from bench.procs import free_port
from bench.v2v_compare import (
    RESULTS, STOP_TIMEOUT_S, TURN_DEADLINE_S, LineProcess, log, pipecat_turn, start_pipecat, with_clip, write,
)
from bench.v2v_corpus import build_corpus, schedule
from bench.v2v_mesh import mesh_turn
from bench.v2v_stats import pct
from bench.venv import bench_python

STAGGER_S = 1.0  # between the callers' first turns within a level (load shaping, not synchronisation)
# A conversation starts a turn every TURN_PERIOD_S (or at once when the previous one ran longer),
# on both sides alike: the offered load is the same, whichever moment each side calls a turn
# over (the mesh's TurnEnded once the reply has played, Pipecat's reply text in and audio started).
TURN_PERIOD_S = 10.0
DOUBLING = 2.0  # "before p90 doubles" (issue 18)


def cpu_of(pids: dict[str, int]) -> dict[str, float | None]:
    """CPU seconds so far per process; None for one gone (the level's failures say so)."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def turn_at(t0: float, caller: int, turn: int) -> float:
    """When `caller`'s `turn` starts: staggered callers, a turn every TURN_PERIOD_S."""
    return t0 + caller * STAGGER_S + turn * TURN_PERIOD_S


def measured_level(pids: dict[str, int], conversations: int, turns: int, play) -> dict:
    """Run `play()` (the level's turns) and summarise it with the CPU `pids` used meanwhile."""
    t0, cpu0 = time.monotonic(), cpu_of(pids)
    rows = play()
    cpu = cpu_per_conversation_minute(cpu0, cpu_of(pids), conversations, turns * TURN_PERIOD_S)
    return level_summary(rows, conversations, time.monotonic() - t0, cpu)


def cpu_per_conversation_minute(before: dict, after: dict, conversations: int, seconds: float) -> dict[str, float | None]:
    """`seconds`: the conversation time offered per conversation (turns x TURN_PERIOD_S), the same
    on both sides, not the level's wall time (which runs on to each side's own end of a turn)."""
    minutes = conversations * seconds / 60
    return {name: None if before[name] is None or after.get(name) is None else round((after[name] - before[name]) / minutes, 2)
            for name in before}


def level_summary(rows: list[dict], conversations: int, seconds: float, cpu: dict[str, float]) -> dict:
    v2v = [r["v2v_ms"] for r in rows if r.get("v2v_ms") is not None]
    return {"conversations": conversations, "turns": len(rows), "answered": len(v2v),
            "failures": [r.get("failure") for r in rows if r.get("failure")][:5],
            "p50": pct(v2v, 50), "p90": pct(v2v, 90), "right_answers": sum(bool(r.get("right")) for r in rows),
            "seconds": round(seconds, 1), "cpu_s_per_conversation_minute": cpu,
            "cpu_s_per_conversation_minute_total": round(sum(v for v in cpu.values() if v is not None), 2),
            "rows": [{k: r.get(k) for k in ("voice", "v2v_ms", "transcript", "bot_text", "right", "failure")} for r in rows]}


def held(levels: list[dict]) -> int:
    """The most conversations at which every turn was answered and p90 stayed within DOUBLING x
    the one-conversation p90 (levels in increasing order; the first failing level ends the count)."""
    if not levels or levels[0]["conversations"] != 1 or not levels[0]["p90"]:
        return 0
    limit, best = DOUBLING * levels[0]["p90"], 0
    for level in levels:
        if level["answered"] < level["turns"] or level["p90"] is None or level["p90"] > limit:
            break
        best = level["conversations"]
    return best


def mesh_level(address: str, clips: list, conversations: int, turns: int) -> list[dict]:
    t0 = time.monotonic()

    async def caller(index: int) -> list[dict]:
        rows = []
        for k in range(turns):
            await asyncio.sleep(max(0.0, turn_at(t0, index, k) - time.monotonic()))
            clip = clips[(index * turns + k) % len(clips)]
            rows.append(with_clip(await mesh_turn(address, clip, TURN_DEADLINE_S), clip))
        return rows

    async def every() -> list[dict]:
        return [row for rows in await asyncio.gather(*(caller(i) for i in range(conversations))) for row in rows]

    return asyncio.run(every())


def pipecat_level(sides: list[LineProcess], clips: list, turns: int, folder: Path) -> list[dict]:
    rows: list[dict] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def caller(index: int) -> None:
        own = folder / f"call-{index}"
        own.mkdir(exist_ok=True)
        for k in range(turns):
            time.sleep(max(0.0, turn_at(t0, index, k) - time.monotonic()))
            clip = clips[(index * turns + k) % len(clips)]
            row = with_clip(pipecat_turn(sides[index], clip, own), clip)
            with lock:
                rows.append(row)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(sides))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return rows


def run(levels: list[int], turns: int) -> dict:
    from voicemesh.cli.mesh import Mesh, free_ports

    python = bench_python()
    if python is None:
        raise SystemExit("bench/.venv-pipecat is missing: `make bench` builds it")
    voices, _ = build_corpus()
    clips = schedule(voices, max(levels) * turns)
    logs = RESULTS / "logs" / "v2v-box"
    llm, calls = None, []
    mesh_levels, pipecat_levels = [], []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Mesh(ports=free_ports(), log_dir=logs, ready_timeout=300) as mesh:
        try:
            llm = LineProcess([sys.executable, "-m", "bench.v2v_llm_server", "--port", str(free_port())], logs / "llm-server.log")
            url = llm.read_json(300)["url"]

            def new_call(index: int) -> LineProcess:
                side = start_pipecat(python, url, logs / f"pipecat-{index}.log", STOP_TIMEOUT_S)
                pipecat_turn(side, clips[0], Path(tmp))  # its warm-up turn, not counted
                return side

            mesh_pids = {kind: child.process.pid for kind, child in mesh.children.items() if child.process is not None}
            asyncio.run(mesh_turn(mesh.orchestrator_address, clips[0], TURN_DEADLINE_S))  # warm-up, not counted
            log(f"mesh ready in {time.monotonic() - started:.0f} s")
            for n in levels:
                mesh_levels.append(measured_level(mesh_pids, n, turns,
                                                  partial(mesh_level, mesh.orchestrator_address, clips, n, turns)))
                _log_level("mesh   ", mesh_levels[-1])
                while len(calls) < n:  # one process per call, started (and warmed) before the level
                    calls.append(new_call(len(calls)))
                pids = {f"pipecat-call-{i}": side.process.pid for i, side in enumerate(calls[:n])}
                pids["llm-server"] = llm.process.pid
                pipecat_levels.append(measured_level(pids, n, turns,
                                                     partial(pipecat_level, calls[:n], clips, turns, Path(tmp))))
                _log_level("pipecat", pipecat_levels[-1])
        finally:
            for child in (*calls, llm):
                if child is not None:
                    child.stop()
    mesh_held, pipecat_held = held(mesh_levels), held(pipecat_levels)
    return {
        "machine": {"cores": os.cpu_count(), "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "seconds": round(time.monotonic() - started)},
        "turns_per_conversation": turns, "rule": f"every turn answered and p90 <= {DOUBLING:g} x p90 at 1 conversation",
        "conversations_per_box": {"mesh": mesh_held, "pipecat": pipecat_held,
                                  "ratio": round(mesh_held / pipecat_held, 2) if pipecat_held else None,
                                  "levels_tried": levels},
        "mesh": mesh_levels, "pipecat": pipecat_levels,
    }


def _log_level(side: str, level: dict) -> None:
    log(f"{side} {level['conversations']}: p50 {level['p50']} p90 {level['p90']} ms, "
        f"{level['answered']}/{level['turns']} answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,2,3,4,6,8", help="conversation counts, increasing, starting at 1")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation per level")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if levels[0] != 1 or levels != sorted(set(levels)) or args.turns < 2:
        parser.error("--levels must increase from 1, and --turns be at least 2")
    figures = run(levels, args.turns)
    path = write(figures, args.out / "v2v_box.json", "bench.v2v_box_plot")
    log(f"conversations per box: {figures['conversations_per_box']}; wrote {path}")


if __name__ == "__main__":
    main()
