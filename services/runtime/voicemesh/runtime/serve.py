"""`voicemesh-serve <kind>`: run one service in this process (the entry point of every image).

The runtime knows no service: each service distribution registers its ServiceDefinition in the
`voicemesh.services` entry-point group (`stt = voicemesh.stt.service:DEFINITION`), so an
environment that installs only the STT can serve only the STT, and a new service kind needs
no change here.
"""
from __future__ import annotations

import voicemesh.runtime.grpc_env  # noqa: F401 - first: it sets gRPC's options before grpc loads

import argparse
import os
import sys
from dataclasses import fields
from importlib.metadata import entry_points

from voicemesh.runtime.config import ServeSettings

SERVICES_GROUP = "voicemesh.services"


def installed_services() -> dict[str, object]:
    """Service kind -> its entry point, for every service installed in this environment."""
    return {point.name: point for point in entry_points(group=SERVICES_GROUP)}


def load_definition(kind: str):
    """The ServiceDefinition of an installed service; a clear error when it is not installed."""
    points = installed_services()
    if kind not in points:
        have = ", ".join(sorted(points)) or "none"
        raise SystemExit(f"voicemesh-serve: no service {kind!r} in this environment (installed: {have}); "
                         f"install voicemesh-{kind}")
    return points[kind].load()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`kind` plus one flag per ServeSettings field (shared with `voicemesh serve`)."""
    parser.add_argument("kind", help="the service to run: " + ", ".join(sorted(installed_services())))
    for spec in fields(ServeSettings):
        if spec.name == "kind":
            continue
        kind = type(spec.default) if not isinstance(spec.default, str) else str
        parser.add_argument(f"--{spec.name.replace('_', '-')}", type=kind, default=None, help=spec.metadata.get("help"))


def serve(args: argparse.Namespace) -> int:
    from voicemesh.runtime.server import run

    overrides = {spec.name: getattr(args, spec.name) for spec in fields(ServeSettings) if spec.name != "kind"}
    definition = load_definition(args.kind)
    return run(definition, ServeSettings.load(args.kind, overrides))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    parser = argparse.ArgumentParser(prog="voicemesh-serve", description="Run one voicemesh service.")
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
