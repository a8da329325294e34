"""The transport service process: the HTTP/WebSocket/WebRTC server, on the shared runtime.

The gRPC side serves health, reflection and TransportService/Info; `startup()` starts the
HTTP server and `shutdown()` drains it (new connections refused, open ones get the grace
period, then close with 1001).
"""
from __future__ import annotations

from voicemesh.runtime.config import ServeSettings
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.server import ServiceDefinition, ServicerBase
from voicemesh.transport.bridge import mulaw, pcm16
from voicemesh.transport.server import PROTOCOLS, TransportServer
from voicemesh.transport.settings import TransportSettings
from voicemesh.v1 import transport_pb2 as pb, transport_pb2_grpc


class TransportServicer(ServicerBase, transport_pb2_grpc.TransportServiceServicer):
    kind = "transport"

    def __init__(self, settings: ServeSettings):
        super().__init__(settings)
        self.transport = TransportServer(TransportSettings.load())

    async def startup(self) -> None:
        await self.transport.start()
        self.ready = True

    async def shutdown(self) -> None:
        await self.transport.stop(self.settings.grace_seconds)

    def provider_info(self) -> ProviderInfo:
        return ProviderInfo(provider="aiohttp+aiortc", model="gateway",
                            details={"http_url": self.transport.settings.http_url})

    async def Info(self, request, context):
        info = self.service_info()
        # Accepted from callers: Opus (WebRTC, decoded to PCM16), PCM16 at any rate (WebSocket), μ-law 8 kHz.
        info.input_formats.extend([pcm16(0), mulaw(8000)])
        info.output_formats.extend([pcm16(0), mulaw(8000)])
        t = self.transport
        return pb.TransportServiceInfoResponse(
            info=info, http_url=t.settings.http_url, orchestrator_address=t.settings.orchestrator_addr,
            protocols=list(PROTOCOLS), active_connections=len(t.connections), max_connections=t.settings.max_connections,
            total_connections=t.total_connections, max_message_bytes=t.settings.max_message_bytes,
            idle_timeout_seconds=t.settings.idle_timeout_seconds,
        )


DEFINITION = ServiceDefinition(
    kind="transport",
    service_name=pb.DESCRIPTOR.services_by_name["TransportService"].full_name,
    build=TransportServicer,
    register=lambda servicer, server: transport_pb2_grpc.add_TransportServiceServicer_to_server(servicer, server),
)
