"""What every WebSocket protocol shares: admission, the read loop, limits, closing with a reason.

A protocol subclasses WsSession and implements on_text/on_binary (which may raise
ProtocolError to close this one connection) and the BridgeSink methods.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from voicemesh.transport.bridge import ConverseBridge
from voicemesh.transport.events import (
    CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_TOO_BIG, CLOSE_TRY_LATER, ProtocolError, close_reason,
)
from voicemesh.transport.server import Connection, TransportServer, transport_of
from voicemesh.v1 import orchestrator_pb2 as pb

log = logging.getLogger("voicemesh.transport.ws")


class _WebSocket(web.WebSocketResponse):
    """aiohttp closes an oversized message with 1009 and no reason; give it one."""

    async def close(self, *, code: int = CLOSE_NORMAL, message: bytes = b"", drain: bool = True) -> bool:
        if code == CLOSE_TOO_BIG and not message:
            message = f"message larger than {self._max_msg_size} bytes (max_message_bytes)".encode()
        return await super().close(code=code, message=message, drain=drain)


class WsSession:
    protocol = "websocket"

    def __init__(self, server: TransportServer, connection: Connection, ws: web.WebSocketResponse):
        self.server = server
        self.connection = connection
        self.ws = ws
        self.bridge: ConverseBridge | None = None
        self._send_lock = asyncio.Lock()
        self._ended = asyncio.Event()  # the Converse stream is over
        self._close: tuple[int, str] | None = None  # set by the server side (drain, idle)
        self._wake = asyncio.Event()

    # -- for subclasses ------------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        raise NotImplementedError

    async def on_binary(self, data: bytes) -> None:
        raise NotImplementedError

    async def on_session_over(self) -> None:
        """The Converse stream ended; e.g. hang up the call. Runs before the socket closes."""

    async def open_bridge(self, config: pb.SessionConfig) -> pb.SessionStarted:
        bridge = ConverseBridge(self.server.channel, config, self, self.connection.label)
        try:
            started = await bridge.open()
        except ConnectionError as err:
            unavailable = "UNAVAILABLE" in str(err) or "unreachable" in str(err) or "within" in str(err)
            raise ProtocolError(CLOSE_TRY_LATER if unavailable else CLOSE_INTERNAL, str(err)) from None
        self.bridge = bridge
        asyncio.create_task(self._watch_bridge(bridge))
        return started

    async def send_json(self, text: str) -> None:
        await self._send(self.ws.send_str, text)

    async def send_bytes(self, data: bytes) -> None:
        await self._send(self.ws.send_bytes, data)

    async def _send(self, method, payload) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            try:
                await method(payload)
            except (ConnectionError, RuntimeError):
                pass  # the peer is gone; the read loop sees the close

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> tuple[int, str]:
        """Read until the peer closes, a ProtocolError, the session ends or the server closes us."""
        reader = asyncio.create_task(self._read_loop())
        ended = asyncio.create_task(self._ended.wait())
        woken = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({reader, ended, woken}, return_when=asyncio.FIRST_COMPLETED)
            if self._close is not None:
                return self._close
            if reader.done():
                return reader.result()
            await self.on_session_over()
            outcome = self.bridge.outcome
            if outcome.ok:
                return CLOSE_NORMAL, outcome.describe()
            code = CLOSE_TRY_LATER if outcome.code is not None and outcome.code.name == "UNAVAILABLE" else CLOSE_INTERNAL
            return code, outcome.describe()
        finally:
            for task in (reader, ended, woken):
                task.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_loop(self) -> tuple[int, str]:
        try:
            async for message in self.ws:  # aiohttp answers pings and ends on CLOSE
                self.connection.touch()
                if message.type == WSMsgType.TEXT:
                    await self.on_text(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self.on_binary(message.data)
                elif message.type == WSMsgType.ERROR:
                    return getattr(message.data, "code", CLOSE_INTERNAL), str(message.data)
        except ProtocolError as err:
            log.info("protocol error", extra={"connection": self.connection.label, "code": err.close_code,
                                              "reason": err.reason})
            return err.close_code, err.reason
        return CLOSE_NORMAL, "client closed"

    async def _watch_bridge(self, bridge: ConverseBridge) -> None:
        await bridge.wait()
        self._ended.set()

    async def close_from_server(self, code: int, reason: str) -> None:
        self._close = (code, reason)
        self._wake.set()


async def serve(request: web.Request, session_class: type[WsSession]) -> web.WebSocketResponse:
    """Admit, upgrade, run one protocol session, and close with a code and reason."""
    server = transport_of(request)
    ws = _WebSocket(max_msg_size=server.settings.max_message_bytes, autoping=True, heartbeat=None)
    await ws.prepare(request)
    connection, code, reason = server.admit(session_class.protocol, request.remote or "?")
    if connection is None:
        await ws.close(code=code, message=reason.encode())
        return ws
    session = session_class(server, connection, ws)
    connection.closer = session.close_from_server
    code, reason = CLOSE_INTERNAL, "transport failed; see its logs"
    try:
        code, reason = await session.run()
    except Exception:  # noqa: BLE001 - one connection's failure never reaches the others
        log.exception("connection failed", extra={"connection": connection.label})
    finally:
        if session.bridge is not None:
            await session.bridge.close()
        connection.release()
        if not ws.closed:
            await ws.close(code=code, message=close_reason(reason).encode())
        log.info("closed", extra={"connection": connection.label, "code": code, "reason": reason})
    return ws
