"""Shared fixtures: real processes on free loopback ports, always cleaned up."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


def wait_serving(address: str, timeout: float = 180.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} was not SERVING within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process we started (by its pid), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Processes:
    """Processes started by one fixture; all stopped on teardown, even after failures."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        log.close()
        self.procs.append(proc)
        return proc

    def serve(self, kind: str, port: int, env: dict[str, str] | None = None, extra: list[str] = ()) -> subprocess.Popen:
        args = [sys.executable, "-m", "voicemesh.cli", "serve", kind, "--host", "127.0.0.1", "--port", str(port), *extra]
        return self.start(kind, args, env)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)


@pytest.fixture(scope="module")
def fake_mesh(tmp_path_factory):
    """The real orchestrator in front of the scripted fake services (one separate process)."""
    procs = Processes(tmp_path_factory.mktemp("fake-mesh"))
    try:
        fake_port, orch_port = free_port(), free_port()
        fakes = procs.start("fakes", [sys.executable, "-m", "tests.fakes.scripted", "--port", str(fake_port)],
                            env={"FAKE_TRANSCRIPTS": os.environ.get("FAKE_TRANSCRIPTS", "")})
        wait_for_port(fake_port, fakes)
        fake_addr = f"127.0.0.1:{fake_port}"
        env = {f"VOICEMESH_{kind}_ADDR": fake_addr for kind in ("VAD", "STT", "LLM", "TTS")}
        procs.serve("orchestrator", orch_port, env)
        wait_serving(f"127.0.0.1:{orch_port}", timeout=60)
        yield f"127.0.0.1:{orch_port}"
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def real_mesh(tmp_path_factory):
    """Every real service (embedded models) as its own process on free loopback ports."""
    from voicemesh.launcher import Mesh, free_ports

    mesh = Mesh(ports=free_ports(), log_dir=tmp_path_factory.mktemp("real-mesh"), ready_timeout=300)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()
