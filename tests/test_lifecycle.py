"""The shared runtime's lifecycle, on real service processes: health while loading, and drain."""
from __future__ import annotations

import itertools
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support import Processes, free_port, wait_for_port, wait_serving
from voicemesh.v1 import common_pb2, vad_pb2, vad_pb2_grpc

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)


DEADLINE_S = 120  # for a state the service must reach (it takes far less idle); never a speed claim


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


@pytest.mark.models
def test_not_serving_until_the_model_is_loaded(tmp_path):
    procs = Processes(tmp_path)
    try:
        port = free_port()
        # A slow provider load is simulated by the real LLM: llama.cpp takes about a second.
        proc = procs.serve("llm", port)
        wait_for_port(port, proc, timeout=DEADLINE_S)
        first = _health(f"127.0.0.1:{port}", "voicemesh.v1.LlmService")
        wait_serving(f"127.0.0.1:{port}", proc, timeout=DEADLINE_S)
        assert first == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(f"127.0.0.1:{port}", "voicemesh.v1.LlmService") == health_pb2.HealthCheckResponse.SERVING
    finally:
        procs.stop_all()


def _new_stream_status(stub) -> grpc.StatusCode:
    """Open a Detect stream, send the config, close it: OK while serving, else the refusal."""
    try:
        list(stub.Detect(iter([vad_pb2.DetectRequest(config=vad_pb2.VadConfig(format=PCM16_16K))]), timeout=30))
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_sigterm_refuses_new_streams_and_lets_open_ones_finish(tmp_path):
    procs = Processes(tmp_path)
    try:
        port = free_port()
        proc = procs.serve("vad", port, extra=["--grace-seconds", str(DEADLINE_S)])
        address = f"127.0.0.1:{port}"
        wait_serving(address, proc, timeout=DEADLINE_S)
        channel = grpc.insecure_channel(address)
        stub = vad_pb2_grpc.VadServiceStub(channel)
        refused = threading.Event()  # set once a new stream has been refused
        after_refusal = []  # chunks the open stream sent after that

        def requests():
            """0.1 s of silence every 0.1 s (paced like a microphone): SIGTERM after the fifth,
            on until a new stream has been refused, then five more, then the stream ends."""
            yield vad_pb2.DetectRequest(config=vad_pb2.VadConfig(format=PCM16_16K))
            deadline = time.monotonic() + DEADLINE_S  # never hang: the main thread reports the failure
            for index in itertools.count():
                if index == 5:
                    proc.send_signal(signal.SIGTERM)
                if len(after_refusal) == 5 or time.monotonic() > deadline:
                    return
                time.sleep(0.1)
                if refused.is_set():
                    after_refusal.append(index)
                yield vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=b"\x00\x00" * 1600))

        open_stream = stub.Detect(requests(), timeout=3 * DEADLINE_S)
        # Wait for the drain itself: new streams are accepted until the service has handled
        # the SIGTERM, however long that takes here, then refused.
        deadline = time.monotonic() + DEADLINE_S
        statuses = []
        while (status := _new_stream_status(stub)) == grpc.StatusCode.OK:
            statuses.append(status)
            assert proc.poll() is None, f"the service exited ({proc.returncode}) with a stream still open"
            assert time.monotonic() < deadline, f"new streams still accepted {DEADLINE_S} s on ({len(statuses)} tries)"
            time.sleep(0.05)
        refused.set()
        assert status == grpc.StatusCode.UNAVAILABLE
        assert list(open_stream) == []  # silence: no speech events, and the stream ended cleanly (OK)
        assert len(after_refusal) == 5  # the open stream was served to its end, after the refusal
        assert proc.wait(timeout=DEADLINE_S) == 0
        channel.close()
    finally:
        procs.stop_all()
