"""The swap rig: the embedded mesh, and each service's process replaceable by one running another
provider on the same port, as a redeploy would replace it.

Every fake provider runs in the test process with content from the embedded models: the
fake STTs recognise through a real Whisper STT service, the fake TTSs speak through a real
hibari TTS service, the LLM fakes answer through llama.cpp's own OpenAI-compatible server.
The environment of every swapped-in process holds the settings of every provider at once
(VOICEMESH_<KIND>_<PROVIDER>_<FIELD>), so a swap is VOICEMESH_<KIND>_PROVIDER and nothing else.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

import grpc

from support import START_S, Processes, free_ports
from voicemesh.cli.mesh import wait_serving
from voicemesh.runtime.config import DEFAULT_PROVIDERS
from voicemesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

MESH_KINDS = ("vad", "stt", "llm", "tts")
SWAP_WAIT_S = 120.0  # a liveness bound for the orchestrator to see the new provider, not a speed claim


@dataclass
class SwapRig:
    procs: Processes
    provider_env: dict[str, str]  # every provider's settings and credentials, pointing at the fakes
    ports: dict[str, int] = field(default_factory=dict)
    running: dict[str, tuple[str, subprocess.Popen]] = field(default_factory=dict)  # kind -> (provider, process)
    names: dict[str, str] = field(default_factory=dict)  # kind -> its current process's log name

    def start(self) -> "SwapRig":
        self.ports = free_ports((*MESH_KINDS, "orchestrator"))
        for kind in MESH_KINDS:
            self._serve(kind, "")
        for kind in MESH_KINDS:
            self._wait(kind)
        env = {f"VOICEMESH_{kind.upper()}_ADDR": self.address(kind) for kind in MESH_KINDS}
        self.orchestrator = self.procs.serve("orchestrator", self.ports["orchestrator"], env=env)
        wait_serving(self.address("orchestrator"), self.orchestrator, timeout=START_S)
        return self

    def address(self, kind: str) -> str:
        return f"127.0.0.1:{self.ports[kind]}"

    def use(self, kind: str, provider: str) -> None:
        """Redeploy one service with `provider` ("" = its embedded default): stop its process,
        start the new one on the same port, and wait until the orchestrator reports it."""
        if self.running[kind][0] == provider:
            return
        self.procs.stop(self.running[kind][1])
        self._serve(kind, provider)
        self._wait(kind)
        self._wait_orchestrator_sees(kind)

    def _serve(self, kind: str, provider: str) -> None:
        env = {**self.provider_env, "VOICEMESH_LOG_FORMAT": "text"}
        if provider:
            env[f"VOICEMESH_{kind.upper()}_PROVIDER"] = provider  # the swap: this one variable
        name = f"{kind}-{provider or 'embedded'}-{len(self.procs.procs)}"
        self.names[kind] = name
        self.running[kind] = (provider, self.procs.serve(kind, self.ports[kind], env=env, name=name))

    def _wait(self, kind: str) -> None:
        provider, proc = self.running[kind]
        try:
            wait_serving(self.address(kind), proc, timeout=START_S)
        except Exception as err:
            raise AssertionError(f"{kind} with {provider or 'its embedded provider'} did not become SERVING: {err}\n"
                                 f"{self.log_of(kind)[-3000:]}") from err

    def _wait_orchestrator_sees(self, kind: str) -> None:
        """Until the orchestrator's Info lists this kind with the provider now running: then its
        channel has reconnected to the new process."""
        wanted = self.running[kind][0] or DEFAULT_PROVIDERS[kind]
        deadline = time.monotonic() + SWAP_WAIT_S
        seen: dict[str, str] = {}
        with grpc.insecure_channel(self.address("orchestrator")) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            while time.monotonic() < deadline:
                reply = stub.Info(orchestrator_pb2.OrchestratorServiceInfoRequest(), timeout=10)
                seen = {info.service: info.provider for info in reply.services}
                if seen.get(kind) == wanted:
                    return
                time.sleep(0.2)  # polling a state with a deadline, not waiting for time to pass
        raise AssertionError(f"the orchestrator never reported {kind}={wanted}; last saw {seen}")

    def log_of(self, kind: str) -> str:
        return (self.procs.log_dir / f"{self.names[kind]}.log").read_text(errors="replace")
