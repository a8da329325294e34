"""The Node and Go clients' own suites (clients/node/test, clients/go/client_test.go) against the
real orchestrator with the fake services behind it: a spoken turn, a typed turn, a tool call
answered by the client, barge-in with ClearPlayback, a bad config and the `talk` example.
Then each client's `talk` example, configured by the environment alone (VOICEMESH_API_KEY /
_FILE, VOICEMESH_CLIENT_TLS_*), against an orchestrator that requires an API key and one that
serves mTLS with a CA made here: refused without the credential, a full turn with it.

Each suite runs as a subprocess with VOICEMESH_ORCHESTRATOR_ADDR set; its exit status decides
and its output is shown on failure. `make clients` builds both (clients/clients.mk). A missing
toolchain or build skips here, and fails under CI=true."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import support
from support import BACKENDS, ROOT, START_S, Processes, backend_env, free_port, wait_serving
from test_tls import SERVER_NAME, Authority
from voicemesh.runtime.auth import MISSING, WRONG, digest
from voicemesh.runtime.fakes import FakeScript

NODE_DIR = ROOT / "clients" / "node"
GO_DIR = ROOT / "clients" / "go"
GO_GOPATH = GO_DIR / ".gopath"
GO_PKG_DIR = GO_GOPATH / "src" / "voicemesh.dev" / "client"
SUITE_TIMEOUT_S = 600  # a hang guard; the suites take seconds (the Go one compiles first)
TALK_TIMEOUT_S = 180  # a hang guard for one `talk` run (a few seconds of audio in real time)
API_KEY = "node-and-go-key"
GO_ENV = {"GO111MODULE": "off", "GOFLAGS": "", "GOPROXY": "off", "GOPATH": f"{GO_GOPATH}:/usr/share/gocode",
          "GOCACHE": str(GO_GOPATH / "cache"),
          "PWD": str(GO_PKG_DIR)}  # the go tool takes the package's import path from $PWD


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
    _run_suite(["go", "test", "-count=1", "-v", "."], GO_PKG_DIR, {"VOICEMESH_ORCHESTRATOR_ADDR": fake_mesh, **GO_ENV},
               "go test")


# -- API keys and TLS, through each client's `talk` example ------------------------------------------

@dataclass
class SecuredMesh:
    keyed: str  # plaintext, requires API_KEY
    mtls: str  # TLS with the server certificate; a client certificate signed by `ca` required
    ca: Authority
    client_cert: tuple[str, str]
    wrong_key_file: Path
    question: Path  # a WAV: a tone the fake VAD takes for speech


def _write_question(path: Path) -> Path:
    samples = np.concatenate([support.silence(0.3), support.tone(1.0), support.silence(0.5)])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(samples.astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def secured_mesh(tmp_path_factory):
    """The fake backends (plaintext), and two orchestrators in front of them: one that requires
    API_KEY, one that serves mTLS (its health alone on a plaintext port, to know it is up)."""
    base = tmp_path_factory.mktemp("secured")
    ca = Authority(base, "voicemesh")
    server_cert, client_cert = ca.issue("server", server=True), ca.issue("client", server=False)
    keys = base / "api-keys"
    keys.write_text(digest(API_KEY) + "\n")
    (base / "wrong-key").write_text("not-the-key\n")
    procs = Processes(base)
    try:
        backends = support.fake_mesh(procs, FakeScript(), services=BACKENDS)
        keyed_port, mtls_port, health_port = free_port(), free_port(), free_port()
        keyed = procs.serve("orchestrator", keyed_port, {**backend_env(backends),
                                                         "VOICEMESH_ORCHESTRATOR_API_KEYS_FILE": str(keys)},
                            name="orchestrator-keyed")
        mtls = procs.serve("orchestrator", mtls_port, {
            **backend_env(backends), "VOICEMESH_ORCHESTRATOR_TLS_CERT_FILE": server_cert[0],
            "VOICEMESH_ORCHESTRATOR_TLS_KEY_FILE": server_cert[1], "VOICEMESH_ORCHESTRATOR_TLS_CLIENT_CA_FILE": str(ca.ca_file),
            "VOICEMESH_ORCHESTRATOR_HEALTH_PORT": str(health_port)}, name="orchestrator-mtls")
        wait_serving(f"127.0.0.1:{keyed_port}", keyed, timeout=START_S)
        wait_serving(f"127.0.0.1:{health_port}", mtls, timeout=START_S)
        yield SecuredMesh(f"127.0.0.1:{keyed_port}", f"127.0.0.1:{mtls_port}", ca, client_cert, base / "wrong-key",
                          _write_question(base / "question.wav"))
    finally:
        procs.stop_all()


@pytest.fixture(scope="module", params=["node", "go"])
def talk(request, tmp_path_factory):
    """Runs one client's `talk` example on a WAV: (exit status, stdout, stderr). Its only
    settings are the address and `env` (the outer environment's credentials are dropped)."""
    if request.param == "node":
        if shutil.which("node") is None:
            _missing("node is not installed")
        if not (NODE_DIR / "node_modules").is_dir() or not (NODE_DIR / "proto").is_dir():
            _missing("the Node client is not built (clients/node/node_modules, proto/)")
        command, wait_after = ["node", str(NODE_DIR / "examples" / "talk.js")], "30"
    else:
        if shutil.which("go") is None:
            _missing("go is not installed")
        if not (GO_DIR / "voicemeshv1" / "orchestrator.pb.go").is_file() or not GO_PKG_DIR.exists():
            _missing("the Go client is not generated (clients/go/voicemeshv1)")
        binary = tmp_path_factory.mktemp("go-talk") / "talk"
        built = subprocess.run(["go", "build", "-o", str(binary), "./cmd/talk"], cwd=GO_PKG_DIR, env={**os.environ, **GO_ENV},
                               capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)
        assert built.returncode == 0, f"go build ./cmd/talk failed:\n{built.stdout}{built.stderr}"
        command, wait_after = [str(binary)], "30s"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEMESH_API_KEY", "VOICEMESH_CLIENT_TLS_"))}

    def run(addr: str, wav: Path, env: dict[str, str]) -> tuple[int, str, str]:
        args = [*command, "-json" if request.param == "go" else "--json", "--addr", addr,
                "--wait-after", wait_after, str(wav)]
        proc = subprocess.run(args, env={**clean, **env}, capture_output=True, text=True, timeout=TALK_TIMEOUT_S)
        return proc.returncode, proc.stdout, proc.stderr

    return run


def _assert_full_turn(code: int, out: str, err: str) -> None:
    assert code == 0, f"talk failed (exit {code}):\n{out}\n{err}"
    result = json.loads(out)
    assert len(result["turns"]) == 1, out
    turn = result["turns"][0]
    assert turn["user_transcript"], out
    assert turn["bot_text"] == f"You said: {turn['user_transcript']}.", out
    assert turn["reason"] == "ANSWERED", out
    assert result["audio_seconds"] > 0, out


def _assert_refused(code: int, out: str, err: str, status: str, message: str) -> None:
    assert code == 1, f"expected a refusal (exit 1), got exit {code}:\n{out}\n{err}"
    assert not out.strip(), f"a refused talk printed a result:\n{out}"
    assert status in err.lower() and message in err, f"expected {status}: {message!r}; stderr:\n{err}"


@pytest.mark.timeout(SUITE_TIMEOUT_S)
def test_talk_without_an_api_key_is_unauthenticated(secured_mesh, talk):
    _assert_refused(*talk(secured_mesh.keyed, secured_mesh.question, {}), "unauthenticated", MISSING)
    _assert_refused(*talk(secured_mesh.keyed, secured_mesh.question,
                          {"VOICEMESH_API_KEY_FILE": str(secured_mesh.wrong_key_file)}), "unauthenticated", WRONG)


@pytest.mark.timeout(SUITE_TIMEOUT_S)
def test_talk_with_the_api_key_has_a_full_turn(secured_mesh, talk):
    _assert_full_turn(*talk(secured_mesh.keyed, secured_mesh.question, {"VOICEMESH_API_KEY": API_KEY}))


def _tls_env(mesh: SecuredMesh, with_cert: bool) -> dict[str, str]:
    env = {"VOICEMESH_CLIENT_TLS_CA_FILE": str(mesh.ca.ca_file), "VOICEMESH_CLIENT_TLS_SERVER_NAME": SERVER_NAME}
    if with_cert:
        env |= {"VOICEMESH_CLIENT_TLS_CERT_FILE": mesh.client_cert[0], "VOICEMESH_CLIENT_TLS_KEY_FILE": mesh.client_cert[1]}
    return env


@pytest.mark.timeout(SUITE_TIMEOUT_S)
def test_talk_over_mtls_has_a_full_turn(secured_mesh, talk):
    """The CA made here, the client's certificate, and the server name the certificate holds
    (the address is an IP): the whole turn goes over mTLS."""
    _assert_full_turn(*talk(secured_mesh.mtls, secured_mesh.question, _tls_env(secured_mesh, with_cert=True)))


@pytest.mark.timeout(SUITE_TIMEOUT_S)
def test_talk_over_tls_without_a_client_certificate_is_refused(secured_mesh, talk):
    code, out, err = talk(secured_mesh.mtls, secured_mesh.question, _tls_env(secured_mesh, with_cert=False))
    _assert_refused(code, out, err, "unavailable", "with mTLS it needs a client certificate (VOICEMESH_CLIENT_TLS_CERT_FILE")
    code, out, err = talk(secured_mesh.mtls, secured_mesh.question, {})  # plaintext to a TLS port
    _assert_refused(code, out, err, "unavailable", "over plaintext: is it up there? If it serves TLS, set "
                    "VOICEMESH_CLIENT_TLS_CA_FILE")


@pytest.mark.timeout(SUITE_TIMEOUT_S)
def test_talk_names_unusable_credential_files(secured_mesh, talk, tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    code, out, err = talk(secured_mesh.mtls, secured_mesh.question, {"VOICEMESH_CLIENT_TLS_CA_FILE": str(missing)})
    assert code == 1 and f"cannot read the CA certificate {missing}" in err, err
    half_pair = {**_tls_env(secured_mesh, with_cert=False), "VOICEMESH_CLIENT_TLS_CERT_FILE": secured_mesh.client_cert[0]}
    code, out, err = talk(secured_mesh.mtls, secured_mesh.question, half_pair)
    assert code == 1 and "needs both its certificate and its key" in err, err
