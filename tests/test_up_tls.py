"""`voicemesh up` with every service on mTLS (a CA made here): its health probes speak TLS with
the hop's client settings, so it comes up with every port on mTLS; mTLS required without
a client certificate stops it before anything starts, saying which setting is missing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support import NO_SMART_TURN, ROOT, free_ports
from test_tls import Authority
from voicemesh.cli.mesh import ALL_SERVICES, TRANSPORT, stop_process

SERVICES = (*ALL_SERVICES, TRANSPORT)
UP_TIMEOUT = 180.0  # a liveness bound: six Python processes starting on a loaded machine
FAKES = {f"VOICEMESH_{kind.upper()}_PROVIDER": "fake" for kind in ("vad", "stt", "llm", "tts")}


def _tls_env(ca: Authority, server: tuple[str, str], client: tuple[str, str], with_client_cert: bool = True) -> dict:
    env = {"VOICEMESH_TLS_CERT_FILE": server[0], "VOICEMESH_TLS_KEY_FILE": server[1],
           "VOICEMESH_TLS_CLIENT_CA_FILE": str(ca.ca_file),
           "VOICEMESH_BACKEND_TLS_CA_FILE": str(ca.ca_file), "VOICEMESH_BACKEND_TLS_CERT_FILE": client[0],
           "VOICEMESH_BACKEND_TLS_KEY_FILE": client[1], "VOICEMESH_CLIENT_TLS_CA_FILE": str(ca.ca_file)}
    if with_client_cert:
        env |= {"VOICEMESH_CLIENT_TLS_CERT_FILE": client[0], "VOICEMESH_CLIENT_TLS_KEY_FILE": client[1]}
    return env


def _up(tmp_path, env: dict) -> tuple[subprocess.Popen, dict]:
    ports = free_ports((*SERVICES, "http"))
    flags = [f"--{'port' if kind == 'orchestrator' else kind + '-port'}={ports[kind]}" for kind in SERVICES]
    argv = [sys.executable, "-m", "voicemesh.cli", "up", *flags, f"--http-port={ports['http']}",
            f"--log-dir={tmp_path / 'logs'}"]
    clean = {k: v for k, v in os.environ.items() if "_TLS_" not in k}
    with open(tmp_path / "up.out", "wb") as out, open(tmp_path / "up.err", "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT,
                                env={**clean, **FAKES, **NO_SMART_TURN, "HF_HUB_OFFLINE": "1", **env})
    return proc, ports


def _output(tmp_path) -> str:
    return f"stdout:\n{(tmp_path / 'up.out').read_text()}\nstderr:\n{(tmp_path / 'up.err').read_text()[-3000:]}"


def test_up_probes_tls_services_over_tls(tmp_path):
    ca = Authority(tmp_path, "voicemesh")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    proc, ports = _up(tmp_path, _tls_env(ca, server, client))
    try:
        deadline = time.monotonic() + UP_TIMEOUT
        while "Ctrl-C stops the mesh." not in (tmp_path / "up.out").read_text():
            if proc.poll() is not None:
                pytest.fail(f"voicemesh up exited with {proc.returncode} before it was up\n{_output(tmp_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"voicemesh up not up within {UP_TIMEOUT:.0f} s\n{_output(tmp_path)}")
            time.sleep(0.2)  # polling a file the supervisor writes, against the deadline above
        assert "the orchestrator serves TLS" in (tmp_path / "up.out").read_text(), _output(tmp_path)
        from voicemesh.client.channel import tls_credentials

        credentials = tls_credentials(str(ca.ca_file), *client)
        for kind in SERVICES:  # every port is TLS: a client certificate from this CA is needed
            with grpc.secure_channel(f"127.0.0.1:{ports[kind]}", credentials) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, kind
            with grpc.insecure_channel(f"127.0.0.1:{ports[kind]}") as channel, pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, kind
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, _output(tmp_path)
    finally:
        stop_process(proc, timeout=60)  # SIGTERM: `up` stops its services as on Ctrl-C


def test_up_refuses_mtls_without_a_client_certificate(tmp_path):
    ca = Authority(tmp_path, "voicemesh")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    proc, _ = _up(tmp_path, _tls_env(ca, server, client, with_client_cert=False))
    try:
        assert proc.wait(timeout=60) == 1, _output(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp_path / "up.err").read_text()
    assert "requires client certificates (tls_client_ca_file), but VOICEMESH_CLIENT_TLS_CERT_FILE" in err, err
    assert "starting" not in err, err  # refused before any service started
