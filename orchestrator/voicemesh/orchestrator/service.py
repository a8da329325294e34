"""The orchestrator service: the public Converse API over the VAD, STT, LLM and TTS services."""
from __future__ import annotations

import asyncio
import logging

import grpc

from voicemesh.orchestrator.clients import ServiceClients
from voicemesh.orchestrator.session import Session
from voicemesh.runtime.config import ServeSettings
from voicemesh.runtime.errors import first_message, stream_guard
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.server import ServiceDefinition, ServicerBase
from voicemesh.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc

log = logging.getLogger("voicemesh.orchestrator")


class OrchestratorServicer(ServicerBase, orchestrator_pb2_grpc.OrchestratorServiceServicer):
    kind = "orchestrator"

    def __init__(self, settings: ServeSettings):
        super().__init__(settings)
        self.clients: ServiceClients | None = None
        self.active_sessions = 0

    async def startup(self) -> None:
        self.clients = ServiceClients()
        log.info("downstream services", extra={"addresses": self.clients.addresses})
        self.ready = True

    async def shutdown(self) -> None:
        if self.clients:
            await self.clients.close()

    def provider_info(self) -> ProviderInfo:
        return ProviderInfo(provider="voicemesh", model="pipeline", details={"active_sessions": str(self.active_sessions)})

    async def Converse(self, request_iterator, context: grpc.aio.ServicerContext):
        async with stream_guard(context, "Converse"):
            self.require_ready()
            config = await first_message(request_iterator, "config", "Converse")
            session = Session(config, self.clients, context.invocation_metadata())
            runner = asyncio.create_task(session.run(request_iterator))
            runner.add_done_callback(lambda _: session.events.put_nowait(None))  # wakes the reader whatever happened
            self.active_sessions += 1
            log.info("session started", extra={"session_id": session.session_id, "metadata": dict(config.metadata)})
            try:
                while (event := await session.events.get()) is not None:
                    yield event
                await runner  # re-raises bad input as its status
            finally:
                self.active_sessions -= 1
                runner.cancel()
                log.info("session ended", extra={"session_id": session.session_id, "turns": session.turn_count})

    async def Info(self, request, context):
        services = await self.clients.infos() if self.clients else []
        return pb.OrchestratorServiceInfoResponse(info=self.service_info(), services=services)


def build(settings: ServeSettings) -> OrchestratorServicer:
    return OrchestratorServicer(settings)


DEFINITION = ServiceDefinition(
    kind="orchestrator",
    service_name=pb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name,
    build=build,
    register=lambda servicer, server: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server),
)
