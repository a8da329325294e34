"""One long-lived channel per downstream service, shared by every session."""
from __future__ import annotations

import asyncio
import os

import grpc

from voicemesh.runtime.config import DEFAULT_PORTS, grpc_channel_options
from voicemesh.v1 import llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc

SERVICE_KINDS = ("vad", "stt", "llm", "tts")


def service_address(kind: str) -> str:
    """VOICEMESH_<KIND>_ADDR, else the service's default port on loopback."""
    return os.environ.get(f"VOICEMESH_{kind.upper()}_ADDR") or f"127.0.0.1:{DEFAULT_PORTS[kind]}"


class ServiceClients:
    def __init__(self, addresses: dict[str, str] | None = None):
        self.addresses = addresses or {kind: service_address(kind) for kind in SERVICE_KINDS}
        self.channels = {
            kind: grpc.aio.insecure_channel(address, options=grpc_channel_options())
            for kind, address in self.addresses.items()
        }
        self.vad = vad_pb2_grpc.VadServiceStub(self.channels["vad"])
        self.stt = stt_pb2_grpc.SttServiceStub(self.channels["stt"])
        self.llm = llm_pb2_grpc.LlmServiceStub(self.channels["llm"])
        self.tts = tts_pb2_grpc.TtsServiceStub(self.channels["tts"])

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
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))


class SerialStream:
    """A bidi call that several tasks write to (audio, turn starts, finalize).

    grpc.aio allows one write in flight per call; a second concurrent write fails inside
    Core and ends the call with INTERNAL. Writes here queue on a lock instead. Reading and
    cancelling go to the call itself."""

    def __init__(self, call):
        self.call = call
        self._lock = asyncio.Lock()

    async def write(self, message) -> None:
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
