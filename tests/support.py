"""What tests and the bench share: free loopback ports, process supervision, the fake mesh (the
real services with `--provider fake`, see voicemesh.runtime.fakes), a Converse probe, and
tone and silence generators.

Processes: `voicemesh.cli.mesh` is the supervisor (parallel start, health SERVING, stop by
pid, a lifeline that stops the children if this process dies); `Processes` adds the single
processes a test starts by hand (an orchestrator, a transport) and stops them all on teardown.

The Converse probe waits on events, each with a deadline that fails with the events seen so
far. The default deadline is long (WAIT_S): a wait returns as soon as its event comes, so only
a failing test pays for it, and on a loaded machine things can take 5-10 times as long as on
an idle one.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from voicemesh.cli.mesh import BACKENDS, Mesh, free_ports, stop_process, wait_for_port, wait_serving  # noqa: F401 - for the tests
from voicemesh.runtime.fakes import RELEASE_METHOD, FakeScript
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
START_S = 180.0  # deadline for a process we start to listen / report SERVING (a loaded machine is slow)
# The fake VAD runs without Smart Turn, whether or not this machine has the model: its stop
# wait is then the segmenter's 0.8 s default, which the tests' utterances are cut for.
NO_SMART_TURN = {"VOICEMESH_SMART_TURN_MODEL": str(ROOT / "tests" / "smart-turn-off.onnx")}  # no such file


def free_port() -> int:
    return free_ports(("one",))["one"]


class Processes:
    """Processes (and meshes) started by one fixture; all stopped on teardown, by pid, even after
    failures: single processes first (they sit in front), then the meshes."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.procs: list[subprocess.Popen] = []
        self.meshes: list[Mesh] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
              capture: bool = False) -> subprocess.Popen:
        """`capture`: stdout is a pipe (for a command that prints its result), stderr the log."""
        log = open(self.log_dir / f"{name}.log", "wb")
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE if capture else log, stderr=log if capture else subprocess.STDOUT,
                                env=full_env, cwd=cwd)
        log.close()
        self.procs.append(proc)
        return proc

    def serve(self, kind: str, port: int, env: dict[str, str] | None = None, extra: list[str] = (),
              name: str | None = None) -> subprocess.Popen:
        args = [sys.executable, "-m", "voicemesh.runtime.serve", kind, "--host", "127.0.0.1", "--port", str(port), *extra]
        return self.start(name or kind, args, env)

    def serve_fake(self, kind: str, port: int, script: FakeScript, env: dict[str, str] | None = None,
                   name: str | None = None) -> subprocess.Popen:
        """One backend with its fake provider, in a process of its own (not yet SERVING)."""
        full_env = {**fake_env(script), **(env or {})}
        return self.serve(kind, port, full_env, ["--provider", "fake"], name=name or f"fake-{kind}")

    def start_mesh(self, mesh: Mesh) -> Mesh:
        self.meshes.append(mesh)
        return mesh.start()

    def stop(self, proc: subprocess.Popen, timeout: float = 15.0) -> None:
        stop_process(proc, timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()
        for mesh in reversed(self.meshes):
            mesh.stop()
        self.meshes.clear()


def fake_env(script: FakeScript) -> dict[str, str]:
    return {**script.to_env(), **NO_SMART_TURN}


def fake_mesh(procs: Processes, script: FakeScript, services=(*BACKENDS, "orchestrator"), env: dict[str, str] | None = None,
              name: str = "fake-mesh") -> Mesh:
    """The real services with their fake providers (in parallel), then the real orchestrator in
    front of them, each on a free loopback port; returns once every one is SERVING."""
    mesh = Mesh(ports=free_ports(services), env={**fake_env(script), **(env or {})}, services=services,
                log_dir=procs.log_dir / name, ready_timeout=START_S,
                extra_args={kind: ("--provider", "fake") for kind in BACKENDS})
    return procs.start_mesh(mesh)


def backend_env(mesh: Mesh) -> dict[str, str]:
    """The environment that points an orchestrator at a mesh's backends."""
    return {f"VOICEMESH_{kind.upper()}_ADDR": mesh.address(kind) for kind in BACKENDS if kind in mesh.children}


def start_fake_mesh(procs: Processes, transcripts: str = "", env: dict[str, str] | None = None) -> tuple[str, str]:
    """The real orchestrator in front of the fake services, the STT's finals scripted by
    `transcripts` (comma-separated). Returns the (orchestrator, STT) addresses: the STT's is
    where `release_finals` goes."""
    script = FakeScript(transcripts=tuple(t for t in transcripts.split(",") if t))
    mesh = fake_mesh(procs, script, env=env)
    return mesh.orchestrator_address, mesh.address("stt")


def release_finals(stt_address: str, session_id: str) -> None:
    """Let the held finals of a "hold-" session go (the fake STT's control RPC)."""
    with grpc.insecure_channel(stt_address) as channel:
        channel.unary_unary(RELEASE_METHOD)(session_id.encode(), timeout=30)


PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
WAIT_S = 60.0  # default deadline of a wait; a liveness bound, never a speed claim


def tone(seconds: float, rate: int = 16000, amplitude: int = 8000, hz: float = 220.0) -> np.ndarray:
    """A sine tone, int16: loud enough to be speech to the fakes (and to Silero's energy gate)."""
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.int16)


