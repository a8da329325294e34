"""Processes the bench starts: free loopback ports, readiness, CPU pinning, and a stop by pid
that always runs (SIGTERM, then SIGKILL)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from voicemesh.cli.mesh import stop_process, wait_for_port, wait_serving

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = ROOT / "bench" / "results" / "logs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(argv: list[str], cores: str | None) -> list[str]:
    """Prefix `taskset -c CORES` when asked and available."""
    if cores and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cores, *argv]
    return argv


class Procs:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        LOG_DIR.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict | None = None, cores: str | None = None,
              capture: bool = False) -> subprocess.Popen:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "VOICEMESH_LOG_LEVEL": "WARNING", **(env or {})}
        stderr = open(LOG_DIR / f"{name}.log", "wb")
        proc = subprocess.Popen(pinned(argv, cores), cwd=ROOT, env=full_env, stderr=stderr,
                                stdout=subprocess.PIPE if capture else stderr)
        stderr.close()
        self.procs.append(proc)
        return proc

    def serve_fakes(self, services: str, port: int, env: dict, cores: str | None) -> subprocess.Popen:
        proc = self.start(f"fakes-{services.replace(',', '-')}",
                          [sys.executable, "-m", "bench.fakes", "--port", str(port), "--services", services], env, cores)
        wait_for_port(port, proc)
        return proc

    def serve_orchestrator(self, port: int, env: dict, cores: str | None) -> subprocess.Popen:
        argv = [sys.executable, "-m", "voicemesh.runtime.serve", "orchestrator", "--host", "127.0.0.1", "--port", str(port)]
        proc = self.start("orchestrator", argv, env, cores)
        wait_serving(f"127.0.0.1:{port}", proc, timeout=120)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        stop_process(proc, timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


