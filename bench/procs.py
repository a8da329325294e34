"""Processes the bench starts: tests/support.py's (free loopback ports, stop by pid that always
runs: SIGTERM, then SIGKILL), plus CPU pinning, quiet logs, and the fake services."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.support import ROOT, Processes, fake_env, free_port, wait_for_port, wait_serving  # noqa: F401 - for bench.run
from voicemesh.cli.mesh import Mesh, free_ports, serve_command

LOG_DIR = ROOT / "bench" / "results" / "logs"


def pinned(argv: list[str], cores: str | None) -> list[str]:
    """Prefix `taskset -c CORES` when asked and available."""
    if cores and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cores, *argv]
    return argv


class Procs(Processes):
    def __init__(self):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        super().__init__(LOG_DIR)

    def start(self, name: str, argv: list[str], env: dict | None = None, cores: str | None = None,
              capture: bool = False) -> subprocess.Popen:
        return super().start(name, pinned(argv, cores), {"VOICEMESH_LOG_LEVEL": "WARNING", **(env or {})}, capture=capture)

    def serve_wire_fakes(self, services: str, port: int, env: dict, cores: str | None) -> subprocess.Popen:
        """bench/fakes.py: the wire-level fakes, several services in one process (see its docstring)."""
        proc = self.start(f"fakes-{services.replace(',', '-')}",
                          [sys.executable, "-m", "bench.fakes", "--port", str(port), "--services", services], env, cores)
        wait_for_port(port, proc)
        return proc

    def serve_provider_fakes(self, kinds: tuple[str, ...], script, cores: str | None) -> dict[str, str]:
        """The real services with `--provider fake` running `script` (a FakeScript), a process each
        (started together by voicemesh.cli.mesh, pinned); returns their addresses once SERVING."""
        mesh = Mesh(ports=free_ports(kinds), services=kinds, env={"VOICEMESH_LOG_LEVEL": "WARNING", **fake_env(script)},
                    log_dir=LOG_DIR / "fakes", ready_timeout=120, extra_args={kind: ("--provider", "fake") for kind in kinds},
                    command=lambda kind, host, port: pinned(serve_command(kind, host, port), cores))
        self.start_mesh(mesh)
        return {kind: mesh.address(kind) for kind in kinds}

    def serve_orchestrator(self, port: int, env: dict, cores: str | None) -> subprocess.Popen:
        argv = [sys.executable, "-m", "voicemesh.runtime.serve", "orchestrator", "--host", "127.0.0.1", "--port", str(port)]
        proc = self.start("orchestrator", argv, env, cores)
        wait_serving(f"127.0.0.1:{port}", proc, timeout=120)
        return proc
