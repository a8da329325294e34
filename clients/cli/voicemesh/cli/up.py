"""`voicemesh up`: start every service locally as its own process, print where they are, and
supervise them until Ctrl-C (or SIGTERM/SIGHUP); `--chat` opens the typed chat once healthy."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time

from voicemesh.cli.commands import run_chat
from voicemesh.cli.mesh import (
    ALL_SERVICES, BACKENDS, DEFAULT_HTTP_PORT, DEFAULT_LOG_DIR, DEFAULT_PORTS, TRANSPORT, Child, Mesh, MeshError,
)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP take the same clean path as Ctrl-C


def _say(text: str) -> None:  # after a SIGHUP the terminal may be gone: the mesh must still stop
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


def _print_table(mesh: Mesh, seconds: float) -> None:
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
    print("Ctrl-C stops the mesh.", flush=True)


def _up(args: argparse.Namespace) -> int:
    services = (*ALL_SERVICES, TRANSPORT)
    ports = {kind: getattr(args, "port" if kind == "orchestrator" else f"{kind}_port") for kind in services}
    say = _say
    mesh = Mesh(ports=ports, host=args.host, log_dir=args.log_dir, ready_timeout=args.ready_timeout, progress=_say,
                services=services, http_port=args.http_port)
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
