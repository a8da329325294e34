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


def _chosen(args: list[str]) -> tuple[str | None, str | None]:
    """The kind and --provider these arguments name, read without parsing them: a parse would
    stop at --help, or at a missing kind, before the provider's own flags could be added."""
    services = installed_services()
    kind = next((arg for arg in args if not arg.startswith("-") and arg in services), None)
    provider = None
    for index, arg in enumerate(args):
        if arg == "--provider" and index + 1 < len(args):
            provider = args[index + 1]
        elif arg.startswith("--provider="):
            provider = arg.split("=", 1)[1]
    return kind, provider


def _provider_settings_class(kind: str, provider: str):
    """The settings dataclass of that provider, if it has one."""
    from voicemesh.runtime.server import load_provider_class

    definition = load_definition(kind)
    if not definition.providers or provider not in definition.providers:
        return None
    return load_provider_class(definition.providers, provider, kind).settings_class


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The chosen provider's flags are added before parsing, so `voicemesh-serve stt --provider
    riva --help` lists Riva's and `--endpoint` is accepted."""
    kind, provider = _chosen(sys.argv[1:] if argv is None else list(argv))
    if kind is not None:
        provider = ServeSettings.load(kind, {"provider": provider}).provider  # the flag, else the env, else the default
        settings_class = _provider_settings_class(kind, provider)
        if settings_class is not None:
            qualified = f"VOICEMESH_{kind.upper()}_{provider.upper().replace('-', '_')}_<NAME>"
            group = parser.add_argument_group(f"{provider} settings (env {qualified})")
            for spec in fields(settings_class):
                group.add_argument(f"--{spec.name.replace('_', '-')}", dest=f"provider__{spec.name}",
                                   metavar=spec.name.upper(), default=None, help=spec.metadata.get("help"))
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
