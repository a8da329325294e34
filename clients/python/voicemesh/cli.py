"""The `voicemesh` command: serve one service, bring the mesh up, or talk to it."""
from __future__ import annotations

import voicemesh.grpc_env  # noqa: F401 - first: it sets gRPC's options before grpc loads

import argparse
import importlib
import os
import sys
from dataclasses import fields

# Each service kind lives in its own package and exposes DEFINITION (a ServiceDefinition).
SERVICE_MODULES = {
    "vad": "voicemesh.vad.service",
    "stt": "voicemesh.stt.service",
    "llm": "voicemesh.llm.service",
    "tts": "voicemesh.tts.service",
    "orchestrator": "voicemesh.orchestrator.service",
    "transport": "voicemesh.transport.service",
}


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from voicemesh.runtime.config import ServeSettings

    serve = sub.add_parser("serve", help="run one service in this process")
    serve.add_argument("kind", choices=sorted(SERVICE_MODULES))
    for spec in fields(ServeSettings):
        if spec.name == "kind":
            continue
        kind = type(spec.default) if not isinstance(spec.default, str) else str
        serve.add_argument(f"--{spec.name.replace('_', '-')}", type=kind, default=None, help=spec.metadata.get("help"))


def _serve(args: argparse.Namespace) -> int:
    from voicemesh.runtime.config import ServeSettings
    from voicemesh.runtime.server import run

    overrides = {spec.name: getattr(args, spec.name) for spec in fields(ServeSettings) if spec.name != "kind"}
    settings = ServeSettings.load(args.kind, overrides)
    definition = importlib.import_module(SERVICE_MODULES[args.kind]).DEFINITION
    return run(definition, settings)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    parser = argparse.ArgumentParser(prog="voicemesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "serve":  # service processes never import the client side
        from voicemesh import client, launcher

        launcher.add_parser(sub)
        client.add_parsers(sub)
    models = sub.add_parser("models", help="embedded model files")
    models.add_argument("action", choices=["setup", "list"])
    models.add_argument("--force", action="store_true", help="re-join even if present")
    sub.add_parser("bench", help="run the benchmarks, from the repository root (bench/README.md)", add_help=False)

    if argv and argv[0] == "bench":  # the bench lives in the repository, not in the package
        sys.path.insert(0, os.getcwd())
        from bench.run import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "models":
        from voicemesh.runtime import models as model_files

        if args.action == "setup":
            model_files.setup_all(force=args.force)
        else:
            for spec in model_files.MODELS.values():
                print(f"{spec.name:24} {spec.licence:40} {spec.upstream}")
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
