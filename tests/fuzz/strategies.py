"""Hypothesis strategies built from the protobuf descriptors, and the request sequences of each RPC.

`wild(descriptor)` walks `DESCRIPTOR.fields`: every scalar by its type with its edge values
(NaN, infinities, integer limits, empty and long strings, odd-length bytes), enums including
numbers the contract does not define, nested messages (depth-limited), repeated and map fields,
oneofs (one member or none) and proto3 `optional` fields (set or unset). `valid(descriptor)` is
the same walk with HINTS: the values a correct client would send for some fields (a format the
services take, PCM16 audio of a sane length, a known chat role), the rest left wild, so the
messages are valid or close to it ("half-valid"). `garbage()` is bytes that are not a message
of the type, or are one cut short, or with a byte flipped: the server's protobuf parser sees them.

Every sequence is a list of wire payloads (bytes), sent as they are over a generic call.
"""
from __future__ import annotations

import math

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

from voicemesh.v1 import common_pb2

MAX_DEPTH = 3
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32, UINT64 = (0, 2**32 - 1), (0, 2**64 - 1)
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan)
# Strings: empty, blank, control characters, markdown and emoji (TTS strips them), very long.
STRING_EDGES = ("", " ", "\x00", "\n\t", "**bold** `code` # head", "😀🎉", "a" * 4096, "Hello. How are you? Fine!")


def _ints(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = sorted(v for v in (low, high, -1, 0, 1, 7, 16000, 48000, 96000) if low <= v <= high)
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _scalar(field: F) -> st.SearchStrategy:
    t = field.type
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        width = 32 if t == F.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=width, allow_nan=True, allow_infinity=True))
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return _ints(INT32)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _ints(INT64)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return _ints(UINT32)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return _ints(UINT64)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(st.sampled_from(STRING_EDGES), st.text(max_size=64))
    if t == F.TYPE_BYTES:
        return st.one_of(st.sampled_from((b"", b"\x00", b"\x00" * 321, b"\x00\x00" * 17000)), st.binary(max_size=640))
    if t == F.TYPE_ENUM:  # the defined numbers, and numbers a newer (or broken) client might send
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), _ints(INT32))
    raise TypeError(f"no strategy for {field.full_name} (type {t})")


def _value(field: F, depth: int, hints: dict, sparse: bool = False) -> st.SearchStrategy:
    if field.full_name in hints:
        return hints[field.full_name]
    if field.type == F.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1, hints, sparse)
    return _scalar(field)


def _is_map(field: F) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _message(descriptor, depth: int, hints: dict, sparse: bool = False) -> st.SearchStrategy:
    """`sparse` (valid mode): a field without a hint is set one time in four, so most messages
    are valid and the wild fields, when present, are few (each still any value of its type)."""
    cls = _message_class(descriptor)
    unhinted = st.sampled_from([True, False, False, False]) if sparse else st.booleans()

    @st.composite
    def build(draw):
        message = cls()
        if depth > MAX_DEPTH:
            return message
        for oneof in descriptor.oneofs:  # real oneofs and proto3 `optional` (synthetic, one member)
            hinted = [f for f in oneof.fields if f.full_name in hints]
            chosen = draw(st.sampled_from(hinted if hinted and len(oneof.fields) == 1 else [None, *oneof.fields]))
            if chosen is not None and (chosen.full_name in hints or not sparse or draw(unhinted)):
                _assign(message, chosen, draw(_value(chosen, depth, hints, sparse)))
        for field in descriptor.fields:
            if field.containing_oneof is not None:
                continue
            if field.full_name not in hints and not draw(unhinted):
                continue
            if _is_map(field):
                key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                entries = draw(st.dictionaries(_scalar(key_f), _value(value_f, depth, hints, sparse), max_size=3))
                getattr(message, field.name).update(entries)
            elif field.is_repeated:  # a hint for a repeated field draws the whole list
                values = hints.get(field.full_name, None)
                if values is None:
                    values = st.lists(_value(field, depth, hints, sparse), max_size=3 if depth else 6)
                getattr(message, field.name).extend(draw(values))
            else:
                _assign(message, field, draw(_value(field, depth, hints, sparse)))
        return message

    return build()


def _assign(message, field: F, value) -> None:
    if field.type == F.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _message_class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def wild(descriptor) -> st.SearchStrategy:
    """Any message of this type the wire can carry: every field at any value of its type."""
    return _message(descriptor, 0, {})


