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
    """Base for all providers: load once, describe yourself, release on shutdown.

    A provider with settings names their dataclass in `settings_class` and takes an instance
    as its one constructor argument: the runtime fills it from VOICEMESH_<KIND>_<FIELD> env
    vars and `--<field>` flags (voicemesh.runtime.upstream.load_settings).
    """

    name: str = "unnamed"
    settings_class: type | None = None

    @abc.abstractmethod
    async def load(self) -> None:
        """Load the model and warm it up. Must not block the event loop (use a thread)."""

    @abc.abstractmethod
    def info(self) -> ProviderInfo:
        """Provider, model and supported formats, for the Info RPC and resource attributes."""

    async def probe(self) -> str | None:
        """Whether the provider can serve now: None if so, else why not (a remote provider checks
        it is reachable and accepts its credentials). The runtime calls it after load() and then
        periodically, and reports health NOT_SERVING while it fails. Must be cheap and bounded
        in time; embedded providers keep this default."""
        return None

    async def close(self) -> None:
        """Release native resources. Called once at shutdown."""
