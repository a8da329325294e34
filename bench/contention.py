"""The contention stage: embedded voice-to-voice when the machine is quiet, with one core kept
busy by an unrelated process, and with the services held to a CPU limit, interleaved in one
run on one mesh and one fixture; plus what each service process used per answered turn.

Conditions (each round runs every condition once, in this order, so drift hits them alike):
- quiet: nothing else running;
- busy: a `while True: pass` Python process in its own session (like any unrelated process:
  its own autogroup), placed by the scheduler, stopped by pid after the run;
- limited: the services' processes moved into a cgroup with a CFS quota of `cpus` CPUs
  (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`: what a Kubernetes CPU limit sets); where no
  cgroup can be made, every thread of theirs pinned to `cpus` cores (sched_setaffinity).

After each run the stage waits until the services are idle again (bounded), so a run's
trailing work (the STT's decode after the caller leaves) is counted with it and does not
spill into the next condition. Resource use per service comes from /proc (utime+stime and
reaped children's, VmHWM, VmRSS, Threads), sampled every 250 ms during the quiet runs.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from bench.stats import CLOCK_TICKS as CLK_TCK, machine_cpu, percentile

QUIET, BUSY, LIMITED = "quiet", "busy", "limited"
CONDITIONS = (QUIET, BUSY, LIMITED)
SAMPLE_S = 0.25  # the resource sampler's period (10 ms ticks: 0.04-core resolution)
SETTLE_WINDOW_S = 0.5
SETTLE_MAX_S = 10.0
SETTLE_CORES = 0.05  # above the idle baseline, for the whole mesh: "idle again"
QUIET_MAX_OTHER_CORES = 0.25  # other processes' median load during the quiet runs above this: not quiet
CGROUP_PERIOD_US = 100_000


# --- /proc parsing (pure) ---------------------------------------------------------------

def parse_stat(text: str) -> dict:
    """/proc/PID/stat -> CPU seconds (own and reaped children's), threads, state. The command
    name (field 2) is in parentheses and may hold spaces or parentheses: split after the last ')'."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    if not head or len(fields) < 18:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    # rest starts at field 3 (state); utime is field 14, stime 15, cutime 16, cstime 17, num_threads 20
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return {"state": fields[0], "utime_s": utime / CLK_TCK, "stime_s": stime / CLK_TCK,
            "children_s": (cutime + cstime) / CLK_TCK, "cpu_s": (utime + stime + cutime + cstime) / CLK_TCK,
            "threads": int(fields[17])}


def parse_status(text: str) -> dict:
    """/proc/PID/status -> peak and current resident set (MiB) and thread count."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            number = int(value.split()[0])
            values[key] = number if key == "Threads" else round(number / 1024, 1)  # kB -> MiB
    return {"peak_rss_mib": values.get("VmHWM"), "rss_mib": values.get("VmRSS"), "threads": values.get("Threads")}


def cpu_seconds(pid: int) -> float | None:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())["cpu_s"]
    except (OSError, ValueError):
        return None


def memory(pid: int) -> dict:
    try:
        return parse_status(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return {"peak_rss_mib": None, "rss_mib": None, "threads": None}


def snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    return {kind: cpu_seconds(pid) for kind, pid in pids.items()}


def parse_proc_stat(text: str) -> float:
    """/proc/stat's first line -> CPU seconds the whole machine has spent busy (user, nice,
    system, irq, softirq, steal; guest time is already inside user)."""
    cpu = machine_cpu(text)
    return sum(cpu[kind] for kind in ("user", "nice", "system", "irq", "softirq", "steal"))


def machine_busy_s() -> float | None:
    try:
        return parse_proc_stat(Path("/proc/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def background_cores(machine_s: float, ours_s: float, wall_s: float) -> float | None:
    """Cores used by everything but the services and the bench itself over `wall_s`."""
    return None if wall_s <= 0 else round(max(0.0, machine_s - ours_s) / wall_s, 2)


# --- what a service needs per conversation (pure) ----------------------------------------

def per_turn_usage(deltas: dict[str, float], wall_s: float, idle_cores: dict[str, float], turns: int,
                   session_s: float) -> dict[str, dict]:
    """CPU each service used over the quiet runs, net of its idle baseline, per answered turn,
    and as mean cores while a conversation was open (net CPU over the sessions' wall time)."""
    out = {}
    for kind, used in deltas.items():
        idle = idle_cores.get(kind) or 0.0
        net = max(0.0, used - idle * wall_s)
        out[kind] = {
            "cpu_s_gross": round(used, 3),
            "cpu_s_net": round(net, 3),
            "cpu_s_per_turn": round(net / turns, 3) if turns else None,
            "mean_cores_while_open": round(net / session_s, 3) if session_s else None,
            "idle_cores": round(idle, 4),
        }
    return out


def summarise_condition(v2v: dict, quiet_p50: float | None) -> dict:
    """One condition's voice-to-voice summary with its ratio to the quiet p50 of the same run."""
    ratio = None if v2v.get("p50") is None or not quiet_p50 else round(v2v["p50"] / quiet_p50, 2)
    return {"p50": v2v.get("p50"), "p90": v2v.get("p90"), "ratio_to_quiet_p50": ratio,
            "turns_spoken": v2v.get("turns_spoken", 0), "turns_answered": v2v.get("turns_answered", 0),
            "breakdown_p50": v2v.get("breakdown_p50", {}), "replies": v2v.get("replies", []),
            "failures": v2v.get("failures", []), "runs": v2v.get("runs", 0), "ok_runs": v2v.get("ok_runs", 0)}


def headline(conditions: dict[str, dict]) -> dict:
    """The ratios to quiet and the turns answered under contention (busy and limited together).
    The quiet condition was quiet unless other processes' median load during it exceeded
    QUIET_MAX_OTHER_CORES (on a shared machine the ratios then mean little)."""
    under = [conditions[c] for c in (BUSY, LIMITED) if c in conditions]
    other = (conditions.get(QUIET) or {}).get("other_processes_cores_median")
    return {"quiet_was_quiet": None if other is None else other <= QUIET_MAX_OTHER_CORES,
            "busy_to_quiet_p50": (conditions.get(BUSY) or {}).get("ratio_to_quiet_p50"),
            "limited_to_quiet_p50": (conditions.get(LIMITED) or {}).get("ratio_to_quiet_p50"),
            "turns_spoken_under_contention": sum(c["turns_spoken"] for c in under),
            "turns_answered_under_contention": sum(c["turns_answered"] for c in under)}


# --- cgroups (detection is pure over the texts of /proc/mounts and /proc/self/cgroup) ------

def find_cpu_cgroup(mounts: str, cgroups: str) -> tuple[str, Path] | None:
    """Where this process's CPU cgroup lives: ("v2", dir) when a cgroup2 mount holds the cpu
    controller, else ("v1", dir) for a v1 hierarchy with the cpu controller; None if neither."""
    own = {}
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            own[parts[1]] = parts[2]
    v1, v2 = None, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        fstype, point, options = fields[2], fields[1], fields[3].split(",")
        if fstype == "cgroup2" and v2 is None and "" in own:
            v2 = Path(point) / own[""].lstrip("/")
        elif fstype == "cgroup" and "cpu" in options and v1 is None:
            key = next((k for k in own if "cpu" in k.split(",")), None)
            if key is not None:
                v1 = Path(point) / own[key].lstrip("/")
    if v2 is not None and "cpu" in _read(v2 / "cgroup.controllers").split():
        return "v2", v2
    if v1 is not None:
        return "v1", v1
    return None


def quota_line(cpus: float, version: str, period_us: int = CGROUP_PERIOD_US) -> dict[str, str]:
    """The files (and contents) that give a cgroup `cpus` CPUs of CFS quota."""
    quota = str(int(round(cpus * period_us)))
    if version == "v2":
        return {"cpu.max": f"{quota} {period_us}"}
    return {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": quota}


def parse_cpu_stat(text: str) -> dict:
    """cpu.stat -> periods, throttled periods, seconds throttled (v1 throttled_time ns, v2 throttled_usec)."""
    values = dict((k, int(v)) for k, v in (line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2))
    seconds = values["throttled_usec"] / 1e6 if "throttled_usec" in values else values.get("throttled_time", 0) / 1e9
    return {"periods": values.get("nr_periods", 0), "throttled_periods": values.get("nr_throttled", 0),
            "throttled_s": round(seconds, 3)}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class CgroupLimit:
    """A child cgroup with a CPU quota, made next to this process's own; `hold(pids)` moves the
    processes in and back out. `make()` returns None where no such cgroup can be made here."""

    def __init__(self, version: str, parent: Path, cpus: float):
        self.version, self.parent, self.cpus = version, parent, cpus
        self.path = parent / f"voicemesh-bench-{os.getpid()}"

    @classmethod
    def make(cls, cpus: float) -> "CgroupLimit | None":
        found = find_cpu_cgroup(_read(Path("/proc/mounts")), _read(Path("/proc/self/cgroup")))
        if found is None:
            return None
        version, parent = found
        if version == "v2" and "cpu" not in _read(parent / "cgroup.subtree_control").split():
            return None  # children would not get cpu.max; enabling it would change the host's setup
        limit = cls(version, parent, cpus)
        try:
            limit.path.mkdir()
        except OSError:
            return None
        try:
            for name, value in quota_line(cpus, version).items():
                (limit.path / name).write_text(value)
        except OSError:
            limit.remove()
            return None
        return limit

    def describe(self) -> str:
        what = "cpu.max" if self.version == "v2" else "cpu.cfs_quota_us"
        return f"cgroup {self.version} {what}: {self.cpus:g} CPU ({self.path})"

    @contextmanager
    def hold(self, pids: list[int]):
        before = parse_cpu_stat(_read(self.path / "cpu.stat"))
        home = {pid: self._own_cgroup(pid) for pid in pids}
        try:
            for pid in pids:
                (self.path / "cgroup.procs").write_text(str(pid))
            yield self
        finally:
            for pid, path in home.items():
                try:
                    (path / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass  # it exited
            after = parse_cpu_stat(_read(self.path / "cpu.stat"))
            self.last = {k: round(after[k] - before[k], 3) for k in after}

    def _own_cgroup(self, pid: int) -> Path:
        found = find_cpu_cgroup(_read(Path("/proc/mounts")), _read(Path(f"/proc/{pid}/cgroup")))
        return found[1] if found else self.parent

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


class AffinityLimit:
    """Every thread of the services pinned to the first `cpus` cores, and restored after."""

    def __init__(self, cpus: float):
        self.cores = set(range(max(1, int(cpus))))
        self.last: dict = {}

    def describe(self) -> str:
        return f"sched_setaffinity: every service thread on cores {sorted(self.cores)}"

    @contextmanager
    def hold(self, pids: list[int]):
        saved: dict[int, set[int]] = {}
        try:
            for pid in pids:
                for tid in _threads(pid):
                    try:
                        saved[tid] = os.sched_getaffinity(tid)
                        os.sched_setaffinity(tid, self.cores)
                    except OSError:
                        pass  # the thread ended
            yield self
        finally:
            every = set(range(os.cpu_count() or 1))
            for pid in pids:  # threads started while pinned inherited the pin: free them too
                for tid in _threads(pid):
                    try:
                        os.sched_setaffinity(tid, saved.get(tid, every))
                    except OSError:
                        pass

    def remove(self) -> None:
        pass


def _threads(pid: int) -> list[int]:
    try:
        return [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def make_limit(kind: str, cpus: float):
    """kind: auto (a cgroup where one can be made, else affinity), cgroup, or affinity."""
    if kind in ("auto", "cgroup"):
        limit = CgroupLimit.make(cpus)
        if limit is not None:
            return limit
        if kind == "cgroup":
            raise RuntimeError("no cgroup with the cpu controller can be made here (try --contention-limit affinity)")
    return AffinityLimit(cpus)


# --- the busy core and the resource sampler -----------------------------------------------

@contextmanager
def busy_core():
    """An unrelated CPU hog: its own session (so its own autogroup), not pinned; stopped by pid."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    hog.last = {"cores": None}
    try:
        time.sleep(0.3)  # let it take its core before the session starts
        cpu0, at = cpu_seconds(hog.pid), time.monotonic()
        yield hog
        used = cpu_seconds(hog.pid)
        if used is not None and cpu0 is not None:
            hog.last = {"cores": round((used - cpu0) / (time.monotonic() - at), 2)}
    finally:
        hog.terminate()
        try:
            hog.wait(timeout=5)
        except subprocess.TimeoutExpired:
            hog.kill()
            hog.wait(timeout=5)


class Sampler:
    """Every SAMPLE_S: each service's CPU over the last period (its peak, in cores) and its
    thread count (peak), while `running` is set."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peak_cores = {kind: 0.0 for kind in pids}
        self.peak_threads = {kind: 0 for kind in pids}
        self.running = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="contention-sampler", daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        last, at = snapshot(self.pids), time.monotonic()
        while not self._stop.wait(SAMPLE_S):
            now, when = snapshot(self.pids), time.monotonic()
            if self.running.is_set():
                for kind, pid in self.pids.items():
                    if now[kind] is not None and last[kind] is not None:
                        self.peak_cores[kind] = max(self.peak_cores[kind], (now[kind] - last[kind]) / (when - at))
                    self.peak_threads[kind] = max(self.peak_threads[kind], memory(pid)["threads"] or 0)
            last, at = now, when


def settle(pids: dict[str, int], idle_cores: float) -> float:
    """Wait (at most SETTLE_MAX_S) until the services together use no more than their idle
    baseline plus SETTLE_CORES over a SETTLE_WINDOW_S window; returns the seconds waited."""
    started = time.monotonic()
    last = sum(v or 0.0 for v in snapshot(pids).values())
    while time.monotonic() - started < SETTLE_MAX_S:
        time.sleep(SETTLE_WINDOW_S)
        now = sum(v or 0.0 for v in snapshot(pids).values())
        if (now - last) / SETTLE_WINDOW_S <= idle_cores + SETTLE_CORES:
            break
        last = now
    return round(time.monotonic() - started, 2)


# --- the stage ------------------------------------------------------------------------------

def run(addr: str, pids: dict[str, int], runs: int, limit_kind: str = "auto", cpus: float = 1.0,
        idle_s: float = 3.0, log=print) -> dict:
    """Warm-up, idle baseline, then `runs` rounds of quiet, busy and limited; returns the results."""
    from bench import embedded
    from voicemesh.client.wavio import load_for_sending

    samples = load_for_sending(embedded.FIXTURES / "question_capital.wav")
    asyncio.run(embedded.one_voice_to_voice(addr, samples))  # warm caches; not counted
    settle(pids, 0.1)
    before, at = snapshot(pids), time.monotonic()
    time.sleep(idle_s)
    after, wall = snapshot(pids), time.monotonic() - at
    idle = {k: ((after[k] or 0.0) - (before[k] or 0.0)) / wall for k in pids}
    idle_total = sum(idle.values())

    limit = make_limit(limit_kind, cpus)
    log(f"contention: limit by {limit.describe()}; services idle at {idle_total:.3f} cores")
    rows: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    extra: dict[str, list] = {"hog_cores": [], "throttled": [], "settle_s": []}
    background: dict[str, list] = {c: [] for c in CONDITIONS}
    quiet_cpu = {k: 0.0 for k in pids}
    quiet_wall = 0.0
    ours = {**pids, "bench": os.getpid()}

    def measured():
        """One session, then the wait until the services are idle; what everything used meanwhile."""
        start_cpu, start_machine, start_at = snapshot(ours), machine_busy_s(), time.monotonic()
        row = asyncio.run(embedded.one_voice_to_voice(addr, samples))
        settled = settle(pids, idle_total)
        end_cpu, end_machine, wall = snapshot(ours), machine_busy_s(), time.monotonic() - start_at
        used = {k: end_cpu[k] - start_cpu[k] for k in ours if end_cpu[k] is not None and start_cpu[k] is not None}
        other = None
        if start_machine is not None and end_machine is not None:
            other = background_cores(end_machine - start_machine, sum(used.values()), wall)
        return row, used, wall, other, settled

    try:
        with Sampler(pids) as sampler:
            for round_number in range(runs):
                for condition in CONDITIONS:
                    if condition == QUIET:
                        sampler.running.set()
                        row, used, wall, other, settled = measured()
                        sampler.running.clear()
                        quiet_wall += wall
                        extra["settle_s"].append(settled)
                        for k in pids:
                            quiet_cpu[k] += used.get(k, 0.0)
                    elif condition == BUSY:
                        with busy_core() as hog:
                            row, used, wall, other, settled = measured()
                        extra["hog_cores"].append(hog.last["cores"])
                    else:
                        with limit.hold(list(pids.values())):
                            row, used, wall, other, settled = measured()
                        extra["throttled"].append(getattr(limit, "last", {}))
                    rows[condition].append(row)
                    background[condition].append(other)
                    latency = f"{row['total_ms']:.0f} ms" if row["ok"] else f"failed ({row['failure']})"
                    log(f"contention round {round_number + 1}/{runs} {condition:7s}: {latency}, "
                        f"answered {row['turns_answered']}/{row['turns_spoken']}, other processes {other} cores")
    finally:
        limit.remove()
    peak_cores, peak_threads = sampler.peak_cores, sampler.peak_threads

    summaries = {c: embedded.summarise_voice_to_voice(rows[c]) for c in CONDITIONS}
    quiet_p50 = summaries[QUIET]["p50"]
    conditions = {c: summarise_condition(summaries[c], quiet_p50) for c in CONDITIONS}
    for c in CONDITIONS:  # the hog's core shows here in the busy condition; anything else is someone else's load
        conditions[c]["other_processes_cores_median"] = percentile([b for b in background[c] if b is not None], 50)
    conditions[BUSY]["hog_cores_median"] = percentile([h for h in extra["hog_cores"] if h is not None], 50)
    conditions[LIMITED]["limit"] = limit.describe()
    if extra["throttled"] and extra["throttled"][0]:
        conditions[LIMITED]["throttled"] = {k: round(sum(t.get(k, 0) for t in extra["throttled"]), 3)
                                            for k in extra["throttled"][0]}
    answered = summaries[QUIET]["turns_answered"]
    session_s = sum(r["session_s"] for r in rows[QUIET])
    usage = per_turn_usage(quiet_cpu, quiet_wall, idle, answered, session_s)
    for kind, pid in pids.items():
        usage[kind].update(memory(pid))
        usage[kind]["peak_cores_250ms"] = round(peak_cores[kind], 2)
        usage[kind]["peak_threads"] = peak_threads[kind] or usage[kind]["threads"]
    return {
        "runs_per_condition": runs,
        "conditions": conditions,
        **headline(conditions),
        "per_service_quiet": usage,
        "quiet_turns_answered": answered,
        "quiet_session_s_mean": round(session_s / len(rows[QUIET]), 2) if rows[QUIET] else None,
        "quiet_settle_s_median": percentile(extra["settle_s"], 50),
        "idle_cores_total": round(idle_total, 4),
        "cpu_count": os.cpu_count(),
    }
