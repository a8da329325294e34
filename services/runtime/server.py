"""One bootstrap for every service: grpc.aio on uvloop, health, reflection, drain.

Lifecycle of a process:
  1. bind and start serving at once, health NOT_SERVING (so probes answer while loading);
  2. `servicer.startup()` loads and warms the provider (or connects, for the orchestrator);
  3. health SERVING;
  4. on SIGTERM/SIGINT: health NOT_SERVING, new streams refused, open streams get
     `grace_seconds` to finish, then the provider is closed and the process exits.
"""
from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from voicemesh.runtime import telemetry
from voicemesh.runtime.config import ServeSettings, grpc_server_options
from voicemesh.runtime.errors import Unavailable
from voicemesh.runtime.logs import setup_logging
from voicemesh.runtime.provider import Provider, ProviderInfo
from voicemesh.v1 import common_pb2

log = logging.getLogger("voicemesh.server")
VERSION = "0.1.0"


class ServicerBase:
    """Lifecycle shared by every servicer. Subclasses also inherit their generated *Servicer."""

    kind = "service"

    def __init__(self, settings: ServeSettings, provider: Provider | None = None):
        self.settings = settings
        self.provider = provider
        self.ready = False

    async def startup(self) -> None:
        if self.provider is not None:
            await self.provider.load()
        self.ready = True

    async def shutdown(self) -> None:
        if self.provider is not None:
            await self.provider.close()

    def require_ready(self) -> None:
        if not self.ready:
            raise Unavailable(f"the {self.kind} service is still loading its model; retry when health is SERVING")

    def provider_info(self) -> ProviderInfo:
        assert self.provider is not None
        return self.provider.info()

    def service_info(self, input_rates: tuple[int, ...] = (), output_rates: tuple[int, ...] = ()) -> common_pb2.ServiceInfo:
        info = self.provider_info()
        message = common_pb2.ServiceInfo(
            service=self.kind, provider=info.provider, model=info.model, version=VERSION, details=info.details
        )
        for encoding in (common_pb2.AUDIO_ENCODING_PCM16, common_pb2.AUDIO_ENCODING_MULAW):
            for rate in input_rates:
                message.input_formats.add(encoding=encoding, sample_rate_hz=rate, channels=1)
            for rate in output_rates:
                message.output_formats.add(encoding=encoding, sample_rate_hz=rate, channels=1)
        return message


def load_provider_class(providers: dict[str, str], name: str, kind: str) -> type[Provider]:
    """Import a provider lazily, so a process only loads the SDK of the provider it runs."""
    if name not in providers:
        raise SystemExit(f"unknown {kind} provider {name!r}; choose one of: {', '.join(sorted(providers))}")
    module, _, attr = providers[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ServiceDefinition:
    kind: str
    service_name: str  # full proto name, used for health and reflection
    build: Callable[[ServeSettings], ServicerBase]  # makes the servicer (and its provider)
    register: Callable[[ServicerBase, grpc.aio.Server], None]


def provider_service(
    kind: str, servicer_class: type[ServicerBase], pb2_module, service: str, providers: dict[str, str]
) -> ServiceDefinition:
    """The definition of a service that runs one provider, chosen by --provider / env."""

    def build(settings: ServeSettings) -> ServicerBase:
        return servicer_class(settings, load_provider_class(providers, settings.provider, kind)())

    grpc_module = importlib.import_module(pb2_module.__name__ + "_grpc")
    add_to_server = getattr(grpc_module, f"add_{service}Servicer_to_server")
    return ServiceDefinition(
        kind=kind,
        service_name=pb2_module.DESCRIPTOR.services_by_name[service].full_name,
        build=build,
        register=lambda servicer, server: add_to_server(servicer, server),
    )


async def serve_async(definition: ServiceDefinition, settings: ServeSettings) -> int:
    server = grpc.aio.server(options=grpc_server_options(settings))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    servicer = definition.build(settings)
    info = servicer.provider_info()
    telemetry.setup(definition.kind, {"voicemesh.provider": info.provider, "voicemesh.model": info.model, "service.version": VERSION})
    definition.register(servicer, server)
    reflection.enable_server_reflection(
        (definition.service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )

    async def set_health(status: int) -> None:
        await health_servicer.set("", status)
        await health_servicer.set(definition.service_name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(settings.address)
    if port == 0:
        log.error("could not bind %s (in use?)", settings.address)
        return 2
    await server.start()
    log.info("listening", extra={"address": f"{settings.host}:{port}", "provider": settings.provider})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    startup = asyncio.create_task(servicer.startup())
    done, _ = await asyncio.wait({startup, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if startup in done and startup.exception() is None:
        # Everything alive now (modules, models) lives as long as the process: move it out of
        # the collector's reach, or every full collection rescans ~40k objects (a ~10 ms pause
        # that lands in some turn's latency).
        gc.collect()
        gc.freeze()
        await set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"service": definition.service_name})
        await stop.wait()
    elif startup in done:
        log.error("startup failed: %s", startup.exception(), exc_info=startup.exception())
        exit_code = 1
    else:
        startup.cancel()

    log.info("draining", extra={"grace_seconds": settings.grace_seconds})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_seconds)
    await servicer.shutdown()
    telemetry.shutdown()  # spans and metrics of the drained streams leave before the exit
    log.info("stopped")
    return exit_code


def run(definition: ServiceDefinition, settings: ServeSettings) -> int:
    setup_logging(definition.kind, settings.log_level, settings.log_format)
    return uvloop.run(serve_async(definition, settings))
