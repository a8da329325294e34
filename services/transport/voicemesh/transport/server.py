"""The transport's HTTP side: one aiohttp server for the page, WebRTC signalling and the
WebSocket protocols, with the connection limit and the drain every protocol shares."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from aiohttp import web

from voicemesh.runtime.auth import read_key
from voicemesh.runtime.config import grpc_channel_options
from voicemesh.runtime.tls import KeyedChannel, aio_channel
from voicemesh.transport.events import CLOSE_GOING_AWAY, CLOSE_TRY_LATER
from voicemesh.transport.settings import TransportSettings

log = logging.getLogger("voicemesh.transport")
STATIC = Path(__file__).resolve().parent / "static"
PROTOCOLS = ("webrtc", "websocket", "twilio", "telnyx")


class Connection:
    """One admitted caller. `closer` ends it from the server side (drain, shutdown)."""

    def __init__(self, server: "TransportServer", protocol: str, peer: str):
        self.server = server
        self.protocol = protocol
        self.peer = peer
        self.label = f"{protocol}:{server.total_connections}"
        self.closer = None  # async callable(code, reason), set by the protocol layer
        self.last_activity = time.monotonic()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def release(self) -> None:
        if self.server.connections.pop(self.label, None) is not None:
            log.info("connection closed", extra={"connection": self.label, "open": len(self.server.connections)})


class TransportServer:
    def __init__(self, settings: TransportSettings):
        self.settings = settings
        self.channel: grpc.aio.Channel | None = None
        self.connections: dict[str, Connection] = {}
        self.total_connections = 0
        self.draining = False
        self._runner: web.AppRunner | None = None

    # -- admission -------------------------------------------------------------------------

    def admit(self, protocol: str, peer: str) -> tuple[Connection | None, int, str]:
        """A Connection, or None with the close code and reason to refuse with."""
        if self.draining:
            return None, CLOSE_GOING_AWAY, "the transport is shutting down; reconnect to another instance"
        if len(self.connections) >= self.settings.max_connections:
            return None, CLOSE_TRY_LATER, f"too many connections (max {self.settings.max_connections}); try again later"
        self.total_connections += 1
        connection = Connection(self, protocol, peer)
        self.connections[connection.label] = connection
        log.info("connection accepted", extra={"connection": connection.label, "peer": peer, "open": len(self.connections)})
        return connection, 0, ""

    # -- lifecycle -------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        from voicemesh.transport import telnyx, twilio, webrtc, websocket

        from voicemesh.transport.callers import CallerAuth

        # Caller auth (voicemesh.transport.callers) runs before every handler.
        app = web.Application(client_max_size=self.settings.max_message_bytes,
                              middlewares=[CallerAuth(self.settings).middleware])
        app["transport"] = self
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._health)
        app.router.add_static("/static/", STATIC, append_version=False)
        app.router.add_post("/api/offer", webrtc.offer)
        app.router.add_get("/ws", websocket.handle)
        app.router.add_get("/twilio", twilio.handle)
        app.router.add_get("/telnyx", telnyx.handle)
        return app

    async def start(self) -> None:
        from voicemesh.transport.webrtc import configure_ice

        configure_ice(self.settings)
        # TLS and this transport's own key toward the orchestrator (docs/security.md).
        self.channel = aio_channel(self.settings.orchestrator_addr, grpc_channel_options(), self.settings.orchestrator_tls())
        if self.settings.orchestrator_key_file:
            key = read_key(self.settings.orchestrator_key_file, "transport: orchestrator_key_file")
            self.channel = KeyedChannel(self.channel, key)
        self._runner = web.AppRunner(self.build_app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port, reuse_port=False)
        await site.start()
        self._watchdog = asyncio.create_task(self._idle_watchdog(), name="idle-watchdog")
        log.info("http listening", extra={"url": self.settings.http_url, "orchestrator": self.settings.orchestrator_addr})

    async def stop(self, grace_seconds: float) -> None:
        """Refuse new connections, give open ones `grace_seconds` to finish, close the rest."""
        self.draining = True
        deadline = time.monotonic() + grace_seconds
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.connections:
            log.info("closing open connections", extra={"open": len(self.connections)})
            closers = [c.closer(CLOSE_GOING_AWAY, "the transport is shutting down") for c in list(self.connections.values())
                       if c.closer is not None]
            await asyncio.wait_for(asyncio.gather(*closers, return_exceptions=True), 5.0)
        if getattr(self, "_watchdog", None):
            self._watchdog.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.channel is not None:
            await self.channel.close()

    async def _idle_watchdog(self) -> None:
        """Closes connections that sent nothing (no message, no audio) for idle_timeout_seconds."""
        limit = self.settings.idle_timeout_seconds
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for connection in list(self.connections.values()):
                if now - connection.last_activity > limit and connection.closer is not None:
                    log.info("idle timeout", extra={"connection": connection.label})
                    connection.last_activity = now  # close once
                    asyncio.create_task(connection.closer(1008, f"idle for {limit:g} s: no message from the client"))

    # -- plain HTTP ------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _health(self, request: web.Request) -> web.Response:
        status = 503 if self.draining else 200
        return web.json_response({"status": "draining" if self.draining else "serving",
                                  "connections": len(self.connections)}, status=status)


def transport_of(request: web.Request) -> TransportServer:
    return request.app["transport"]
