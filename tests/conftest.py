"""Shared fixtures: real processes on free loopback ports, always cleaned up."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from voicemesh.cli.mesh import stop_process, wait_for_port, wait_serving  # noqa: F401 - re-exported to the tests

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
START_S = 180.0  # deadline for a process we start to listen / report SERVING (a loaded machine is slow)
# pytest-timeout's limit (pyproject: 300 s) covers fixture setup too, so the test that first
# uses the session's mesh also pays for loading every model; on a 2-core machine with one core
# busy that alone can take minutes. A hang guard, not a speed claim: these tests get longer.
MODEL_TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        heavy = item.get_closest_marker("models") or item.get_closest_marker("e2e") or "real_mesh" in item.fixturenames
        if heavy and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(MODEL_TEST_TIMEOUT_S))


def utterances(name: str, before_ms: int = 500, after_ms: int = 1000) -> list:
    """A spoken fixture cut into its utterances (tests/fixtures/fixtures.json), 16 kHz int16,
    each with up to `before_ms` of the file before it and `after_ms` after it: for tests that
    say the next thing only once the bot has reacted, instead of trusting the file's pauses."""
    import json

    from voicemesh.client.wavio import load_for_sending

    samples = load_for_sending(FIXTURES / name)
    spans = json.loads((FIXTURES / "fixtures.json").read_text())[name]
    parts, begin = [], 0
    for index, span in enumerate(spans):
        begin = max(begin, span["start_ms"] - before_ms)
        end = span["end_ms"] + after_ms
        if index + 1 < len(spans):
            end = min(end, spans[index + 1]["start_ms"] - before_ms)
        parts.append(samples[begin * 16 : end * 16])  # 16 samples per ms
        begin = end
    return parts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        args = [sys.executable, "-m", "voicemesh.runtime.serve", kind, "--host", "127.0.0.1", "--port", str(port), *extra]
        return self.start(kind, args, env)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)


def start_fake_mesh(procs: Processes, transcripts: str) -> tuple[str, str]:
    """The real orchestrator in front of the scripted fakes (tests/fakes/scripted.py, one
    process, FAKE_TRANSCRIPTS=transcripts). Returns the (orchestrator, fakes) addresses."""
    fake_port, orch_port = free_port(), free_port()
    fakes = procs.start("fakes", [sys.executable, "-m", "tests.fakes.scripted", "--port", str(fake_port)],
                        env={"FAKE_TRANSCRIPTS": transcripts})
    wait_for_port(fake_port, fakes, timeout=START_S)
    fake_addr = f"127.0.0.1:{fake_port}"
    env = {f"VOICEMESH_{kind}_ADDR": fake_addr for kind in ("VAD", "STT", "LLM", "TTS")}
    orchestrator = procs.serve("orchestrator", orch_port, env)
    wait_serving(f"127.0.0.1:{orch_port}", orchestrator, timeout=START_S)
    return f"127.0.0.1:{orch_port}", fake_addr


@pytest.fixture(scope="module")
def fake_mesh(tmp_path_factory):
    """The real orchestrator in front of the scripted fake services (one separate process)."""
    procs = Processes(tmp_path_factory.mktemp("fake-mesh"))
    try:
        yield start_fake_mesh(procs, os.environ.get("FAKE_TRANSCRIPTS", ""))[0]
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def real_mesh(tmp_path_factory):
    """Every real service (embedded models) as its own process on free loopback ports."""
    from voicemesh.cli.mesh import Mesh, free_ports

    mesh = Mesh(ports=free_ports(), log_dir=tmp_path_factory.mktemp("real-mesh"), ready_timeout=300)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()
