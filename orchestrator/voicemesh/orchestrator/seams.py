"""The typed seams between a session's stages (typing.Protocol: any object of that shape fits).

- EventSink: where a stage sends a ConverseResponse for the caller (Session.emit).
- ReplySink: what a reply writes its audio and 'spoken' markers to: the Playout, or, for a
  speculative reply, a HeldSink in front of it (playout.HeldPlayout) that holds them until released.
- ServiceStream: a session-long VAD or STT stream (clients.SerialStream, mux.MultiplexedStream).
- TurnObserver: what watches the turn lifecycle (tracing, the recorder) instead of being
  called from the turn controller.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from voicemesh.orchestrator.turn_events import Turn
from voicemesh.v1 import orchestrator_pb2 as pb


class EventSink(Protocol):
    def __call__(self, message: pb.ConverseResponse, /) -> None: ...


class ReplySink(Protocol):
    def audio(self, message: pb.ConverseResponse, seconds: float, turn_number: int) -> None: ...

    def marker(self, fire: Callable[[], None]) -> None: ...

    async def room(self) -> None: ...  # returns when the sink can take more audio (backpressure)


class HeldSink(ReplySink, Protocol):
    released: asyncio.Event

    def release(self) -> None: ...


class ServiceStream(Protocol):
    async def write(self, message, urgent: bool = True) -> None: ...

    def __aiter__(self) -> AsyncIterator: ...

    def cancel(self) -> bool: ...

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...


class TurnObserver(Protocol):
    def turn_opened(self, turn: Turn) -> None:
        """A turn started."""

    def turn_finished(self, turn: Turn) -> None:
        """A turn is over for good (turn.ended_as is set)."""

    def said(self, role: str, text: str, interrupted: bool) -> None:
        """Words joined the context: the user's turn, or what the bot really spoke."""
