"""One long-lived channel per downstream service, shared by every session."""
from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc

from voicemesh.orchestrator.mux import StreamMultiplexer
from voicemesh.runtime.config import DEFAULT_PORTS, grpc_channel_options
from voicemesh.runtime.tls import BACKEND_PREFIX, ChannelTls, aio_channel
from voicemesh.v1 import llm_pb2, llm_pb2_grpc, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc, vad_pb2, vad_pb2_grpc

log = logging.getLogger("voicemesh.orchestrator")
SERVICE_KINDS = ("vad", "stt", "llm", "tts")
INFO_TTL_S = 30.0  # a cached Info answer is asked again after this (and at once when a config misses it)
INFO_RETRY_S = 5.0  # an Info that failed is not asked again sooner: a hung backend must not slow every session's start
INFO_TIMEOUT_S = 2.0
VAD_MULTIPLEX_ENV = "VOICEMESH_VAD_MULTIPLEX"  # DetectMany calls per orchestrator; 0: one Detect call per session


def service_address(kind: str) -> str:
    """VOICEMESH_<KIND>_ADDR, else the service's default port on loopback."""
    return os.environ.get(f"VOICEMESH_{kind.upper()}_ADDR") or f"127.0.0.1:{DEFAULT_PORTS[kind]}"


class ServiceClients:
    def __init__(self, addresses: dict[str, str] | None = None):
        self.addresses = addresses or {kind: service_address(kind) for kind in SERVICE_KINDS}
        # TLS (mTLS with a client certificate) when VOICEMESH_BACKEND_TLS_* is set (voicemesh.runtime.tls).
        self.tls = ChannelTls.from_env(BACKEND_PREFIX)
        self.channels = {
            kind: aio_channel(address, grpc_channel_options(), self.tls) for kind, address in self.addresses.items()
        }
        self.vad = vad_pb2_grpc.VadServiceStub(self.channels["vad"])
        self.stt = stt_pb2_grpc.SttServiceStub(self.channels["stt"])
        self.llm = llm_pb2_grpc.LlmServiceStub(self.channels["llm"])
        self.tts = tts_pb2_grpc.TtsServiceStub(self.channels["tts"])
        # Every session's VAD stream rides on one of these calls (see orchestrator.mux);
        # more than one lets a VAD deployment with several replicas share the sessions.
        self.info_cache = InfoCache({"stt": lambda: self.stt.Info(stt_pb2.SttServiceInfoRequest(), timeout=INFO_TIMEOUT_S),
                                     "tts": lambda: self.tts.Info(tts_pb2.TtsServiceInfoRequest(), timeout=INFO_TIMEOUT_S)})
        self.vad_multiplexers = [
            StreamMultiplexer(self.vad.DetectMany, vad_pb2.DetectManyRequest, vad_pb2.DetectStreamMessage, "vad")
            for _ in range(_multiplex_calls())
        ]

    def open_vad_stream(self):
        """A session's VAD stream: on the least busy multiplexed call, or a Detect call of its own."""
        if not self.vad_multiplexers:
            return SerialStream(self.vad.Detect())
        return min(self.vad_multiplexers, key=lambda mux: mux.open_streams).open()

    async def info(self, kind: str, older_than: float | None = None):
        """The `kind` service's Info answer, cached per endpoint (None: it could not be fetched) and
        when it was fetched; `older_than`: refresh it if it was fetched then or before (a miss)."""
        return await self.info_cache.get(kind, self.addresses[kind], older_than)

    async def infos(self, timeout: float = 2.0) -> list:
        """What each service reports; unreachable ones are skipped."""
        calls = (
            self.vad.Info(vad_pb2.VadServiceInfoRequest(), timeout=timeout),
            self.stt.Info(stt_pb2.SttServiceInfoRequest(), timeout=timeout),
            self.llm.Info(llm_pb2.LlmServiceInfoRequest(), timeout=timeout),
            self.tts.Info(tts_pb2.TtsServiceInfoRequest(), timeout=timeout),
        )
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [result.info for result in results if not isinstance(result, BaseException)]

    async def close(self) -> None:
        await asyncio.gather(*(mux.close() for mux in self.vad_multiplexers))
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))


class InfoCache:
    """Info answers per (service kind, endpoint): what the config checks compare a session's voice
    and language with (config.check_against_backends). One fetch at a time per endpoint: the
    sessions that start meanwhile wait for it instead of each asking."""

    def __init__(self, fetchers: dict, clock=time.monotonic):
        self._fetchers, self._clock = fetchers, clock
        self._entries: dict[tuple[str, str], tuple[float, object]] = {}  # key -> (fetched at, answer or None)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, kind: str, address: str, older_than: float | None = None) -> tuple[object, float]:
        key = (kind, address)
        async with self._locks.setdefault(key, asyncio.Lock()):
            entry = self._entries.get(key)
            if entry is not None:
                fetched_at, answer = entry
                age = self._clock() - fetched_at
                stale = age >= (INFO_TTL_S if answer is not None else INFO_RETRY_S)
                missed = older_than is not None and answer is not None and fetched_at <= older_than
                if not (stale or missed):
                    return answer, fetched_at
            try:
                answer = await self._fetchers[kind]()
            except (grpc.aio.AioRpcError, asyncio.TimeoutError) as err:
                code = err.code().name if isinstance(err, grpc.aio.AioRpcError) else "DEADLINE_EXCEEDED"
                log.warning("the %s service's Info at %s failed (%s); its voices and languages are not checked", kind,
                            address, code)
                answer = None
            self._entries[key] = (self._clock(), answer)
            return answer, self._entries[key][0]


def _multiplex_calls() -> int:
    raw = os.environ.get(VAD_MULTIPLEX_ENV, "1")
    if not raw.isdigit() or int(raw) > 64:
        raise ValueError(f"{VAD_MULTIPLEX_ENV}={raw!r}: expected a number of calls from 0 (one Detect call per session) to 64")
    return int(raw)


class SerialStream:
    """A bidi call that several tasks write to (audio, turn starts, finalize).

    grpc.aio allows one write in flight per call; a second concurrent write fails inside
    Core and ends the call with INTERNAL. Writes here queue on a lock instead. Reading and
    cancelling go to the call itself."""

    def __init__(self, call):
        self.call = call
        self._lock = asyncio.Lock()

    async def write(self, message, urgent: bool = True) -> None:
        """`urgent` matters to multiplexed streams only (orchestrator.mux); a call of its own sends at once."""
        async with self._lock:
            await self.call.write(message)

    def __aiter__(self):
        return self.call.__aiter__()

    def cancel(self) -> bool:
        return self.call.cancel()

    def done(self) -> bool:
        return self.call.done()

    def cancelled(self) -> bool:
        return self.call.cancelled()
