"""The contract every provider shares, whatever the service kind.

A provider is one implementation of one service kind (whisper for stt, hibari for tts, ...).
A process runs exactly one. The runtime calls `load()` once before reporting SERVING, so
model loading and warm-up happen there; everything else is per stream.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProviderInfo:
    """What the Info RPC reports about the running provider."""

    provider: str
    model: str
    sample_rates_hz: tuple[int, ...] = ()
    details: dict[str, str] = field(default_factory=dict)


class Provider(abc.ABC):
    """Base for all providers: load once, describe yourself, release on shutdown."""

    name: str = "unnamed"

    @abc.abstractmethod
    async def load(self) -> None:
        """Load the model and warm it up. Must not block the event loop (use a thread)."""

    @abc.abstractmethod
    def info(self) -> ProviderInfo:
        """Provider, model and supported formats, for the Info RPC and resource attributes."""

    async def close(self) -> None:
        """Release native resources. Called once at shutdown."""
