"""The fuzz mesh: the real services with `--provider fake` and the real orchestrator, one per
module, and the healthy session that runs on it for the whole module."""
from __future__ import annotations

import os

import pytest

from fuzz.harness import FuzzMesh, HealthySession

REPORT_ENV = "VOICEMESH_FUZZ_REPORT"  # where run.py wants the counts and findings (JSON)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    mesh = FuzzMesh(tmp_path_factory.mktemp("fuzz-logs"), tmp_path_factory.mktemp("fuzz-recordings"))
    try:
        mesh.healthy = HealthySession(mesh.mesh.orchestrator_address).start()
        mesh.save = lambda: os.environ.get(REPORT_ENV) and mesh.write_report(os.environ[REPORT_ENV], mesh.healthy.state())
        yield mesh
    finally:
        healthy = mesh.healthy.finish() if hasattr(mesh, "healthy") else {}
        if os.environ.get(REPORT_ENV):
            mesh.write_report(os.environ[REPORT_ENV], healthy)
        mesh.close()
