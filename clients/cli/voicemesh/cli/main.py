"""The `voicemesh` command: bring the mesh up, talk to it, serve one service, set up models.

`serve` and `models` are the runtime's own commands (`voicemesh-serve`, `voicemesh-models`,
which every service image has); the rest are tools on top of the client library.
"""
from __future__ import annotations

import voicemesh.runtime.grpc_env  # noqa: F401 - first: it sets gRPC's options before grpc loads

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # the bench lives in the repository, not in a package
        sys.path.insert(0, os.getcwd())
        from bench.run import main as bench_main

        return bench_main(argv[1:])

    from voicemesh.cli import commands, up
    from voicemesh.runtime import models, serve

    if argv and argv[0] == "serve":  # its flags depend on the provider chosen: its own parser
        serve_parser = argparse.ArgumentParser(prog="voicemesh serve", description="Run one voicemesh service.",
                                               allow_abbrev=False)
        serve.add_arguments(serve_parser)
        return serve.serve(serve.parse(serve_parser, argv[1:]))

    if argv and argv[0] == "assistant":  # an optional distribution with its own flags: its own parser
        return commands.run_assistant(argv[1:])

    parser = argparse.ArgumentParser(prog="voicemesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up.add_parser(sub)
    commands.add_parsers(sub)
    sub.add_parser("serve", help="run one service in this process (same as voicemesh-serve)", add_help=False)
    models_parser = sub.add_parser("models", help="set up or list the embedded models (same as voicemesh-models)")
    models.add_arguments(models_parser)
    models_parser.set_defaults(handler=models.run_command)
    sub.add_parser("bench", help="run the benchmarks, from the repository root (bench/README.md)", add_help=False)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
