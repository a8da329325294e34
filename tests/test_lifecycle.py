"""The shared runtime's lifecycle, on real service processes: health while loading, and drain."""
from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import Processes, free_port, wait_for_port, wait_serving
from voicemesh.v1 import common_pb2, vad_pb2, vad_pb2_grpc

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


@pytest.mark.models
def test_not_serving_until_the_model_is_loaded(tmp_path):
    procs = Processes(tmp_path)
    try:
        port = free_port()
        # A slow provider load is simulated by the real LLM: llama.cpp takes about a second.
        proc = procs.serve("llm", port)
        wait_for_port(port, proc)
        first = _health(f"127.0.0.1:{port}", "voicemesh.v1.LlmService")
        wait_serving(f"127.0.0.1:{port}")
        assert first == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(f"127.0.0.1:{port}", "voicemesh.v1.LlmService") == health_pb2.HealthCheckResponse.SERVING
    finally:
        procs.stop_all()


def test_sigterm_refuses_new_streams_and_lets_open_ones_finish(tmp_path):
    procs = Processes(tmp_path)
    try:
        port = free_port()
        proc = procs.serve("vad", port, extra=["--grace-seconds", "20"])
        address = f"127.0.0.1:{port}"
        wait_serving(address, timeout=60)
        channel = grpc.insecure_channel(address)
        stub = vad_pb2_grpc.VadServiceStub(channel)
        sent = []

        def requests():
            yield vad_pb2.DetectRequest(config=vad_pb2.VadConfig(format=PCM16_16K))
            for index in range(30):  # 3 s of audio, paced, so the stream is open across the SIGTERM
                sent.append(index)
                if index == 5:
                    proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
                yield vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=b"\x00\x00" * 1600))

        open_stream = stub.Detect(requests(), timeout=30)
        while len(sent) < 10:  # the SIGTERM has been sent and handled by now
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Detect(iter([vad_pb2.DetectRequest(config=vad_pb2.VadConfig(format=PCM16_16K))]), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(open_stream) == []  # silence: no speech events, and the stream ended cleanly (OK)
        assert len(sent) == 30
        assert proc.wait(timeout=20) == 0
        channel.close()
    finally:
        procs.stop_all()
