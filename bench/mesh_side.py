"""The mesh under load: the real orchestrator in front of the fixed-latency fakes.

Processes: the fakes (bench/fakes.py as VAD+STT and LLM+TTS, or with fakes="providers" the
four real services with `--provider fake`), the orchestrator (`voicemesh serve orchestrator`,
optionally pinned to one core) and the load client (`bench.load`, on the other core). The
orchestrator's CPU is read from /proc over the measured window (after ramp and warm-up).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.procs import Procs, free_port
from bench.scenario import Latencies
from bench.stats import cpu_seconds, steal_cores, steal_seconds


FAKES = ("providers", "wire")  # the real services with --provider fake, or bench/fakes.py


class MeshUnderTest:
    """Fakes and orchestrator, started once and reused for several load runs.

    fakes="providers": the four real services with their fake providers (a process each), as
    the tests run them; "wire": bench/fakes.py (two processes, no servicer: see its docstring)."""

    def __init__(self, lat: Latencies, orchestrator_cores: str | None = "0", others_cores: str | None = "1",
                 profile_to: str | None = None, fakes: str = "wire"):
        if fakes not in FAKES:
            raise ValueError(f"fakes must be one of {FAKES}, not {fakes!r}")
        self.fakes = fakes
        self.lat = lat
        self.orchestrator_cores = orchestrator_cores
        self.others_cores = others_cores
        self.procs = Procs()
        self.profile_to = profile_to

    def __enter__(self) -> "MeshUnderTest":
        try:
            if self.fakes == "providers":
                from voicemesh.runtime.fakes import FakeScript

                script = FakeScript.from_dict(self.lat.fake_script())
                served = self.procs.serve_provider_fakes(("vad", "stt", "llm", "tts"), script, self.others_cores)
            else:
                env = self.lat.to_env()
                vad_stt, llm_tts = free_port(), free_port()
                self.procs.serve_wire_fakes("vad,stt", vad_stt, env, self.others_cores)
                self.procs.serve_wire_fakes("llm,tts", llm_tts, env, self.others_cores)
                served = {"vad": f"127.0.0.1:{vad_stt}", "stt": f"127.0.0.1:{vad_stt}",
                          "llm": f"127.0.0.1:{llm_tts}", "tts": f"127.0.0.1:{llm_tts}"}
            addrs = {f"VOICEMESH_{kind.upper()}_ADDR": address for kind, address in served.items()}
            orch = free_port()
            self.orchestrator = self.procs.serve_orchestrator(orch, addrs, self.orchestrator_cores)
            self.address = f"127.0.0.1:{orch}"
        except BaseException:
            self.procs.stop_all()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.procs.stop_all()

    def run_load(self, sessions: int, duration: float, ramp: float = 2.0, warmup: float = 4.0,
                 jitter_ms: float = 20.0, profile_seconds: float = 0.0) -> dict:
        argv = [sys.executable, "-m", "bench.load", "--addr", self.address, "--sessions", str(sessions),
                "--duration", str(duration), "--ramp", str(ramp), "--warmup", str(warmup), "--jitter-ms", str(jitter_ms)]
        client = self.procs.start(f"load-{sessions}", argv, self.lat.to_env(), self.others_cores, capture=True)
        try:
            time.sleep(ramp + warmup)
            cpu0, steal0, t0 = cpu_seconds(self.orchestrator.pid), steal_seconds(), time.monotonic()
            profiler = None
            if profile_seconds and self.profile_to:
                profiler = _py_spy(self.orchestrator.pid, profile_seconds, self.profile_to)
            out, _ = client.communicate(timeout=duration + ramp + 120)
            cpu1, steal1, t1 = cpu_seconds(self.orchestrator.pid), steal_seconds(), time.monotonic()
            if profiler is not None:
                profiler.wait(timeout=profile_seconds + 30)
        finally:
            self.procs.stop(client)
        if client.returncode != 0:
            raise RuntimeError(f"load client failed (exit {client.returncode}); see bench/results/logs/load-{sessions}.log")
        result = json.loads(out)
        result["server_cpu_cores"] = round((cpu1 - cpu0) / max(t1 - t0, 1e-6), 3)
        result["steal_cores"] = steal_cores(steal0, steal1, t1 - t0)
        if self.orchestrator.poll() is not None:
            raise RuntimeError("the orchestrator exited during the run; see bench/results/logs/orchestrator.log")
        return result


def _py_spy(pid: int, seconds: float, out: str):
    """Sample the orchestrator with py-spy (from the bench venv) while the load runs."""
    from bench.venv import bench_bin

    spy = bench_bin("py-spy")
    if spy is None:
        return None
    argv = [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
            "--format", {".json": "speedscope", ".txt": "raw"}.get(Path(out).suffix, "flamegraph"),
            "--output", out, "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
