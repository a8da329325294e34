"""Small, dependency-free helpers shared by every bench process (both venvs import this).

- `percentile`: linear interpolation between closest ranks (numpy's default method).
- `Playback`: the underrun check. A client starts playing a turn's bot audio when its first
  chunk arrives and plays at real time. Chunk k is late when it arrives after the audio
  before it has finished playing, that is after `t0 + sum(duration of chunks 0..k-1)`,
  by more than `jitter_s`. Each late chunk is one underrun; playback then restarts from
  the late chunk (the listener heard a gap), so one stall is not counted again for every
  chunk after it.
- `spread`: median, min and max over repeated runs: every figure in the report is a median
  and shows its spread.
- `cpu_seconds`: user + system CPU time of a process, from /proc.
"""
from __future__ import annotations

import asyncio
import os
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100) of `values`; None when empty."""
    data = sorted(values)
    if not data:
        return None
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return float(data[low] + (data[high] - data[low]) * (rank - low))


def median(values) -> float | None:
    return percentile(values, 50)


def spread(values) -> dict:
    """{"median", "min", "max", "runs"} over repeated runs (None entries are skipped)."""
    data = [v for v in values if v is not None]
    if not data:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": round(median(data), 3), "min": round(min(data), 3), "max": round(max(data), 3), "runs": len(data)}


class Playback:
    """Real-time playback of one turn's bot audio at the client, counting underruns."""

    def __init__(self, jitter_s: float = 0.02):
        self.jitter_s = jitter_s
        self.start: float | None = None  # when the current run of playback started
        self.played_until: float | None = None  # when the audio received so far ends playing
        self.underruns = 0
        self.worst_gap_s = 0.0

    def chunk(self, arrival: float, seconds: float) -> bool:
        """A chunk of `seconds` of audio arrived at `arrival`; returns True if it was late."""
        late = False
        if self.played_until is None:
            self.start = self.played_until = arrival
        elif arrival > self.played_until:
            gap = arrival - self.played_until
            self.worst_gap_s = max(self.worst_gap_s, gap)
            if gap > self.jitter_s:
                self.underruns += 1
                late = True
            self.played_until = arrival  # playback resumes with this chunk
        self.played_until += seconds
        return late


PROC_STAT_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu(text: str) -> dict[str, float]:
    """/proc/stat's first line -> the whole machine's CPU seconds since boot, by kind
    (PROC_STAT_KINDS; guest time is already inside user)."""
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not /proc/stat: {text[:40]!r}")
    return {kind: int(value) / CLOCK_TICKS for kind, value in zip(PROC_STAT_KINDS, fields[1:9], strict=True)}


def steal_seconds() -> float | None:
    """CPU seconds this VM's vCPUs wanted to run while the hypervisor ran something else (steal),
    since boot; None where /proc/stat cannot be read. A run whose steal is a tenth of a core or
    more measured the neighbours as much as the code."""
    try:
        with open("/proc/stat") as stat:
            return machine_cpu(stat.read())["steal"]
    except (OSError, ValueError):
        return None


def steal_cores(start: float | None, end: float | None, wall_s: float) -> float | None:
    """Steal over a window, in cores (seconds of steal per second of wall time)."""
    if start is None or end is None or wall_s <= 0:
        return None
    return round(max(0.0, end - start) / wall_s, 3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class SessionStats:
    """What one session saw: when each speech burst ended, and each turn's bot audio."""

    def __init__(self, jitter_s: float):
        self.speech_ends: list[float] = []  # monotonic time the k-th burst's last frame was written
        self.first_audio: dict[int, float] = {}
        self.playback: dict[int, Playback] = {}
        self.jitter_s = jitter_s
        self.chunks = 0
        self.error = ""

    def audio(self, turn: int, arrival: float, seconds: float) -> None:
        self.first_audio.setdefault(turn, arrival)
        self.playback.setdefault(turn, Playback(self.jitter_s)).chunk(arrival, seconds)
        self.chunks += 1


def summarise(stats: list[SessionStats], fakes_total_ms: float, measure_from: float, measure_to: float, cpu: float,
              wall: float, lags: list[float]) -> dict:
    """One run's figures: turn latencies (k-th burst <-> turn k) inside the measured window,
    added latency (minus the fakes' own), underruns, errors, and the measuring side's health."""
    latencies, underruns, chunks, missed, errors = [], 0, 0, 0, []
    for session in stats:
        if session.error:  # counted as an error; its later turns are not "missed"
            errors.append(session.error)
        for k, end in enumerate(session.speech_ends, start=1):
            if not measure_from <= end <= measure_to:
                continue
            if k not in session.first_audio:
                missed += not session.error
                continue
            latencies.append((session.first_audio[k] - end) * 1000)
            underruns += session.playback[k].underruns
        chunks += session.chunks
    added = [value - fakes_total_ms for value in latencies]
    return {
        "sessions": len(stats),
        "turns": len(latencies),
        "missed_turns": missed,
        "latency_ms": {"p50": _r(percentile(latencies, 50)), "p99": _r(percentile(latencies, 99))},
        "added_ms": {"p50": _r(percentile(added, 50)), "p90": _r(percentile(added, 90)), "p99": _r(percentile(added, 99))},
        "added_samples": [round(v, 2) for v in added],
        "underruns": underruns,
        "audio_chunks": chunks,
        "errors": errors[:5],
        "error_count": len(errors),
        "client_cpu_cores": round(cpu / max(wall, 1e-6), 3),
        "client_lag_ms": {"p50": _r(percentile(lags, 50)), "p99": _r(percentile(lags, 99))},
    }


def _r(value):
    return None if value is None else round(value, 2)


async def loop_lag(stop_at: float, lags: list[float]) -> None:
    """How late this process's event loop wakes up, in ms (its own overload), until `stop_at`."""
    while time.monotonic() < stop_at:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append((time.monotonic() - before - 0.01) * 1000)


def summarise_runs(runs: list[dict]) -> dict:
    """Median over repeats of each run's p50/p99 added latency, with the spread."""
    return {
        "p50": spread([r["added_ms"]["p50"] for r in runs])["median"],
        "p99": spread([r["added_ms"]["p99"] for r in runs])["median"],
        "p50_spread": spread([r["added_ms"]["p50"] for r in runs]),
        "p99_spread": spread([r["added_ms"]["p99"] for r in runs]),
        "cpu_cores": spread([r["server_cpu_cores"] for r in runs])["median"],
        "turns": sum(r["turns"] for r in runs),
        "underruns": sum(r["underruns"] for r in runs),
        "missed_turns": sum(r["missed_turns"] for r in runs),
        "session_errors": sum(r["error_count"] for r in runs),
        "error_examples": sorted({e for r in runs for e in r["errors"]})[:3],
        "steal_cores": max((r["steal_cores"] for r in runs if r.get("steal_cores") is not None), default=None),
        "client_lag_p99_ms": max((r.get("client_lag_ms") or r.get("server_lag_ms") or {}).get("p99") or 0 for r in runs),
    }


def passes(summary: dict, limit_ms: float = 20.0) -> bool:
    """The capacity criterion: every turn answered, no underruns, p99 added latency < limit."""
    healthy = summary["underruns"] == 0 and summary["missed_turns"] == 0 and summary["turns"] > 0
    return healthy and summary["p99"] is not None and summary["p99"] < limit_ms