def valid(descriptor, hints: dict) -> st.SearchStrategy:
    """The same walk with `hints` (field full name -> strategy) for the fields a correct client sets right."""
    return _message(descriptor, 0, hints, sparse=True)


def garbage(example: st.SearchStrategy | None = None) -> st.SearchStrategy[bytes]:
    """Bytes that are not a well-formed message: random, a valid one cut short, or with a byte changed."""
    options = [st.binary(min_size=1, max_size=64),
               st.sampled_from((b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05\x12\x03\xff\xfe\xfd", b"\x08" * 11))]
    if example is not None:
        serialized = example.map(lambda m: m.SerializeToString()).filter(lambda b: len(b) > 1)
        options.append(st.tuples(serialized, st.integers(1, 1 << 16)).map(lambda pair: pair[0][: pair[1] % len(pair[0])]))
        options.append(st.tuples(serialized, st.integers(0, 1 << 16), st.integers(0, 255)).map(
            lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]))
    return st.one_of(options)


# ---- what a correct client sends ----------------------------------------------------------

def pcm16(min_ms: int = 20, max_ms: int = 100, rate: int = 16000) -> st.SearchStrategy[bytes]:
    """PCM16 audio: silence, noise or a loud square wave (speech to the fakes), 20-100 ms."""
    samples = st.integers(rate * min_ms // 1000, rate * max_ms // 1000)
    loud = samples.map(lambda n: (b"\x00\x40" * 8 + b"\x00\xc0" * 8) * (n // 16) + b"\x00\x00" * (n % 16))
    noise = samples.flatmap(lambda n: st.binary(min_size=2 * n, max_size=2 * n))
    return st.one_of(samples.map(lambda n: b"\x00\x00" * n), loud, noise)


FORMAT_HINTS = {
    "voicemesh.v1.AudioFormat.encoding": st.sampled_from([common_pb2.AUDIO_ENCODING_PCM16, common_pb2.AUDIO_ENCODING_MULAW]),
    "voicemesh.v1.AudioFormat.sample_rate_hz": st.sampled_from([8000, 16000, 24000, 44100, 48000]),
    "voicemesh.v1.AudioFormat.channels": st.sampled_from([0, 1]),
    "voicemesh.v1.AudioChunk.data": pcm16(),
}
TEXTS = ("Hello there.", "What is the weather in Paris and London?", "count messages", "what did you say", "long story",
         "Tell me *something* with `code` 😀.", "one two three four five six")
TEXT = st.one_of(st.sampled_from(TEXTS), st.text(min_size=1, max_size=80))


def one_of_payloads(*strategies: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Each strategy draws messages (serialized here) or bytes (sent as they are)."""
    return st.one_of(*strategies).map(lambda m: m if isinstance(m, bytes) else m.SerializeToString())


def rpc_sequence(request_cls, valid_first, valid_rest, max_rest: int = 12, last=None) -> st.SearchStrategy[list[bytes]]:
    """A request stream (then the half-close): empty; valid (the first message, then the others,
    and `last` half the time); half-valid (a valid stream with one message replaced by a wild
    message of the type or by garbage); or a mix of all three at every position."""
    any_message = wild(request_cls.DESCRIPTOR)
    bad = one_of_payloads(any_message, garbage(valid_first), garbage(valid_rest))
    tail = st.just([]) if last is None else st.sampled_from([[], [last]])
    valid_stream = st.tuples(one_of_payloads(valid_first), st.lists(one_of_payloads(valid_rest), max_size=max_rest), tail).map(
        lambda t: [t[0], *t[1], *(m.SerializeToString() for m in t[2])])
    half = st.tuples(valid_stream, st.integers(0, 1 << 10), bad).map(lambda t: _replace(t[0], t[1], t[2]))
    mixed_rest = st.lists(one_of_payloads(valid_rest, valid_rest, any_message) | garbage(valid_rest), max_size=max_rest)
    mixed = st.tuples(one_of_payloads(valid_first, any_message) | garbage(valid_first), mixed_rest).map(
        lambda pair: [pair[0], *pair[1]])
    return st.one_of(st.just([]), valid_stream, valid_stream, half, half, mixed)


def _replace(payloads: list[bytes], index: int, bad: bytes) -> list[bytes]:
    out = list(payloads)
    out[index % len(out)] = bad
    return out
