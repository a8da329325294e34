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


def _flag_fields(settings_class) -> list:
    return [spec for spec in fields(settings_class) if spec.name != "kind" and spec.metadata.get("flag") is not False]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`kind` plus one flag per ServeSettings field (shared with `voicemesh serve`). The chosen
    provider's own flags are added by `parse` once the kind and provider are known."""
    parser.add_argument("kind", help="the service to run: " + ", ".join(sorted(installed_services())))
    for spec in _flag_fields(ServeSettings):
        kind = type(spec.default) if not isinstance(spec.default, str) else str
        parser.add_argument(f"--{spec.name.replace('_', '-')}", type=kind, default=None, help=spec.metadata.get("help"))


def _provider_settings_class(args: argparse.Namespace):
    """The settings dataclass of the provider these arguments (or the env) choose, if any."""
    from voicemesh.runtime.server import load_provider_class

    if args.kind not in installed_services():
        return None
    definition = load_definition(args.kind)
    settings = ServeSettings.load(args.kind, {"provider": getattr(args, "provider", None)})
    if not definition.providers or settings.provider not in definition.providers:
        return None
    return load_provider_class(definition.providers, settings.provider, args.kind).settings_class


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Two passes: the first finds the kind and provider, the second knows that provider's flags
    (`voicemesh-serve stt --provider riva --help` lists Riva's)."""
    # The first pass must not act on --help: that is answered once the provider's flags are in.
    first = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg not in ("-h", "--help")]
    known, _ = parser.parse_known_args(first)
    settings_class = _provider_settings_class(known) if getattr(known, "kind", None) else None
    if settings_class is not None:
        provider = ServeSettings.load(known.kind, {"provider": known.provider}).provider
        qualified = f"VOICEMESH_{known.kind.upper()}_{provider.upper().replace('-', '_')}_<NAME>"
        group = parser.add_argument_group(f"{provider} settings (env {qualified})")
        for spec in fields(settings_class):
            group.add_argument(f"--{spec.name.replace('_', '-')}", dest=f"provider__{spec.name}", metavar=spec.name.upper(),
                               default=None, help=spec.metadata.get("help"))
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    from voicemesh.runtime.server import run

    overrides: dict[str, object] = {spec.name: getattr(args, spec.name) for spec in _flag_fields(ServeSettings)}
    overrides["provider_options"] = {name.removeprefix("provider__"): value for name, value in vars(args).items()
                                     if name.startswith("provider__") and value is not None}
    definition = load_definition(args.kind)
    return run(definition, ServeSettings.load(args.kind, overrides))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    # No abbreviations: a provider's flag may be a prefix of a shared one (--probe of --probe-seconds).
    parser = argparse.ArgumentParser(prog="voicemesh-serve", description="Run one voicemesh service.", allow_abbrev=False)
    add_arguments(parser)
    return serve(parse(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
