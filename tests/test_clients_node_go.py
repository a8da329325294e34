"""The Node and Go clients' own suites (clients/node/test, clients/go/client_test.go) against the
real orchestrator with the fake services behind it: a spoken turn, a typed turn, a tool call
answered by the client, barge-in with ClearPlayback, a bad config and the `talk` example.

Each suite runs as a subprocess with VOICEMESH_ORCHESTRATOR_ADDR set; its exit status decides
and its output is shown on failure. `make clients` builds both (clients/clients.mk). A missing
toolchain or build skips here, and fails under CI=true."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support import ROOT

NODE_DIR = ROOT / "clients" / "node"
GO_DIR = ROOT / "clients" / "go"
GO_GOPATH = GO_DIR / ".gopath"
GO_PKG_DIR = GO_GOPATH / "src" / "voicemesh.dev" / "client"
SUITE_TIMEOUT_S = 600  # a hang guard; the suites take seconds (the Go one compiles first)


def _missing(what: str) -> None:
    message = f"{what}; run `make clients`"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: a missing client toolchain or build fails)")
    pytest.skip(message)


def _run_suite(args: list[str], cwd: Path, env: dict[str, str], name: str) -> None:
    """Run a suite in its own process group; on a timeout or any failure stop it by its pid."""
    env = {**os.environ, **env}
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=SUITE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name} still running after {SUITE_TIMEOUT_S} s; output:\n{output}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"{name}: exit {proc.returncode} in {time.monotonic() - started:.1f} s\n{output}")
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{output}"


@pytest.mark.timeout(SUITE_TIMEOUT_S + 60)
def test_node_client_suite(fake_mesh):
    if shutil.which("node") is None:
        _missing("node is not installed")
    if not (NODE_DIR / "node_modules").is_dir() or not (NODE_DIR / "proto").is_dir():
        _missing("the Node client is not built (clients/node/node_modules, proto/)")
    _run_suite(["node", "--test", "test/converse.test.js"], NODE_DIR,
               {"VOICEMESH_ORCHESTRATOR_ADDR": fake_mesh}, "node --test")


@pytest.mark.timeout(SUITE_TIMEOUT_S + 60)
def test_go_client_suite(fake_mesh):
    if shutil.which("go") is None:
        _missing("go is not installed")
    if not (GO_DIR / "voicemeshv1" / "orchestrator.pb.go").is_file() or not GO_PKG_DIR.exists():
        _missing("the Go client is not generated (clients/go/voicemeshv1)")
    env = {
        "VOICEMESH_ORCHESTRATOR_ADDR": fake_mesh,
        "GO111MODULE": "off", "GOFLAGS": "", "GOPROXY": "off",
        "GOPATH": f"{GO_GOPATH}:/usr/share/gocode", "GOCACHE": str(GO_GOPATH / "cache"),
        "PWD": str(GO_PKG_DIR),  # the go tool takes the package's import path from $PWD
    }
    _run_suite(["go", "test", "-count=1", "-v", "."], GO_PKG_DIR, env, "go test")
