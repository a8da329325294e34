"""services/runtime/cpu.py: CPUs from cgroup files (fake ones, in tmp_path), the affinity mask and
the core count; engine thread choices; the wait policy and onnxruntime session options."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from voicemesh.runtime import cpu


@pytest.fixture
def machine(monkeypatch):
    """A 4-core machine with all 4 in the affinity mask, unless a test changes it."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    names = [f"VOICEMESH_{kind}_THREADS" for kind in ("STT", "LLM", "TTS", "VAD", "SMART_TURN")]
    for name in (*names, "VOICEMESH_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.setenv(name, "")  # so that the test's own changes are undone too
        monkeypatch.delenv(name)


def cgroup_files(root: Path, files: dict[str, str], own: str = "0::/") -> str:
    """Write fake cgroup files under root; returns the path of a fake /proc/self/cgroup."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    proc = root / "proc-self-cgroup"
    proc.write_text(own + "\n")
    return str(proc)


def test_v2_unlimited_is_no_quota(tmp_path, machine):
    proc = cgroup_files(tmp_path, {"cpu.max": "max 100000"})
    assert cpu.cgroup_quota(tmp_path, proc) is None
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(4, "cpu count 4")


def test_v2_quota_rounds_up(tmp_path, machine):
    proc = cgroup_files(tmp_path, {"cpu.max": "150000 100000"})
    assert cpu.cgroup_quota(tmp_path, proc) == 1.5
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(2, "cgroup quota 1.5")


def test_v2_a_quota_under_one_cpu_still_gives_one(tmp_path, machine):
    proc = cgroup_files(tmp_path, {"cpu.max": "20000 100000"})
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(1, "cgroup quota 0.2")


def test_v2_the_tightest_of_the_process_cgroup_and_its_parents(tmp_path, machine):
    proc = cgroup_files(tmp_path, {
        "cpu.max": "max 100000",
        "kube/cpu.max": "100000 100000",  # the parent allows 1 CPU ...
        "kube/pod/cpu.max": "300000 100000",  # ... whatever the pod's own says
    }, own="0::/kube/pod")
    assert cpu.cgroup_quota(tmp_path, proc) == 1.0


def test_v2_path_outside_the_mount_falls_back_to_its_root(tmp_path, machine):
    proc = cgroup_files(tmp_path, {"cpu.max": "250000 100000"}, own="0::/not/mounted/here")
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(3, "cgroup quota 2.5")


def test_a_quota_equal_to_the_cores_limits_nothing(tmp_path, machine):
    proc = cgroup_files(tmp_path, {"cpu.max": "400000 100000"})
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(4, "cpu count 4")


def test_v1_quota(tmp_path, machine):
    proc = cgroup_files(tmp_path, {
        "cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000",
    }, own="1:cpu:/")
    assert cpu.cgroup_quota(tmp_path, proc) == 0.5
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(1, "cgroup quota 0.5")


def test_v1_unlimited_and_combined_controller_folder(tmp_path, machine):
    proc = cgroup_files(tmp_path, {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/docker/cpu.cfs_quota_us": "200000", "cpu,cpuacct/docker/cpu.cfs_period_us": "100000",
    }, own="4:cpu,cpuacct:/docker")
    assert cpu.cgroup_quota(tmp_path, proc) == 2.0


def test_no_cgroup_files_at_all(tmp_path, machine):
    proc = cgroup_files(tmp_path, {})
    assert cpu.cgroup_quota(tmp_path, proc) is None
    assert cpu.cgroup_quota(tmp_path / "missing", str(tmp_path / "no-such-proc-file")) is None


def test_affinity_mask_below_the_core_count(tmp_path, machine, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    proc = cgroup_files(tmp_path, {"cpu.max": "max 100000"})
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(1, "affinity 1")


def test_quota_tighter_than_affinity(tmp_path, machine, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    proc = cgroup_files(tmp_path, {"cpu.max": "100000 100000"})
    assert cpu.available_cpus(tmp_path, proc) == cpu.CpuBudget(1, "cgroup quota 1")


def test_without_sched_getaffinity(tmp_path, machine, monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    assert cpu.available_cpus(tmp_path, cgroup_files(tmp_path, {})) == cpu.CpuBudget(4, "cpu count 4")


# -- thread choices ---------------------------------------------------------------------------

def test_default_is_capped_by_the_cpus(machine):
    one = cpu.CpuBudget(1, "affinity 1")
    assert cpu.engine_threads("stt", 2, budget=one) == cpu.ThreadChoice(1, "affinity 1")
    two = cpu.CpuBudget(2, "cgroup quota 1.5")
    assert cpu.engine_threads("stt", 2, budget=two) == cpu.ThreadChoice(2, "cgroup quota 1.5")
    many = cpu.CpuBudget(16, "cpu count 16")
    assert cpu.engine_threads("stt", 2, budget=many) == cpu.ThreadChoice(2, "default 2; cpu count 16")


def test_env_wins_even_above_the_cpus(machine, monkeypatch):
    monkeypatch.setenv("VOICEMESH_STT_THREADS", "8")
    monkeypatch.setenv("VOICEMESH_THREADS", "3")
    one = cpu.CpuBudget(1, "affinity 1")
    assert cpu.engine_threads("stt", 2, budget=one) == cpu.ThreadChoice(8, "env VOICEMESH_STT_THREADS")
    assert cpu.engine_threads("llm", 2, budget=one) == cpu.ThreadChoice(3, "env VOICEMESH_THREADS")


def test_an_argument_wins_over_env(machine, monkeypatch):
    monkeypatch.setenv("VOICEMESH_STT_THREADS", "8")
    assert cpu.engine_threads("stt", 2, explicit=3) == cpu.ThreadChoice(3, "argument")


def test_bad_env_is_refused(machine, monkeypatch):
    monkeypatch.setenv("VOICEMESH_STT_THREADS", "0")
    with pytest.raises(ValueError, match="VOICEMESH_STT_THREADS"):
        cpu.engine_threads("stt", 2)


def test_named_setting(machine, monkeypatch):
    monkeypatch.setenv("VOICEMESH_VAD_SMART_TURN_THREADS", "2")
    choice = cpu.engine_threads("vad", 1, name="smart_turn_threads")
    assert choice == cpu.ThreadChoice(2, "env VOICEMESH_VAD_SMART_TURN_THREADS")


# -- wait policy ------------------------------------------------------------------------------

def test_passive_by_default_and_set_before_the_import(machine):
    policy = cpu.set_omp_wait_policy("no_such_engine_module")
    assert policy == cpu.WaitPolicy("PASSIVE", "default, GOMP_SPINCOUNT=1000")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == cpu.DEFAULT_SPIN_COUNT
    assert not policy.spins


def test_the_users_wait_policy_wins(machine, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    policy = cpu.set_omp_wait_policy("no_such_engine_module")
    assert policy == cpu.WaitPolicy("ACTIVE", "env")
    assert os.environ["OMP_WAIT_POLICY"] == "active" and policy.spins
    assert "GOMP_SPINCOUNT" not in os.environ  # the user's policy comes with libgomp's own spin count


def test_too_late_when_the_engine_is_already_loaded(machine, monkeypatch):
    monkeypatch.setitem(sys.modules, "fake_engine_module", object())
    policy = cpu.set_omp_wait_policy("fake_engine_module")
    assert policy.value == "PASSIVE" and "already loaded" in policy.source


def test_the_users_spin_count_wins_and_is_reported(machine, monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert cpu.set_omp_wait_policy("no_such_engine_module").source == "default, GOMP_SPINCOUNT=10000"
    assert os.environ["GOMP_SPINCOUNT"] == "10000"


def test_details_and_description(machine):
    engine = cpu.EngineCpu(cpu.ThreadChoice(2, "cpu count 2"), cpu.WaitPolicy("PASSIVE", "default"))
    assert engine.details() == {
        "threads": "2", "threads_source": "cpu count 2", "wait_policy": "PASSIVE", "wait_policy_source": "default",
    }
    assert engine.details("smart_turn_")["smart_turn_threads"] == "2"
    assert engine.describe() == "2 threads (cpu count 2), wait policy PASSIVE (default)"


@pytest.mark.parametrize(("policy", "spinning"), [("PASSIVE", "0"), ("ACTIVE", "1")])
def test_onnx_session_options(policy, spinning):
    ort = pytest.importorskip("onnxruntime")
    engine = cpu.EngineCpu(cpu.ThreadChoice(3, "env"), cpu.WaitPolicy(policy, "default"))
    options = cpu.onnx_session_options(ort, engine)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == spinning
