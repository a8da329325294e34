"""Secrets never leak, and what was said stays out of telemetry unless asked for.

The fake mesh and a transport run sessions with an API key on the orchestrator, keys on the
transport's callers, the transport's own key, a Twilio auth token and cloud credentials in every
process's environment, and a recognisable transcript (the fake STT's script, echoed by the fake
LLM and spoken by the fake TTS), exporting traces and metrics to a real OTLP receiver. Then every
log line of every process, every exported span and metric (the raw OTLP requests, so no field is
missed) and every Info answer is searched. Run twice: VOICEMESH_TRACE_CONTENT=false (no transcript
anywhere) and true (the transcript is in the spans: the search does find what is there).
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otlp_receiver import attributes
from test_auth import converse_once
from support import ConverseProbe, Processes, event_is, fake_mesh, silence, tone
from transport_harness import WsClient, send_paced, split, start_transport, ws_session
from voicemesh.runtime.audio import pcm16_to_mulaw
from voicemesh.runtime.auth import digest
from voicemesh.runtime.fakes import FakeScript
from voicemesh.transport.callers import twilio_signature
from voicemesh.v1 import (
    llm_pb2, llm_pb2_grpc, orchestrator_pb2 as pb, orchestrator_pb2_grpc, stt_pb2, stt_pb2_grpc, transport_pb2,
    transport_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc,
)

API_KEY = "leakcheck-api-key-Q7wV3xZ"
CALLER_KEY = "leakcheck-caller-key-M4nB8"
WRONG_KEY = "leakcheck-wrong-key-P0oL9"  # presented and refused: must not be logged either
CLOUD = {"DEEPGRAM_API_KEY": "leakcheck-deepgram-K2jH6", "OPENAI_API_KEY": "sk-leakcheck-openai-T5rE1",
         "ELEVENLABS_API_KEY": "leakcheck-eleven-Y8uI3", "AWS_SECRET_ACCESS_KEY": "leakcheck-aws-G6fD2"}
TWILIO_TOKEN = "leakcheck-twilio-token-S3aW5"
SECRETS = (API_KEY, CALLER_KEY, WRONG_KEY, TWILIO_TOKEN, *CLOUD.values())
TRANSCRIPT = "the vault code is ultramarine pelican"
MARKER = "ultramarine pelican"  # the recognisable words, in every form the text takes (transcript, reply, speech)


class RawReceiver:
    """An OTLP/gRPC receiver that keeps each export request's raw bytes: a search of the bytes
    misses no attribute, resource, event or metric label."""

    def __init__(self):
        self.traces: list[bytes] = []
        self.metrics: list[bytes] = []
        self.changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        for service, store in (("trace.v1.TraceService", self.traces), ("metrics.v1.MetricsService", self.metrics)):
            self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                f"opentelemetry.proto.collector.{service}", {"Export": grpc.unary_unary_rpc_method_handler(self._keep(store))})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _keep(self, store: list[bytes]):
        def export(request: bytes, context) -> bytes:
            with self.changed:
                store.append(request)
                self.changed.notify_all()
            return b""  # an empty Export*ServiceResponse

        return export

    def spans(self) -> list:
        with self.changed:
            raw = list(self.traces)
        return [span for request in raw for rs in trace_service_pb2.ExportTraceServiceRequest.FromString(request).resource_spans
                for ss in rs.scope_spans for span in ss.spans]

    def wait_conversations(self, count: int, timeout: float) -> list[str]:
        """Until `count` conversation spans are in; returns the span names seen, for the failure message."""
        deadline = time.monotonic() + timeout
        while True:
            names = [span.name for span in self.spans()]
            if names.count("conversation") >= count or time.monotonic() > deadline:
                return names
            with self.changed:
                self.changed.wait(max(0.01, min(1.0, deadline - time.monotonic())))

    def env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}


@dataclass
class Run:
    logs: dict[str, str]  # file name -> content, every process
    traces: list[bytes]
    metrics: list[bytes]
    infos: dict[str, bytes] = field(default_factory=dict)  # service -> Info answer (serialized and as text)
    span_texts: list[str] = field(default_factory=list)  # every string attribute of every span


def _speech(rate: int) -> np.ndarray:
    return np.concatenate((silence(0.3, rate), tone(0.6, rate), silence(1.2, rate)))


async def _sessions(orchestrator: str, transport, addresses: dict[str, str]) -> dict[str, bytes]:
    """A voice session on the orchestrator, a refused one, a Twilio call through the transport,
    refused callers; then every service's Info answer."""
    async with ConverseProbe(orchestrator, metadata=(("authorization", f"Bearer {API_KEY}"),)) as probe:
        await probe.speak_until(_speech(16000), event_is("turn_ended", turn_number=1))
        await probe.end()
        await probe.wait_for(lambda e: e.HasField("session_ended"))
    assert any(MARKER in t.text for t in probe.of("user_transcript")), probe.kinds()  # the script was heard
    code, _, _ = await converse_once(orchestrator, (("authorization", f"Bearer {WRONG_KEY}"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    async with ws_session(transport.ws_url + f"/ws?token={WRONG_KEY}") as browser:
        assert (await browser.wait_closed())[0] == 1008

    url = transport.ws_url + "/twilio"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, headers={"X-Twilio-Signature": twilio_signature(TWILIO_TOKEN, url)})
        call = WsClient(ws)
        reader = asyncio.create_task(call.read())
        await ws.send_str(json.dumps({"event": "start", "streamSid": "MZleak", "start": {
            "streamSid": "MZleak", "callSid": "CAleak", "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                                        "channels": 1}}}))
        frames = split(pcm16_to_mulaw(_speech(8000)), 160)
        await send_paced(ws.send_str, [json.dumps({"event": "media", "streamSid": "MZleak", "media": {
            "track": "inbound", "payload": base64.b64encode(f).decode()}}) for f in frames])
        await call.wait_for(lambda e: e.get("event") == "mark")  # the reply was spoken to the end
        await ws.send_str(json.dumps({"event": "stop", "streamSid": "MZleak"}))
        await call.wait_closed()
        await ws.close()
        reader.cancel()

    infos: dict[str, bytes] = {}
    calls = {"vad": (vad_pb2_grpc.VadServiceStub, vad_pb2.VadServiceInfoRequest),
             "stt": (stt_pb2_grpc.SttServiceStub, stt_pb2.SttServiceInfoRequest),
             "llm": (llm_pb2_grpc.LlmServiceStub, llm_pb2.LlmServiceInfoRequest),
             "tts": (tts_pb2_grpc.TtsServiceStub, tts_pb2.TtsServiceInfoRequest),
             "orchestrator": (orchestrator_pb2_grpc.OrchestratorServiceStub, pb.OrchestratorServiceInfoRequest),
             "transport": (transport_pb2_grpc.TransportServiceStub, transport_pb2.TransportServiceInfoRequest)}
    for kind, (stub, request) in calls.items():
        async with grpc.aio.insecure_channel(addresses[kind]) as channel:
            answer = await stub(channel).Info(request(), metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=30)
        infos[kind] = answer.SerializeToString() + str(answer).encode()
    return infos


def _run(base: Path, content: bool) -> Run:
    keys = base / "keys"
    keys.write_text(digest(API_KEY) + "\n")
    (base / "caller-keys").write_text(digest(CALLER_KEY) + "\n")
    (base / "transport-key").write_text(API_KEY + "\n")
    receiver = RawReceiver()
    env = {**receiver.env(), **CLOUD, "VOICEMESH_TRACE_CONTENT": "true" if content else "false",
           "VOICEMESH_LOG_LEVEL": "DEBUG", "VOICEMESH_ORCHESTRATOR_API_KEYS_FILE": str(keys)}
    procs = Processes(base)
    try:
        mesh = fake_mesh(procs, FakeScript(transcripts=(TRANSCRIPT, TRANSCRIPT)), env=env)
        transport = start_transport(procs, mesh.orchestrator_address, env={
            **env, "VOICEMESH_TRANSPORT_API_KEYS_FILE": str(base / "caller-keys"), "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "VOICEMESH_TRANSPORT_ORCHESTRATOR_KEY_FILE": str(base / "transport-key")})
        addresses = {kind: mesh.address(kind) for kind in ("vad", "stt", "llm", "tts", "orchestrator")}
        infos = asyncio.run(_sessions(mesh.orchestrator_address, transport, {**addresses, "transport": transport.grpc_address}))
        names = receiver.wait_conversations(2, timeout=60)
        assert names.count("conversation") >= 2, f"conversation spans missing; spans received: {sorted(set(names))}"
    finally:
        procs.stop_all()  # SIGTERM: each process flushes its spans and metrics before it exits
        receiver.server.stop(grace=1).wait()
    logs = {str(path.relative_to(base)): path.read_text(errors="replace") for path in sorted(base.rglob("*.log"))}
    texts = [str(value) for span in receiver.spans() for value in attributes(span.attributes).values()]
    return Run(logs, list(receiver.traces), list(receiver.metrics), infos, texts)


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory) -> Run:
    return _run(tmp_path_factory.mktemp("leaks-quiet"), content=False)


@pytest.fixture(scope="module")
def content_run(tmp_path_factory) -> Run:
    return _run(tmp_path_factory.mktemp("leaks-content"), content=True)


def _where(run: Run, needle: str, logs: bool = True, infos: bool = True) -> list[str]:
    """Every place `needle` appears: log files (with the line), span and metric exports, Info answers."""
    found = []
    if logs:
        for name, text in run.logs.items():
            found += [f"{name}: {line[:200]}" for line in text.splitlines() if needle in line]
    found += [f"span export #{i}" for i, raw in enumerate(run.traces) if needle.encode() in raw]
    found += [f"metric export #{i}" for i, raw in enumerate(run.metrics) if needle.encode() in raw]
    if infos:
        found += [f"{kind} Info" for kind, raw in run.infos.items() if needle.encode() in raw]
    return found


def _searched(run: Run) -> str:
    """What was searched, printed for the reliability table; asserted non-empty so no search is vacuous."""
    lines = sum(text.count("\n") for text in run.logs.values())
    assert run.traces and run.metrics and lines and len(run.infos) == 6, (len(run.traces), len(run.metrics), lines)
    assert any("session started" in text for text in run.logs.values())
    return (f"{lines} log lines in {len(run.logs)} files, {len(run.span_texts)} span attributes in {len(run.traces)} "
            f"span exports, {len(run.metrics)} metric exports, {len(run.infos)} Info answers")


@pytest.mark.parametrize("which", ["quiet", "content"])
def test_no_key_or_credential_anywhere(which, request):
    run = request.getfixturevalue(f"{which}_run")
    print(f"searched ({which}): {_searched(run)} for {len(SECRETS)} secrets")
    leaks = {secret: places for secret in SECRETS if (places := _where(run, secret))}
    assert not leaks, leaks


def test_no_transcript_anywhere_without_trace_content(quiet_run):
    print(f"searched: {_searched(quiet_run)} for the transcript")
    assert not _where(quiet_run, MARKER, infos=False), _where(quiet_run, MARKER, infos=False)


def test_transcript_is_in_spans_with_trace_content(content_run):
    """The same search finds the transcript when content tracing is on: the check above can fail."""
    assert _where(content_run, MARKER, logs=False, infos=False)
    assert any(MARKER in text for text in content_run.span_texts)
