"""The connection to the orchestrator's public API (`OrchestratorService/Converse`): where it
is, how the channel is set up, and the first message of a session.

Depends only on grpcio and the generated stubs, so a client installs without any service.
"""
from __future__ import annotations

import asyncio
import os

import grpc

from voicemesh.v1 import common_pb2, orchestrator_pb2

ADDR_ENV = "VOICEMESH_ORCHESTRATOR_ADDR"
INPUT_RATE_HZ = 16000
OUTPUT_RATE_HZ = 24000
DEFAULT_PORT = 50051  # the orchestrator's default port (voicemesh.runtime.config.DEFAULT_PORTS)
MAX_MESSAGE_BYTES = 4 << 20
# Keepalive matches the servers' (20 s ping, 10 s to answer), so a dead peer is seen in 30 s.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 1),
]
pb = orchestrator_pb2
END_REQUEST = pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession()))
# Errors that mean the call is over (or was never usable): stop writing, the reader reports why.
WRITE_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


def default_addr() -> str:
    return os.environ.get(ADDR_ENV) or f"127.0.0.1:{DEFAULT_PORT}"


def open_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)


def config_request(
    system_prompt: str = "", voice: str = "", session_id: str = "", client: str = "voicemesh"
) -> orchestrator_pb2.ConverseRequest:
    """The first Converse message: PCM16 16 kHz mono in, PCM16 24 kHz mono out. An empty
    system prompt or voice leaves the choice to the orchestrator and the TTS."""
    pcm16 = common_pb2.AUDIO_ENCODING_PCM16
    return pb.ConverseRequest(
        config=pb.SessionConfig(
            session_id=session_id,
            system_prompt=system_prompt,
            voice=voice,
            input_format=common_pb2.AudioFormat(encoding=pcm16, sample_rate_hz=INPUT_RATE_HZ, channels=1),
            output_format=common_pb2.AudioFormat(encoding=pcm16, sample_rate_hz=OUTPUT_RATE_HZ, channels=1),
            interim_transcripts=True,
            metadata={"client": client},
        )
    )


async def wait_event(event: asyncio.Event, other: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` unless `other` (the stream ending) comes first or time runs out."""
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(other.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
    return event.is_set()


