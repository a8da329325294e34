"""`voicemesh up` with every service on mTLS (a CA made here): its health probes speak TLS with
the hop's client settings, so it comes up with every port on mTLS; mTLS required without
a client certificate stops it before anything starts, saying which setting is missing."""
from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support import NO_SMART_TURN
from test_supervisor import SERVICES, Up
from test_tls import Authority

FAKES = {f"VOICEMESH_{kind.upper()}_PROVIDER": "fake" for kind in ("vad", "stt", "llm", "tts")}


def _tls_env(ca: Authority, server: tuple[str, str], client: tuple[str, str], with_client_cert: bool = True) -> dict:
    env = {"VOICEMESH_TLS_CERT_FILE": server[0], "VOICEMESH_TLS_KEY_FILE": server[1],
           "VOICEMESH_TLS_CLIENT_CA_FILE": str(ca.ca_file),
           "VOICEMESH_BACKEND_TLS_CA_FILE": str(ca.ca_file), "VOICEMESH_BACKEND_TLS_CERT_FILE": client[0],
           "VOICEMESH_BACKEND_TLS_KEY_FILE": client[1], "VOICEMESH_CLIENT_TLS_CA_FILE": str(ca.ca_file)}
    if with_client_cert:
        env |= {"VOICEMESH_CLIENT_TLS_CERT_FILE": client[0], "VOICEMESH_CLIENT_TLS_KEY_FILE": client[1]}
    return {**FAKES, **NO_SMART_TURN, **env}


def test_up_probes_tls_services_over_tls(tmp_path):
    ca = Authority(tmp_path, "voicemesh")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    up = Up(tmp_path, env=_tls_env(ca, server, client))
    try:
        up.wait_printed()
        assert "the orchestrator serves TLS" in up.out.read_text(), up.output()
        from voicemesh.client.channel import tls_credentials

        credentials = tls_credentials(str(ca.ca_file), *client)
        for kind in SERVICES:  # every port is TLS: a client certificate from this CA is needed
            with grpc.secure_channel(f"127.0.0.1:{up.ports[kind]}", credentials) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, kind
            with grpc.insecure_channel(f"127.0.0.1:{up.ports[kind]}") as channel, pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, kind
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=60) == 0, up.output()
    finally:
        up.cleanup()


def test_up_refuses_mtls_without_a_client_certificate(tmp_path):
    ca = Authority(tmp_path, "voicemesh")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    up = Up(tmp_path, env=_tls_env(ca, server, client, with_client_cert=False))
    try:
        assert up.proc.wait(timeout=60) == 1, up.output()
    finally:
        up.cleanup()
    err = up.err.read_text()
    assert "requires client certificates (tls_client_ca_file), but VOICEMESH_CLIENT_TLS_CERT_FILE" in err, err
    assert "starting" not in err, err  # refused before any service started
