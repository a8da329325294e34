"""Shared fixtures: real processes on free loopback ports, always cleaned up."""
from __future__ import annotations

import os

import pytest

# The helpers (ports, processes, the fake mesh, the Converse probe, tones) live in tests/support.py,
# which the bench shares; ROOT is re-exported for the tests that take it from here.
from support import ROOT, Processes, start_fake_mesh

FIXTURES = ROOT / "tests" / "fixtures"
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


@pytest.fixture(scope="module")
def fake_mesh(tmp_path_factory):
    """The real orchestrator in front of the real services with their fake providers (tests/support.py),
    the STT's finals scripted by VOICEMESH_FAKE_TRANSCRIPTS (comma-separated) if set."""
    procs = Processes(tmp_path_factory.mktemp("fake-mesh"))
    try:
        yield start_fake_mesh(procs, os.environ.get("VOICEMESH_FAKE_TRANSCRIPTS", ""))[0]
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
