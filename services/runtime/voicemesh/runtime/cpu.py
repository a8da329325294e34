"""How many CPUs this process really has, and the thread and wait settings of its native engines.

os.cpu_count() counts the host's cores, not what a container's CPU quota or the affinity mask
allows. An engine with more compute threads than CPUs makes every barrier of a parallel op wait
for a thread that is not running; with OpenMP's default busy-wait (llama.cpp, CTranslate2) the
waiting threads also burn the CPU the others need. Measured on 2 cores with one core taken by
another process: 40 ms per LLM token became 1.2-2.7 s; with OMP_WAIT_POLICY=PASSIVE voice-to-voice
went from 4-12x its quiet time to 1.6x. So every engine here gets:

- threads: min(the engine's default, the CPUs available), unless VOICEMESH_<KIND>_<NAME> or
  VOICEMESH_<NAME> sets it (that always wins, even above the CPUs available);
- almost no spinning: OMP_WAIT_POLICY=PASSIVE with GOMP_SPINCOUNT=1000 (a few microseconds of
  spin before a thread sleeps) unless the user set either (they must be in the environment
  before the OpenMP library loads), and onnxruntime's `allow_spinning` off unless
  OMP_WAIT_POLICY=ACTIVE.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
# Spins before a waiting OpenMP thread sleeps. With PASSIVE's default, 0, llama.cpp took 62 ms a
# token on 2 cores against 47 spinning (ACTIVE) or with 10000 spins. 1000 spins, a few
# microseconds, kept 92-97 ms of quiet voice-to-voice and cost 78-98 ms beside a busy core
# (docs/performance.md#sharing-the-cpu); 10000 cost 650 ms there.
DEFAULT_SPIN_COUNT = "1000"


@dataclass(frozen=True)
class CpuBudget:
    cpus: int  # whole CPUs this process may keep busy
    source: str  # what set it: "cgroup quota 1.5", "affinity 1", "cpu count 2"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's (cgroup v2 path, cgroup v1 cpu controller path) from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(Path(proc_cgroup)) or "").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(mount: Path, own: str | None) -> list[Path]:
    """The process's cgroup folder under `mount` and each parent up to the mount itself.
    A limit set on any of them applies; inside a cgroup namespace the path is often just "/"."""
    folders = [mount]
    if own and own != "/":
        parts = [p for p in own.strip("/").split("/") if p]
        folders += [mount.joinpath(*parts[:n]) for n in range(1, len(parts) + 1)]
    return [f for f in folders if f.is_dir()]


def cgroup_quota(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> float | None:
    """The CPU quota in CPUs (1.5 for "150000 100000"), the tightest of this process's cgroup and
    its parents; None when there is none. cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`."""
    root = Path(root)
    v2, v1 = _own_cgroups(proc_cgroup)
    quotas: list[float] = []
    for folder in _ancestors(root, v2):
        fields = (_read(folder / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max" and float(fields[1]) > 0:
            quotas.append(float(fields[0]) / float(fields[1]))
    if not quotas:  # cgroup v1 (or hybrid): the cpu controller has its own mount
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            for folder in _ancestors(root / name, v1):
                quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                if quota and period and float(quota) > 0 and float(period) > 0:
                    quotas.append(float(quota) / float(period))
            if quotas:
                break
    return min(quotas) if quotas else None


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


def available_cpus(root: str | os.PathLike = CGROUP_ROOT, proc_cgroup: str = PROC_CGROUP) -> CpuBudget:
    """The fewest of: the cgroup quota (rounded up), the affinity mask, os.cpu_count().
    On a tie the plainer reason is named (a quota equal to the core count limits nothing)."""
    count = os.cpu_count() or 1
    budget = CpuBudget(count, f"cpu count {count}")
    affinity = _affinity()
    if affinity and affinity < budget.cpus:
        budget = CpuBudget(affinity, f"affinity {affinity}")
    quota = cgroup_quota(root, proc_cgroup)
    if quota is not None and max(1, math.ceil(quota - 1e-9)) < budget.cpus:
        budget = CpuBudget(max(1, math.ceil(quota - 1e-9)), f"cgroup quota {quota:g}")
    return budget


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    source: str  # "env VOICEMESH_LLM_THREADS", "argument", "cpu count 2", "default 2; cpu count 16" ...


def engine_threads(
    kind: str, default: int, explicit: int | None = None, name: str = "threads", budget: CpuBudget | None = None,
) -> ThreadChoice:
    """Compute threads for one engine: `explicit` (a constructor argument), else
    VOICEMESH_<KIND>_<NAME>, else VOICEMESH_<NAME>, else min(default, CPUs available)."""
    if explicit:
        return ThreadChoice(int(explicit), "argument")
    for env in (f"VOICEMESH_{kind.upper()}_{name.upper()}", f"VOICEMESH_{name.upper()}"):
        raw = os.environ.get(env, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{env}={raw!r}: expected a number of threads, 1 or more")
            return ThreadChoice(int(raw), f"env {env}")
    budget = budget or available_cpus()
    if budget.cpus <= default:
        return ThreadChoice(budget.cpus, budget.source)
    return ThreadChoice(default, f"default {default}; {budget.source}")


@dataclass(frozen=True)
class WaitPolicy:
    value: str  # PASSIVE or ACTIVE (or whatever the user set)
    source: str  # "default", "env", or a note that it came too late

    @property
    def spins(self) -> bool:
        return self.value.upper() == "ACTIVE"


def wait_policy() -> WaitPolicy:
    """The wait policy in force: OMP_WAIT_POLICY if set, else PASSIVE. Read-only; see set_omp_wait_policy."""
    value = os.environ.get(WAIT_POLICY_ENV, "").strip()
    return WaitPolicy(value.upper(), "env") if value else WaitPolicy(DEFAULT_WAIT_POLICY, "default")


def set_omp_wait_policy(module: str) -> WaitPolicy:
    """Before importing `module`, whose OpenMP runtime reads OMP_WAIT_POLICY once, when it loads:
    make PASSIVE the default (a value the user set wins). If `module` is already imported the
    setting cannot take effect any more, and the returned source says so."""
    policy = wait_policy()
    if policy.source == "default":  # unset or empty: a value the user set is left alone
        os.environ[WAIT_POLICY_ENV] = policy.value
        if not os.environ.get(SPIN_COUNT_ENV, "").strip():
            os.environ[SPIN_COUNT_ENV] = DEFAULT_SPIN_COUNT
    if module in sys.modules:
        log.warning("%s was loaded before %s could be set; its OpenMP keeps the setting of that time",
                    module, WAIT_POLICY_ENV)
        return WaitPolicy(policy.value, f"{policy.source}, but {module} was already loaded")
    spin = os.environ.get("GOMP_SPINCOUNT")
    return WaitPolicy(policy.value, f"{policy.source}, GOMP_SPINCOUNT={spin}" if spin else policy.source)


@dataclass(frozen=True)
class EngineCpu:
    """What one engine runs with, for its Info details and its startup log line."""

    threads: ThreadChoice
    wait: WaitPolicy

    def details(self, prefix: str = "") -> dict[str, str]:
        return {
            f"{prefix}threads": str(self.threads.threads), f"{prefix}threads_source": self.threads.source,
            f"{prefix}wait_policy": self.wait.value, f"{prefix}wait_policy_source": self.wait.source,
        }

    def describe(self) -> str:
        count = self.threads.threads
        threads = f"{count} thread{'s' if count != 1 else ''} ({self.threads.source})"
        return f"{threads}, wait policy {self.wait.value} ({self.wait.source})"


def onnx_session_options(ort, engine: EngineCpu):
    """onnxruntime SessionOptions: `engine.threads` intra-op threads, one inter-op thread, and
    its worker threads sleep between ops instead of spinning unless the policy is ACTIVE."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = engine.threads.threads
    options.inter_op_num_threads = 1
    spinning = "1" if engine.wait.spins else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    options.log_severity_level = 3
    return options
