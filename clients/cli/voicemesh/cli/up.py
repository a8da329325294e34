"""`voicemesh up`: start every service locally as its own process, print where they are, and
supervise them until Ctrl-C (or SIGTERM/SIGHUP); `--chat` opens the typed chat once healthy.

The services take their TLS settings from the environment `up` runs in (docs/security.md:
`VOICEMESH_TLS_CERT_FILE` or `VOICEMESH_<KIND>_TLS_CERT_FILE`, ...), so the health probes read
the same: a service that serves TLS is probed over TLS, with the client settings of the hop
that reaches it (`VOICEMESH_BACKEND_TLS_*` for a backend, as the orchestrator does, and
`VOICEMESH_CLIENT_TLS_*` for the orchestrator and the transport, as `talk` and `chat` do)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time

import grpc

from voicemesh.cli.commands import run_chat
from voicemesh.cli.mesh import (
    ALL_SERVICES, BACKENDS, DEFAULT_HTTP_PORT, DEFAULT_LOG_DIR, DEFAULT_PORTS, PROBE_OPTIONS, TRANSPORT, Child, Mesh,
    MeshError,
)
from voicemesh.runtime.config import ServeSettings
from voicemesh.runtime.tls import BACKEND_PREFIX, CLIENT_PREFIX, ChannelTls

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP take the same clean path as Ctrl-C


def _say(text: str) -> None:  # after a SIGHUP the terminal may be gone: the mesh must still stop
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


Probe = tuple[grpc.ChannelCredentials, list]  # a TLS probe's credentials and channel options


def tls_probe(kind: str) -> Probe | None:
    """How to reach `kind` for its health: None (plaintext) when it serves no TLS, else TLS with
    the client settings of the hop that reaches it. MeshError, before anything starts, when those
    cannot work: unreadable files, or mTLS required and that hop has no client certificate."""
    served = ServeSettings.load(kind)
    if not served.tls_cert_file:
        return None
    prefix = BACKEND_PREFIX if kind in BACKENDS else CLIENT_PREFIX
    tls = ChannelTls.from_env(prefix)
    if served.tls_client_ca_file and not tls.cert_file:
        caller = "the orchestrator" if kind in BACKENDS else "talk, chat and the health probe"
        raise MeshError(f"{kind} requires client certificates (tls_client_ca_file), but {prefix}_TLS_CERT_FILE and "
                        f"_KEY_FILE are unset: {caller} would be refused")
    try:
        return tls.credentials(), tls.options()
    except SystemExit as err:  # ChannelTls's message names the file and what is wrong
        raise MeshError(f"probing {kind} with {prefix}_TLS_*: {err}") from None


class TlsProbedMesh(Mesh):
    """A Mesh whose health probes speak TLS to the services that serve it (see tls_probe)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tls_probes = {kind: tls_probe(kind) for kind in self.children}

    def probe_channel(self, child: Child) -> grpc.Channel:
        probe = self.tls_probes.get(child.kind)
        if probe is None:
            return grpc.insecure_channel(child.address, options=PROBE_OPTIONS)
        credentials, options = probe
        return grpc.secure_channel(child.address, credentials, options=[*PROBE_OPTIONS, *options])

    def fresh_probe_channel(self, child: Child) -> bool:
        # A sync TLS channel whose first connects were refused (the service not listening yet)
        # never connects afterwards, with gRPC's event-engine poller off (voicemesh.runtime.grpc_env).
        return self.tls_probes.get(child.kind) is not None


def _print_table(mesh: TlsProbedMesh, seconds: float) -> None:
    print(f"voicemesh is up ({seconds:.1f} s)")
    print(f"  {'service':13} {'address':21} {'pid':>7}  log")
    for child in mesh.children.values():
        print(f"  {child.kind:13} {child.address:21} {child.process.pid:>7}  {child.log_path}")
    addr = mesh.orchestrator_address
    flag = "" if addr == f"127.0.0.1:{DEFAULT_PORTS['orchestrator']}" else f" --addr {addr}"
    if TRANSPORT in mesh.children:
        host = mesh.children[TRANSPORT].address.rsplit(":", 1)[0]
        print(f"page (browser, WebRTC/WebSocket): http://{host}:{mesh.http_port}")
    print(f"next:\n  voicemesh talk tests/fixtures/question_capital.wav{flag}\n  voicemesh chat{flag}")
    if mesh.tls_probes.get("orchestrator") is not None:
        print(f"  (the orchestrator serves TLS: talk and chat connect with {CLIENT_PREFIX}_TLS_*)")
    print("Ctrl-C stops the mesh.", flush=True)


def _up(args: argparse.Namespace) -> int:
    services = (*ALL_SERVICES, TRANSPORT)
    ports = {kind: getattr(args, "port" if kind == "orchestrator" else f"{kind}_port") for kind in services}
    say = _say
    try:
        mesh = TlsProbedMesh(ports=ports, host=args.host, log_dir=args.log_dir, ready_timeout=args.ready_timeout,
                             progress=_say, services=services, http_port=args.http_port)
    except MeshError as err:
        say(f"error: {err}")
        return 1
    # SIGINT too, explicitly: started in the background by a shell without job control (a
    # script), a process inherits SIGINT ignored, and Python then installs no handler for it.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_interrupt)
    crashed: list[Child] = []
    code = 0
    try:
        began = time.monotonic()
        mesh.start()
        _print_table(mesh, time.monotonic() - began)
        if not args.chat:
            crashed.append(mesh.wait())
        else:
            abort = threading.Event()

            def watch() -> None:  # a crash mid-chat ends the REPL at once
                if (child := mesh.wait()) is not None:
                    crashed.append(child)
                    abort.set()

            threading.Thread(target=watch, name="mesh-watch", daemon=True).start()
            code = run_chat(mesh.orchestrator_address, abort=abort)
            crashed.append(mesh.exited())  # the chat may have seen the crash first
        if crashed[0] is not None:
            say(f"error: {crashed[0].describe_exit()}")
            code = 1
    except MeshError as err:
        say(f"error: {err}")
        code = 1
    except KeyboardInterrupt:
        pass
    finally:
        say("stopping the mesh")
        mesh.stop()
    return code


def add_parser(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run every service locally as its own process, and supervise them")
    up.add_argument("--host", default="127.0.0.1", help="address every service binds")
    up.add_argument("--port", type=int, default=DEFAULT_PORTS["orchestrator"], help="orchestrator port")
    for kind in (*BACKENDS, TRANSPORT):
        up.add_argument(f"--{kind}-port", type=int, default=DEFAULT_PORTS[kind], help=f"{kind} service port (gRPC)")
    up.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="the transport's page and WebSockets")
    up.add_argument("--chat", action="store_true", help="once healthy, chat with the mesh here; stop it after")
    up.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="where each service's log goes")
    up.add_argument("--ready-timeout", type=float, default=180.0, help="seconds each phase may take to be healthy")
    up.set_defaults(handler=_up)
