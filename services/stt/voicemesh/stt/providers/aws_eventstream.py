"""Encoding of AWS event-stream messages (application/vnd.amazon.eventstream).

botocore only decodes them (`botocore.eventstream.EventStreamBuffer`); Transcribe's WebSocket
API needs the client to encode its AudioEvents. A message is: prelude (total length, headers
length: two big-endian u32) + CRC32 of the prelude, the headers, the payload, and the CRC32
of everything before it. Only string headers (type 7) are used by these APIs.
"""
from __future__ import annotations

import json
import struct
import zlib

STRING_HEADER = 7


def encode_headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        out += struct.pack("!B", len(raw_name)) + raw_name
        out += struct.pack("!BH", STRING_HEADER, len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message with string `headers` and `payload`."""
    raw_headers = encode_headers(headers)
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(raw_headers))
    body = prelude + struct.pack("!I", zlib.crc32(prelude)) + raw_headers + payload
    return body + struct.pack("!I", zlib.crc32(body))


def event(event_type: str, payload: bytes, content_type: str = "application/octet-stream") -> bytes:
    """An event message (`:message-type: event`), as clients and servers send them."""
    return encode_message(
        {":message-type": "event", ":event-type": event_type, ":content-type": content_type}, payload
    )


def exception(exception_type: str, message: str) -> bytes:
    """An in-stream exception message, as AWS services send them."""
    return encode_message(
        {":message-type": "exception", ":exception-type": exception_type, ":content-type": "application/json"},
        json.dumps({"Message": message}).encode(),
    )
