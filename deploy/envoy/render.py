"""Fill deploy/envoy/envoy.yaml with other addresses: loopback ports for the tests and for Envoy in
front of `voicemesh up`, instead of the headless Services' DNS names Kubernetes resolves.

Only addresses and ports change; every other setting is envoy.yaml's own, so what the tests run
is what a cluster runs. Example (two STT replicas, one of everything else):

    python deploy/envoy/render.py --listen ingress=127.0.0.1:50050 --listen backends=127.0.0.1:50060 \\
        --endpoints orchestrator=127.0.0.1:50051 --endpoints vad=127.0.0.1:50052 \\
        --endpoints stt=127.0.0.1:50053,127.0.0.1:50063 --endpoints llm=127.0.0.1:50054 \\
        --endpoints tts=127.0.0.1:50055 > /tmp/envoy.yaml
    envoy -c /tmp/envoy.yaml --disable-hot-restart --drain-time-s 30

A cluster or listener not named keeps envoy.yaml's address. Needs PyYAML (a pinned dependency).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

SOURCE = Path(__file__).with_name("envoy.yaml")


def load(path: Path = SOURCE) -> dict:
    return yaml.safe_load(Path(path).read_text())


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _socket(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def render(config: dict, endpoints: dict[str, list[tuple[str, int]]] | None = None,
           listeners: dict[str, tuple[str, int]] | None = None, admin: tuple[str, int] | None = None) -> dict:
    """A copy of `config` with these clusters' endpoints, listeners' and the admin's addresses."""
    out = copy.deepcopy(config)
    resources = out["static_resources"]
    clusters = {c["name"]: c for c in resources["clusters"]}
    for name, addresses in (endpoints or {}).items():
        if name not in clusters:
            raise ValueError(f"no cluster {name!r} in the config; have {sorted(clusters)}")
        if not addresses:
            raise ValueError(f"cluster {name!r}: at least one endpoint")
        clusters[name]["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}} for host, port in addresses]}],
        }
    named = {listener["name"]: listener for listener in resources["listeners"]}
    for name, (host, port) in (listeners or {}).items():
        if name not in named:
            raise ValueError(f"no listener {name!r} in the config; have {sorted(named)}")
        named[name]["address"] = _socket(host, port)
    if admin is not None:
        out["admin"]["address"] = _socket(*admin)
    return out


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SOURCE, help="the config to fill (default: envoy.yaml next to this file)")
    parser.add_argument("--endpoints", action="append", default=[], metavar="CLUSTER=HOST:PORT[,HOST:PORT...]",
                        help="a cluster's endpoints (repeat per cluster)")
    parser.add_argument("--listen", action="append", default=[], metavar="LISTENER=HOST:PORT",
                        help="a listener's address: ingress or backends")
    parser.add_argument("--admin", metavar="HOST:PORT", help="the admin's address (keep it on loopback)")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        endpoints = {}
        for item in args.endpoints:
            name, _, addresses = item.partition("=")
            endpoints[name] = [parse_address(a) for a in addresses.split(",") if a.strip()]
        listeners = {}
        for item in args.listen:
            name, _, address = item.partition("=")
            listeners[name] = parse_address(address)
        admin = parse_address(args.admin) if args.admin else None
        text = dump(render(load(args.source), endpoints, listeners, admin))
    except ValueError as err:
        parser.error(str(err))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
