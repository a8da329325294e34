"""One long-lived channel per downstream service, shared by every session."""
from __future__ import annotations

import asyncio
import os

from voicemesh.orchestrator.mux import StreamMultiplexer
from voicemesh.runtime.config import DEFAULT_PORTS, grpc_channel_options
from voicemesh.runtime.tls import BACKEND_PREFIX, ChannelTls, aio_channel
from voicemesh.v1 import llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc

SERVICE_KINDS = ("vad", "stt", "llm", "tts")
VAD_MULTIPLEX_ENV = "VOICEMESH_VAD_MULTIPLEX"  # DetectMany calls per orchestrator; 0: one Detect call per session


def service_address(kind: str) -> str:
    """VOICEMESH_<KIND>_ADDR, else the service's default port on loopback."""
    return os.environ.get(f"VOICEMESH_{kind.upper()}_ADDR") or f"127.0.0.1:{DEFAULT_PORTS[kind]}"


class ServiceClients:
    def __init__(self, addresses: dict[str, str] | None = None):
        self.addresses = addresses or {kind: service_address(kind) for kind in SERVICE_KINDS}
        # TLS (mTLS with a client certificate) when VOICEMESH_BACKEND_TLS_* is set (voicemesh.runtime.tls).
        self.tls = ChannelTls.from_env(BACKEND_PREFIX)
        self.channels = {
            kind: aio_channel(address, grpc_channel_options(), self.tls) for kind, address in self.addresses.items()
        }
        self.vad = vad_pb2_grpc.VadServiceStub(self.channels["vad"])
        self.stt = stt_pb2_grpc.SttServiceStub(self.channels["stt"])
        self.llm = llm_pb2_grpc.LlmServiceStub(self.channels["llm"])
        self.tts = tts_pb2_grpc.TtsServiceStub(self.channels["tts"])
        # Every session's VAD stream rides on one of these calls (see orchestrator.mux);
        # more than one lets a VAD deployment with several replicas share the sessions.
        self.vad_multiplexers = [
            StreamMultiplexer(self.vad.DetectMany, vad_pb2.DetectManyRequest, vad_pb2.DetectStreamMessage, "vad")
            for _ in range(_multiplex_calls())
        ]

    def open_vad_stream(self):
        """A session's VAD stream: on the least busy multiplexed call, or a Detect call of its own."""
        if not self.vad_multiplexers:
            return SerialStream(self.vad.Detect())
        return min(self.vad_multiplexers, key=lambda mux: mux.open_streams).open()

    async def infos(self, timeout: float = 2.0) -> list:
        """What each service reports; unreachable ones are skipped."""
        calls = (
            self.vad.Info(vad_pb2.VadServiceInfoRequest(), timeout=timeout),
            self.stt.Info(stt_pb2.SttServiceInfoRequest(), timeout=timeout),
            self.llm.Info(llm_pb2.LlmServiceInfoRequest(), timeout=timeout),
            self.tts.Info(tts_pb2.TtsServiceInfoRequest(), timeout=timeout),
        )
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [result.info for result in results if not isinstance(result, BaseException)]

    async def close(self) -> None:
        await asyncio.gather(*(mux.close() for mux in self.vad_multiplexers))
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))


def _multiplex_calls() -> int:
    raw = os.environ.get(VAD_MULTIPLEX_ENV, "1")
    if not raw.isdigit() or int(raw) > 64:
        raise ValueError(f"{VAD_MULTIPLEX_ENV}={raw!r}: expected a number of calls from 0 (one Detect call per session) to 64")
    return int(raw)


class SerialStream:
    """A bidi call that several tasks write to (audio, turn starts, finalize).

    grpc.aio allows one write in flight per call; a second concurrent write fails inside
    Core and ends the call with INTERNAL. Writes here queue on a lock instead. Reading and
    cancelling go to the call itself."""

    def __init__(self, call):
        self.call = call
        self._lock = asyncio.Lock()

    async def write(self, message, urgent: bool = True) -> None:
        """`urgent` matters to multiplexed streams only (orchestrator.mux); a call of its own sends at once."""
        async with self._lock:
            await self.call.write(message)

    def __aiter__(self):
        return self.call.__aiter__()

    def cancel(self) -> bool:
        return self.call.cancel()

    def done(self) -> bool:
        return self.call.done()

    def cancelled(self) -> bool:
        return self.call.cancelled()