class ConverseProbe:
    def __init__(self, address: str, config: pb.SessionConfig | None = None, metadata=()):
        self.channel = grpc.aio.insecure_channel(address)
        self.call = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel).Converse(metadata=metadata or None)
        self.config = config or pb.SessionConfig(input_format=PCM16_16K)
        self.events: list[tuple[float, pb.ConverseResponse]] = []
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self._reader: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "ConverseProbe":
        await self.call.write(pb.ConverseRequest(config=self.config))
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self.call.cancel()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.events.append((time.monotonic(), response))
                self._changed.set()
            self.status = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            self.status, self.details = err.code(), err.details()
        finally:
            self._changed.set()

    async def send_audio(self, samples: np.ndarray, chunk_ms: int = 40, realtime: bool = True, rate: int = 16000) -> None:
        step = rate * chunk_ms // 1000
        start = time.monotonic()
        for index, begin in enumerate(range(0, len(samples), step)):
            await self.call.write(pb.ConverseRequest(audio=common_pb2.AudioChunk(data=samples[begin : begin + step].tobytes())))
            if realtime:
                await asyncio.sleep(max(0.0, start + (index + 1) * chunk_ms / 1000 - time.monotonic()))

    async def send(self, request: pb.ConverseRequest) -> None:
        await self.call.write(request)

    async def send_text(self, text: str) -> None:
        await self.call.write(pb.ConverseRequest(text=pb.TextInput(text=text)))

    async def end(self) -> None:
        await self.call.write(pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession())))

    async def cancel(self) -> None:
        await self.call.write(pb.ConverseRequest(control=pb.SessionControl(cancel=pb.CancelSession())))

    async def speak_until(self, samples: np.ndarray, predicate, timeout: float = WAIT_S, chunk_ms: int = 40,
                          rate: int = 16000) -> pb.ConverseResponse:
        """Send `samples` in real time, then keep the microphone open (silence, in real time)
        until an event satisfies `predicate`; returns it. For a conversation that must wait
        for the bot, however long it takes, before the user goes on."""
        stop = asyncio.Event()

        async def microphone() -> None:
            await self.send_audio(samples, chunk_ms, rate=rate)
            quiet = silence(chunk_ms / 1000, rate)
            while not stop.is_set():  # one chunk at a time, so it never stops inside a write
                await self.send_audio(quiet, chunk_ms, rate=rate)

        mic = asyncio.create_task(microphone())
        try:
            return await self.wait_for(predicate, timeout)
        finally:
            stop.set()
            await asyncio.gather(mic, return_exceptions=True)  # a write after the stream ended: wait_for said why

    async def wait_for(self, predicate, timeout: float = WAIT_S) -> pb.ConverseResponse:
        """Wait until an event satisfies `predicate`; returns it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if self.status is not None:
                raise AssertionError(f"stream ended ({self.status}: {self.details}) before the event; got {self.kinds()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting; events so far: {self.kinds()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_closed(self, timeout: float = WAIT_S) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"stream still open after {timeout:.0f} s; events so far: {self.kinds()}") from None

    def kinds(self, skip_audio: bool = True) -> list[str]:
        """Event names in order; speaking events as their kind, e.g. 'speaking:BOT_STARTED'."""
        names = []
        for _, event in self.events:
            kind = event.WhichOneof("event")
            if kind == "audio" and skip_audio:
                continue
            if kind == "speaking":
                kind = "speaking:" + pb.SpeakingEvent.Kind.Name(event.speaking.kind).removeprefix("KIND_")
            if kind == "user_transcript" and not event.user_transcript.is_final:
                kind = "user_transcript:interim"
            names.append(kind)
        return names

    def of(self, kind: str) -> list:
        return [getattr(event, kind) for _, event in self.events if event.WhichOneof("event") == kind]

    def audio_bytes(self) -> bytes:
        return b"".join(a.chunk.data for a in self.of("audio"))


def event_is(event_kind: str, **fields):
    def predicate(event: pb.ConverseResponse) -> bool:
        if event.WhichOneof("event") != event_kind:
            return False
        body = getattr(event, event_kind)
        return all(getattr(body, name) == value for name, value in fields.items())

    return predicate
