"""Who may open a connection to the transport (docs/security.md#the-transport).

With `api_keys_file` set (VOICEMESH_TRANSPORT_API_KEYS_FILE, else VOICEMESH_API_KEYS_FILE: the
same digests file the orchestrator reads, voicemesh.runtime.auth), every connection needs a key:
- /ws and /api/offer: `Authorization: Bearer <key>`, or `?token=<key>` (a browser cannot set
  headers on a WebSocket);
- /telnyx: the same; put the token in the streaming URL's query (Telnyx sends no signature on
  the media WebSocket; its Ed25519 scheme signs webhooks: `verify_telnyx`, for when the
  transport answers them);
- /twilio: a valid `X-Twilio-Signature` (HMAC-SHA1 of the URL with the account's auth token;
  Twilio's <Stream> URL takes no query string, so no token can ride on it), or a key.
`twilio_verify_signature` requires the Twilio signature on /twilio even without a key file.
The page, /static and /healthz stay open: they carry nothing but the public page and a status.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping

from aiohttp import web

from voicemesh.runtime.auth import KeyStore, is_loopback
from voicemesh.transport.events import CLOSE_POLICY
from voicemesh.transport.settings import TransportSettings

log = logging.getLogger("voicemesh.transport.auth")
KEYED_PATHS = ("/ws", "/api/offer", "/telnyx")
TWILIO_PATH = "/twilio"
BAD_TWILIO = "invalid X-Twilio-Signature: not signed with this account's auth token for this URL"
TELNYX_TOLERANCE_S = 300  # a signed webhook older (or newer) than this is a replay


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Twilio's request signature: base64(HMAC-SHA1(auth token, URL + each POST param's name and
    value, sorted by name)). A WebSocket handshake (GET) signs the URL alone."""
    payload = url + "".join(name + value for name, value in sorted((params or {}).items()))
    return base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given and without a default port: Twilio signs the URL as configured."""
    for scheme, port in (("wss://", ":443"), ("https://", ":443"), ("ws://", ":80"), ("http://", ":80")):
        if url.startswith(scheme):
            host, slash, rest = url[len(scheme):].partition("/")
            if host.endswith(port):
                return [url, f"{scheme}{host[: -len(port)]}{slash}{rest}"]
    return [url]


def verify_twilio(auth_token: str, url: str, signature: str, params: Mapping[str, str] | None = None) -> bool:
    if not signature:
        return False
    return any(hmac.compare_digest(twilio_signature(auth_token, candidate, params).encode(), signature.encode())
               for candidate in _url_variants(url))


def verify_telnyx(public_key_b64: str, signature_b64: str, timestamp: str, body: bytes, now: float | None = None) -> bool:
    """Telnyx's webhook signature: Ed25519 over `<telnyx-timestamp>|<raw body>` with the account's
    public key (base64, from the Telnyx portal), checked against `telnyx-signature-ed25519`; the
    timestamp must be within TELNYX_TOLERANCE_S of now."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        signature = base64.b64decode(signature_b64, validate=True)
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - stamp) > TELNYX_TOLERANCE_S:
        return False
    try:
        key.verify(signature, f"{timestamp}|".encode() + body)
    except InvalidSignature:
        return False
    return True


def public_url(request: web.Request, settings: TransportSettings) -> str:
    """The URL the caller used: `public_url` + the path when set (behind an Ingress or a proxy
    the transport sees its own address), else rebuilt from the request (X-Forwarded-Proto counts)."""
    if settings.public_url:
        return settings.public_url.rstrip("/") + request.path_qs
    secure = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() in ("https", "wss")
    scheme = ("wss" if secure else "ws") if request.headers.get("Upgrade", "").lower() == "websocket" else \
        ("https" if secure else "http")
    return f"{scheme}://{request.host}{request.path_qs}"


class CallerAuth:
    def __init__(self, settings: TransportSettings):
        self.settings = settings
        self.keys = KeyStore(settings.api_keys_file) if settings.api_keys_file else None
        if settings.twilio_verify_signature and not settings.twilio_auth_token:
            raise SystemExit("transport: twilio_verify_signature needs the account's auth token (TWILIO_AUTH_TOKEN)")
        if self.keys is None and not is_loopback(settings.http_host):
            log.warning("no API keys configured (VOICEMESH_API_KEYS_FILE): the transport on %s lets anyone open a "
                        "session", settings.http_host)

    def _key_problem(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if not header and request.query.get("token"):
            header = f"Bearer {request.query['token']}"
        return self.keys.check_header(header)

    def problem(self, request: web.Request) -> str | None:
        """None when the request may go on, else why not (never echoing what was sent)."""
        path, settings = request.path, self.settings
        if path == TWILIO_PATH and (settings.twilio_verify_signature or (self.keys and settings.twilio_auth_token)):
            signature = request.headers.get("X-Twilio-Signature", "")
            if verify_twilio(settings.twilio_auth_token, public_url(request, settings), signature):
                return None
            if self.keys is None or signature:
                return BAD_TWILIO
        if self.keys is None or (path not in KEYED_PATHS and path != TWILIO_PATH):
            return None
        return self._key_problem(request)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        problem = self.problem(request)
        if problem is None:
            return await handler(request)
        log.info("caller refused", extra={"path": request.path, "peer": request.remote or "?", "reason": problem})
        if request.headers.get("Upgrade", "").lower() == "websocket":
            # Upgraded, then closed with the reason: a browser cannot read a refused handshake's status.
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close(code=CLOSE_POLICY, message=f"unauthenticated: {problem}"[:120].encode())
            return ws
        return web.json_response({"error": f"unauthenticated: {problem}"}, status=401)
