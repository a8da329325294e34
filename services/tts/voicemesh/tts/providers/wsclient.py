"""What the WebSocket TTS providers (ElevenLabs, Cartesia) share: aiohttp calls whose failures
come out as StreamErrors that name the provider and say what to do.

- `connect`: the WebSocket handshake; a refused handshake (401, 404, 429 ...) maps through
  `http_error`, an unreachable host to UNAVAILABLE, a slow one to DEADLINE_EXCEEDED.
- `get_json`: the REST calls behind `probe()` and the voice list, same mapping, bounded in time.
- `classify`: an in-stream error (a JSON error message or a close frame's reason) by its words,
  since neither vendor documents a fixed list of in-stream error codes.
- `ws_base`: the WebSocket URL for an https/http endpoint setting (one setting serves both).

The credential travels in a header only, never in a URL, so no URL we log or raise holds it.
"""
from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import aiohttp

from voicemesh.runtime.errors import (
    DeadlineExceeded, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError, Unauthenticated,
    Unavailable,
)
from voicemesh.runtime.upstream import http_error

HINTS = {
    401: "check the API key (the key file or the provider's key env var)",
    403: "the API key lacks the permission for this call, or the account is restricted",
    404: "check the voice and model ids",
    429: "too many concurrent requests or the quota is used up; retry later or raise the plan's limit",
}

REFUSALS = {  # what a refused WebSocket handshake means (its body is not readable through aiohttp)
    400: "refused the request as invalid (a model, format or language it does not support?)",
    401: "refused the API key",
    403: "refused the API key for this call",
    404: "does not know the voice or model asked for",
    429: "refused the connection: too many concurrent requests or quota used up",
}


def ws_base(endpoint: str) -> str:
    """wss://host for https://host (ws:// for http://, a self-hosted proxy or a local fake)."""
    endpoint = endpoint.rstrip("/")
    if endpoint.startswith("https://"):
        return "wss://" + endpoint.removeprefix("https://")
    if endpoint.startswith("http://"):
        return "ws://" + endpoint.removeprefix("http://")
    return endpoint


def host_of(url: str) -> str:
    return urlsplit(url).netloc or url


async def connect(session: aiohttp.ClientSession, url: str, headers: dict[str, str], provider: str,
                  timeout_s: float) -> aiohttp.ClientWebSocketResponse:
    """Open the WebSocket; every failure is a StreamError naming `provider`."""
    try:
        return await asyncio.wait_for(
            session.ws_connect(url, headers=headers, autoping=True, max_msg_size=16 << 20,
                               timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0)),
            timeout_s)
    except aiohttp.WSServerHandshakeError as err:
        what = REFUSALS.get(err.status, "refused the connection")
        raise http_error(provider, err.status, f"{host_of(url)} {what}", HINTS.get(err.status, "")) from None
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"{provider}: {host_of(url)} did not accept a connection within {timeout_s:.0f} s") from None
    except (aiohttp.ClientError, OSError) as err:
        raise Unavailable(f"{provider}: cannot reach {host_of(url)}: {err}; check the endpoint setting") from None


def _detail(body: str) -> str:
    """The human part of an error body: FastAPI-style {"detail": {"message"}} or {"message"/"error"}."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    if isinstance(data, dict):
        for key in ("detail", "message", "error", "title"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("status") or json.dumps(value)
            if value:
                return str(value)[:200]
    return body.strip()[:200]


async def get_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str], provider: str,
                   timeout_s: float) -> object:
    """GET a JSON document; a non-2xx answer or an unreachable host raises the matching StreamError."""
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, headers=headers) as response:
                body = await response.text()
                if response.status >= 400:
                    raise http_error(provider, response.status, _detail(body), HINTS.get(response.status, ""))
                return json.loads(body) if body else None
    except StreamError:
        raise
    except TimeoutError:
        raise DeadlineExceeded(f"{provider}: {host_of(url)} did not answer within {timeout_s:.0f} s") from None
    except (aiohttp.ClientError, OSError, ValueError) as err:
        raise Unavailable(f"{provider}: cannot reach {host_of(url)}: {err}; check the endpoint setting") from None


def classify(provider: str, text: str, status: int | None = None) -> StreamError:
    """An in-stream error as the StreamError a caller can act on: by its HTTP-like status when the
    provider gives one, else by its words."""
    message = f"{provider}: {text.strip()[:300] or 'error without a message'}"
    lowered = text.lower()
    if status and status >= 400 and "not found" not in lowered and "not_found" not in lowered:
        return http_error(provider, status, text, HINTS.get(status, ""))
    if any(word in lowered for word in ("api key", "api_key", "unauthori", "authenticat", "invalid_key")):
        return Unauthenticated(f"{message}; {HINTS[401]}")
    if any(word in lowered for word in ("permission", "forbidden")):
        return PermissionDenied(f"{message}; {HINTS[403]}")
    if any(word in lowered for word in ("quota", "concurren", "rate limit", "rate_limit", "too many", "limit exceeded")):
        return ResourceExhausted(f"{message}; {HINTS[429]}")
    if any(word in lowered for word in ("not found", "not_found", "does not exist", "unknown voice", "unknown model")):
        return NotFound(f"{message}; {HINTS[404]}")
    if any(word in lowered for word in ("format", "invalid", "unsupported", "not supported", "language")):
        return InvalidInput(message)
    return Unavailable(message)


def close_error(provider: str, code: int | None, reason: str, what: str) -> StreamError:
    """The socket closed before `what`: by the close code (1008 policy violation: by its reason)."""
    reason = (reason or "").strip()
    if code == 1008 and reason:
        return classify(provider, reason)
    detail = f"the connection closed before {what} (close code {code}{', ' + reason if reason else ''})"
    if code == 1008:
        return InvalidInput(f"{provider}: {detail}; the provider refused the request by policy")
    return Unavailable(f"{provider}: {detail}")


async def receive_json(ws: aiohttp.ClientWebSocketResponse, provider: str, timeout_s: float, what: str) -> dict:
    """The next JSON message; a close, a binary frame or silence past `timeout_s` raises."""
    try:
        msg = await ws.receive(timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"{provider}: no message within {timeout_s:.0f} s while waiting for {what}") from None
    if msg.type == aiohttp.WSMsgType.TEXT:
        try:
            data = json.loads(msg.data)
        except ValueError:
            raise Unavailable(f"{provider}: a message that is not JSON: {msg.data[:80]!r}") from None
        if not isinstance(data, dict):
            raise Unavailable(f"{provider}: a JSON message that is not an object: {msg.data[:80]!r}")
        return data
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        code = msg.data if msg.type == aiohttp.WSMsgType.CLOSE else ws.close_code
        raise close_error(provider, code, msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else "", what)
    if msg.type == aiohttp.WSMsgType.ERROR:
        raise Unavailable(f"{provider}: the connection failed while waiting for {what}: {ws.exception()}")
    raise Unavailable(f"{provider}: an unexpected {msg.type.name} message while waiting for {what}")
