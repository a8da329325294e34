"""The orchestrator service: the public Converse API over the VAD, STT, LLM and TTS services.

Limits (docs/reliability.md): VOICEMESH_MAX_SESSIONS open Converse calls at most (beyond it a
call ends with RESOURCE_EXHAUSTED before any session state is made); the SessionConfig within
VOICEMESH_CONFIG_TIMEOUT_SECS of the call's start (a call holds its place from the start, so one
that sends nothing must not hold it for ever: DEADLINE_EXCEEDED); per session, the limits of
session.SessionLimits, which end that call alone with RESOURCE_EXHAUSTED. A voice or language
the backends do not have is refused at config time (config.check_against_backends).
"""
from __future__ import annotations

import asyncio
import logging
import os

import grpc

from voicemesh.orchestrator.clients import ServiceClients
from voicemesh.orchestrator.config import check_against_backends
from voicemesh.orchestrator.session import Session, SessionLimits
from voicemesh.runtime.config import ServeSettings
from voicemesh.runtime.errors import DeadlineExceeded, ResourceExhausted, StreamError, first_message, stream_guard
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.server import ServiceDefinition, ServicerBase
from voicemesh.runtime.streams import before_refusing
from voicemesh.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc

log = logging.getLogger("voicemesh.orchestrator")
MAX_SESSIONS_ENV = "VOICEMESH_MAX_SESSIONS"
CONFIG_TIMEOUT_ENV = "VOICEMESH_CONFIG_TIMEOUT_SECS"
DEFAULT_CONFIG_TIMEOUT_S = 10.0


def max_sessions() -> int:
    """VOICEMESH_MAX_SESSIONS: open sessions per orchestrator; unset or 0: no cap."""
    raw = os.environ.get(MAX_SESSIONS_ENV, "").strip()
    if raw and not raw.isdigit():
        raise ValueError(f"{MAX_SESSIONS_ENV}={raw!r}: expected a whole number of sessions (0: no cap)")
    return int(raw or 0)


def config_timeout_secs() -> float:
    """VOICEMESH_CONFIG_TIMEOUT_SECS: how long a Converse call may take to send its SessionConfig; 0: no limit."""
    raw = os.environ.get(CONFIG_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_CONFIG_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"{CONFIG_TIMEOUT_ENV}={raw!r}: expected a number of seconds >= 0 (0: no limit)")
    return value


async def _read_config(request_iterator, timeout_s: float):
    """The call's SessionConfig, within `timeout_s` (0: no limit)."""
    try:
        async with asyncio.timeout(timeout_s or None):
            return await first_message(request_iterator, "config", "Converse")
    except TimeoutError:
        raise DeadlineExceeded(f"Converse: no SessionConfig came within {timeout_s:g} s of the call's start "
                               f"({CONFIG_TIMEOUT_ENV}={timeout_s:g}); send the config as the first message, "
                               "as soon as the call is open") from None


async def _abort(context: grpc.aio.ServicerContext, message: str) -> None:
    """End the call from outside its handler, which may be stuck writing to a client that does not read."""
    try:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    except grpc.aio.AbortError:
        pass
    except Exception:  # noqa: BLE001 - the call may have ended meanwhile
        log.debug("abort after the call ended", exc_info=True)


class OrchestratorServicer(ServicerBase, orchestrator_pb2_grpc.OrchestratorServiceServicer):
    kind = "orchestrator"

    def __init__(self, settings: ServeSettings):
        super().__init__(settings)
        self.clients: ServiceClients | None = None
        self.active_sessions = 0
        self.max_sessions = max_sessions()
        self.config_timeout_s = config_timeout_secs()  # read at startup, like every limit
        self.limits = SessionLimits.from_env()  # read at startup: a bad value stops the process, loudly
        self._aborts: set[asyncio.Task] = set()
        self.ended_by_limits = 0  # sessions ended with RESOURCE_EXHAUSTED for a client that does not read

    async def startup(self) -> None:
        self.clients = ServiceClients()
        log.info("downstream services", extra={"addresses": self.clients.addresses})
        self.ready = True

    async def shutdown(self) -> None:
        if self.clients:
            await self.clients.close()

    def provider_info(self) -> ProviderInfo:
        return ProviderInfo(provider="voicemesh", model="pipeline", details={"active_sessions": str(self.active_sessions),
                                                                       "ended_by_limits": str(self.ended_by_limits)})

    async def Converse(self, request_iterator, context: grpc.aio.ServicerContext):
        async with stream_guard(context, "Converse"):
            try:
                self.require_ready()
                if self.max_sessions and self.active_sessions >= self.max_sessions:
                    raise ResourceExhausted(f"Converse: this orchestrator already holds {self.active_sessions} sessions, its "
                                            f"limit ({MAX_SESSIONS_ENV}={self.max_sessions}); retry later or on another replica")
            except StreamError:
                await before_refusing(request_iterator)  # so the caller's first write cannot race the refusal
                raise
            self.active_sessions += 1  # counted from here: sessions waiting for their config hold a place too
            try:
                config = await _read_config(request_iterator, self.config_timeout_s)
                await check_against_backends(config, self.clients)  # before any session state, like Session's own checks
                session = Session(config, self.clients, context.invocation_metadata(), limits=self.limits)
                writing = [False, False]  # the handler is in `yield` (maybe stuck: the client does not read); aborted
                session.on_overflow = lambda message: self._overflowed(context, message, writing)
                runner = asyncio.create_task(session.run(request_iterator))
                runner.add_done_callback(lambda _: session.events.put_nowait(None))  # wakes the reader whatever happened
                log.info("session started", extra={"session_id": session.session_id, "metadata": dict(config.metadata)})
                try:
                    while (event := await session.events.get()) is not None:
                        session.delivered(event)
                        writing[0] = True
                        yield event
                        writing[0] = False
                        if writing[1]:  # ended from outside (_overflowed); if that abort has not run yet, this
                            raise ResourceExhausted(session.overflow or "the client is not reading its responses")
                    await runner  # re-raises bad input as its status
                    if session.overflow:  # the handler was not writing when it overflowed: it ends the call itself
                        raise ResourceExhausted(session.overflow)
                finally:
                    runner.cancel()
                    log.info("session ended", extra={"session_id": session.session_id, "turns": session.turn_count,
                                                     "peak_queued_bytes": session.peak_queued_bytes})
            finally:
                self.active_sessions -= 1

    def _overflowed(self, context: grpc.aio.ServicerContext, message: str, writing: list[bool]) -> None:
        """A client that does not read. If the handler is stuck writing to it, only an abort from
        another task ends the call (grpc then closes the handler's generator); else the handler
        sees the session end and raises the status itself."""
        self.ended_by_limits += 1
        if not writing[0]:
            return
        writing[1] = True
        task = asyncio.ensure_future(_abort(context, message))
        self._aborts.add(task)  # held until done: a task nobody references may be collected mid-way
        task.add_done_callback(self._aborts.discard)

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
