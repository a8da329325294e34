"""One bootstrap for every service: grpc.aio on uvloop, health, reflection, drain.

Lifecycle of a process:
  1. bind and start serving at once, health NOT_SERVING (so probes answer while loading);
  2. `servicer.startup()` loads and warms the provider (or connects, for the orchestrator);
  3. health SERVING;
  4. on SIGTERM/SIGINT: health NOT_SERVING, new streams refused, open streams get
     `grace_seconds` to finish, then the provider is closed and the process exits.

A process started by `voicemesh up` (or the Mesh harness) also gets a lifeline: the read end
of a pipe whose only write end the supervisor holds (fd number in VOICEMESH_LIFELINE_FD). When
the supervisor dies, however it dies, the pipe reads EOF and the process stops as on SIGTERM,
so a killed supervisor leaves no service behind on its ports.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import signal
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from voicemesh.runtime import auth, telemetry, tls
from voicemesh.runtime.config import ServeSettings, grpc_server_options
from voicemesh.runtime.errors import MalformedRequests, Unavailable
from voicemesh.runtime.logs import setup_logging
from voicemesh.runtime.models import ModelSpec
from voicemesh.runtime.provider import Provider, ProviderInfo
from voicemesh.runtime.upstream import load_settings
from voicemesh.v1 import common_pb2

log = logging.getLogger("voicemesh.server")
VERSION = version("voicemesh-runtime")  # every voicemesh distribution carries the same version
LIFELINE_ENV = "VOICEMESH_LIFELINE_FD"  # set by voicemesh.cli.mesh, which holds the write end
LIFELINE_EXIT_MARGIN = 10.0  # after the supervisor's death: grace + this, then exit regardless


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
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        if err.name and err.name.startswith("voicemesh."):
            raise
        # Each provider's SDK is an extra of its service, named like the provider.
        raise SystemExit(f"the {name} {kind} provider needs its SDK: pip install 'voicemesh-{kind}[{name}]' "
                         f"(missing: {err.name or err})") from None


@dataclass(frozen=True)
class ServiceDefinition:
    kind: str
    service_name: str  # full proto name, used for health and reflection
    build: Callable[[ServeSettings], ServicerBase]  # makes the servicer (and its provider)
    register: Callable[[ServicerBase, grpc.aio.Server], None]
    models: tuple[ModelSpec, ...] = ()  # what `voicemesh-models setup <kind>` sets up (default providers)
    providers: dict[str, str] = field(default_factory=dict)  # provider name -> "module:Class"


def provider_service(
    kind: str, servicer_class: type[ServicerBase], pb2_module, service: str, providers: dict[str, str],
    models: tuple[ModelSpec, ...] = (),
) -> ServiceDefinition:
    """The definition of a service that runs one provider, chosen by --provider / env."""

    def build(settings: ServeSettings) -> ServicerBase:
        provider_class = load_provider_class(providers, settings.provider, kind)
        if provider_class.settings_class is None:
            return servicer_class(settings, provider_class())
        options = load_settings(kind, settings.provider, provider_class.settings_class, settings.provider_options)
        return servicer_class(settings, provider_class(options))

    grpc_module = importlib.import_module(pb2_module.__name__ + "_grpc")
    add_to_server = getattr(grpc_module, f"add_{service}Servicer_to_server")
    return ServiceDefinition(
        kind=kind,
        service_name=pb2_module.DESCRIPTOR.services_by_name[service].full_name,
        build=build,
        register=lambda servicer, server: add_to_server(servicer, server),
        models=models,
        providers=providers,
    )


def take_lifeline() -> int | None:
    """The supervisor's lifeline fd, if this process was given one. Taken once: the env var is
    cleared and the fd made non-inheritable, so subprocesses (espeak-ng) never hold it open."""
    raw = os.environ.pop(LIFELINE_ENV, None)
    if not raw:
        return None  # started by hand: no supervisor to follow
    try:
        fd = int(raw)
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(f"fd {fd} is not a pipe")
        os.set_inheritable(fd, False)
    except (ValueError, OSError) as err:
        log.warning("ignoring %s=%r: %s", LIFELINE_ENV, raw, err)
        return None
    return fd


def watch_lifeline(loop: asyncio.AbstractEventLoop, fd: int, gone: Callable[[], None]) -> None:
    """Call `gone` (once) when the supervisor is gone: the pipe reads EOF when its write end
    closes, which happens when the supervisor exits, however it exits."""

    def readable() -> None:
        try:
            if os.read(fd, 512):
                return  # nothing is ever written; ignore it if something is
        except OSError:
            pass
        loop.remove_reader(fd)
        gone()

    loop.add_reader(fd, readable)


def _orphaned(stop: asyncio.Event, grace_seconds: float) -> None:
    """The supervisor died: stop as on SIGTERM. Nobody is left to SIGKILL a stop that hangs
    (as the supervisor would), so a timer ends the process after the grace period and a margin."""
    log.warning("supervisor gone (lifeline closed); stopping")
    stop.set()
    seconds = grace_seconds + LIFELINE_EXIT_MARGIN
    timer = threading.Timer(seconds, _exit_now, (seconds,))
    timer.daemon = True
    timer.start()


def _exit_now(seconds: float) -> None:
    log.error("still stopping %.0f s after the supervisor died; exiting now", seconds)
    os._exit(1)


PROBE_TIMEOUT_S = 10.0  # a probe that takes longer counts as a failure
PROBE_FAILURES = 2  # failures in a row before a serving replica reports NOT_SERVING


async def _watch_provider(provider: Provider, set_health, interval_s: float, stop: asyncio.Event) -> None:
    """Health follows the remote provider: SERVING while its probe passes, NOT_SERVING (and one
    log line per change, with the reason) while it fails, so traffic goes to replicas that can
    answer and a pod with bad credentials never turns ready."""
    serving: bool | None = None
    failures = 0  # in a row
    while not stop.is_set():
        try:
            reason = await asyncio.wait_for(provider.probe(), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            reason = f"the provider did not answer its health probe within {PROBE_TIMEOUT_S:.0f} s"
        except Exception as err:  # noqa: BLE001 - any failure is a reason to stop serving
            reason = f"health probe failed: {err}"
        failures = 0 if reason is None else failures + 1
        # A serving replica turns NOT_SERVING only after PROBE_FAILURES failures in a row: every
        # replica probes the same remote endpoint, and one blip must not eject them all at once.
        if reason is None and serving is not True or reason is not None and (serving is None or
                                                                         serving and failures >= PROBE_FAILURES):
            serving = reason is None
            if serving:
                await set_health(health_pb2.HealthCheckResponse.SERVING)
                log.info("serving", extra={"provider": provider.name})
            else:
                await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                log.warning("provider unreachable, not serving: %s", reason, extra={"provider": provider.name})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def serve_async(definition: ServiceDefinition, settings: ServeSettings) -> int:
    lifeline = take_lifeline()  # first, before the provider can start any subprocess
    # Auth (docs/security.md): the API key check, on the kinds that have protected methods.
    interceptors = auth.server_interceptors(definition.kind, settings.api_keys_file, settings.host)
    # After auth: a unary request that is not valid protobuf gets INVALID_ARGUMENT, not UNKNOWN (errors.py).
    server = grpc.aio.server(options=grpc_server_options(settings), interceptors=[*interceptors, MalformedRequests()])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    servicer = definition.build(settings)
    info = servicer.provider_info()
    resource = {"voicemesh.provider": info.provider, "voicemesh.model": info.model, "service.version": VERSION}
    telemetry.setup(definition.kind, resource)
    definition.register(servicer, server)
    # A provider may serve RPCs of its own beside the service, on the same server (the fake STT's
    # control, which releases held finals inside this process): `rpc_handlers()`, optional.
    extra_handlers = getattr(servicer.provider, "rpc_handlers", None)
    if extra_handlers is not None:
        server.add_generic_rpc_handlers(tuple(extra_handlers()))
    reflection.enable_server_reflection(
        (definition.service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )

    async def set_health(status: int) -> None:
        await health_servicer.set("", status)
        await health_servicer.set(definition.service_name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    # TLS (mTLS with a client CA) when a certificate is set; plaintext otherwise, as before.
    credentials = tls.server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    if credentials is not None:
        port = server.add_secure_port(settings.address, credentials)
    else:
        port = server.add_insecure_port(settings.address)
    if port == 0:
        log.error("could not bind %s (in use?)", settings.address)
        return 2
    health_server = await _health_only_server(settings, health_servicer)
    if health_server is False:
        return 2
    await server.start()
    log.info("listening", extra={"address": f"{settings.host}:{port}", "provider": settings.provider,
                                 "tls": "off" if credentials is None else "mtls" if settings.tls_client_ca_file else "tls",
                                 "api_keys": bool(interceptors)})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if lifeline is not None:
        watch_lifeline(loop, lifeline, lambda: _orphaned(stop, settings.grace_seconds))

    startup = asyncio.create_task(servicer.startup())
    done, _ = await asyncio.wait({startup, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if startup in done and startup.exception() is None:
        # Everything alive now (modules, models) lives as long as the process: move it out of
        # the collector's reach, or every full collection rescans ~40k objects (a ~10 ms pause
        # that lands in some turn's latency).
        gc.collect()
        gc.freeze()
        watcher = None
        if servicer.provider is not None and type(servicer.provider).probe is not Provider.probe:
            watcher = asyncio.create_task(_watch_provider(servicer.provider, set_health, settings.probe_seconds, stop))
        else:
            await set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("serving", extra={"service": definition.service_name})
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
    elif startup in done:
        log.error("startup failed: %s", startup.exception(), exc_info=startup.exception())
        exit_code = 1
    else:
        startup.cancel()

    log.info("draining", extra={"grace_seconds": settings.grace_seconds})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_seconds)
    if health_server is not None:
        await health_server.stop(0)
    await servicer.shutdown()
    telemetry.shutdown()  # spans and metrics of the drained streams leave before the exit
    log.info("stopped")
    return exit_code


async def _health_only_server(settings: ServeSettings, health_servicer) -> grpc.aio.Server | None | bool:
    """gRPC health alone, plaintext, on `health_port`: the kubelet's gRPC probe speaks no TLS, and
    health says only SERVING or not. None when no port is set; False when it cannot bind."""
    if not settings.health_port:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{settings.host}:{settings.health_port}") == 0:
        log.error("could not bind the health port %s:%d (in use?)", settings.host, settings.health_port)
        return False
    await server.start()
    return server


def run(definition: ServiceDefinition, settings: ServeSettings) -> int:
    setup_logging(definition.kind, settings.log_level, settings.log_format)
    return uvloop.run(serve_async(definition, settings))
