"""Converse events as the JSON objects browsers and simple clients receive, and the
client messages they send (shared by the WebSocket and the WebRTC data channel)."""
from __future__ import annotations

import json

from google.protobuf.json_format import MessageToDict

from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

Speaking = pb.SpeakingEvent
_SPEAKING = {
    Speaking.KIND_USER_STARTED: ("user", "started"),
    Speaking.KIND_USER_STOPPED: ("user", "stopped"),
    Speaking.KIND_BOT_STARTED: ("bot", "started"),
    Speaking.KIND_BOT_STOPPED: ("bot", "stopped"),
}
# Client messages after the start message, and the fields each needs.
DTMF_DIGITS = frozenset("0123456789*#ABCD")
CLIENT_MESSAGES = {"text": ("text",), "dtmf": ("digit",), "end": (), "cancel": (), "ping": ()}


class ProtocolError(Exception):
    """Ends one connection. `close_code` is a WebSocket close code; `reason` says what to fix."""

    def __init__(self, close_code: int, reason: str):
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason


# WebSocket close codes (RFC 6455 section 7.4.1) used by every protocol here.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_UNSUPPORTED = 1003  # binary where JSON is expected, or a codec we do not take
CLOSE_BAD_DATA = 1007  # malformed JSON, a frame that is not whole samples, bad base64
CLOSE_POLICY = 1008  # protocol order broken, unknown message, idle too long
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011  # the orchestrator failed the session
CLOSE_TRY_LATER = 1013  # too many connections, or the orchestrator is unavailable


def format_dict(fmt: common_pb2.AudioFormat) -> dict:
    encoding = "mulaw" if fmt.encoding == common_pb2.AUDIO_ENCODING_MULAW else "pcm16"
    return {"encoding": encoding, "sample_rate": fmt.sample_rate_hz, "channels": fmt.channels or 1}


def event_json(response: pb.ConverseResponse) -> dict | None:
    """One non-audio Converse event as a JSON-ready dict (audio travels separately)."""
    kind = response.WhichOneof("event")
    if kind is None or kind == "audio":
        return None
    body = getattr(response, kind)
    if kind == "session_started":
        return {"type": kind, "session_id": body.session_id, "output": format_dict(body.output_format)}
    if kind == "user_transcript":
        return {"type": kind, "text": body.text, "final": body.is_final, "turn": body.turn_number,
                "confidence": round(body.confidence, 3)}
    if kind == "bot_text":
        return {"type": kind, "text": body.text, "turn": body.turn_number}
    if kind == "speaking":
        who, state = _SPEAKING.get(body.kind, ("unknown", "unknown"))
        return {"type": kind, "who": who, "state": state, "turn": body.turn_number, "offset_ms": body.offset_ms}
    if kind == "turn_started":
        return {"type": kind, "turn": body.turn_number, "turn_id": body.turn_id}
    if kind == "turn_ended":
        event = {"type": kind, "turn": body.turn_number, "duration_s": round(body.duration_seconds, 3),
                 "interrupted": body.interrupted, "latency_ms": round(body.latency_ms, 1),
                 "reason": pb.TurnEnded.Reason.Name(body.reason).removeprefix("REASON_").lower()}
        # Per-service TTFB, once TurnEnded carries a `metrics` field; the page draws its waterfall.
        if "metrics" in body.DESCRIPTOR.fields_by_name and body.HasField("metrics"):
            event["metrics"] = MessageToDict(body.metrics, preserving_proto_field_name=True)
        return event
    if kind == "error":
        return {"type": kind, "code": body.code, "message": body.message, "fatal": body.fatal, "source": body.source}
    if kind == "session_ended":
        return {"type": kind, "reason": pb.SessionEnded.Reason.Name(body.reason).removeprefix("REASON_").lower()}
    # Events added to the API later (metrics, tool calls) pass through in their proto shape.
    return {"type": kind, **MessageToDict(body, preserving_proto_field_name=True)}


def dumps(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"))


def parse_json(text: str, what: str) -> dict:
    """A JSON object from a text message, or ProtocolError(1007) saying what was wrong."""
    try:
        message = json.loads(text)
    except ValueError as err:
        raise ProtocolError(CLOSE_BAD_DATA, f"malformed JSON in {what}: {err.msg} at {err.pos}") from None
    if not isinstance(message, dict):
        raise ProtocolError(CLOSE_BAD_DATA, f"{what} must be a JSON object")
    return message


def client_message(text: str) -> dict:
    """A client message after start: {"type": "text"|"dtmf"|"end"|"cancel"|"ping", ...}."""
    message = parse_json(text, "client message")
    kind = message.get("type")
    if kind not in CLIENT_MESSAGES:
        raise ProtocolError(CLOSE_POLICY, f"unknown message type {kind!r}; use one of {', '.join(CLIENT_MESSAGES)}")
    for name in CLIENT_MESSAGES[kind]:
        if not isinstance(message.get(name), str) or not message[name]:
            raise ProtocolError(CLOSE_BAD_DATA, f"{kind} message needs a non-empty string {name!r}")
    if kind == "dtmf" and message["digit"] not in DTMF_DIGITS:
        raise ProtocolError(CLOSE_BAD_DATA, f"dtmf digit must be one of 0-9 * # A-D, got {message['digit'][:8]!r}")
    return message


def close_reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    encoded = text.encode()
    return text if len(encoded) <= 123 else encoded[:120].decode(errors="ignore") + "..."
