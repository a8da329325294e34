"""One gRPC round trip between two processes on this machine: the floor under each mesh hop.

`python -m bench.rtt serve --port N` echoes every message of a bidi stream back;
`python -m bench.rtt ping --addr HOST:PORT` sends one small message at a time (10 ms apart,
so each finds both event loops idle, as a turn's messages mostly do) and prints the round
trips' p50 and p90 in µs as JSON. grpc.aio on uvloop, loopback TCP, raw bytes (no protobuf):
what every hop of the mesh pays before any of its own work.
"""
from __future__ import annotations

import voicemesh.runtime.grpc_env  # noqa: F401 - first, as in every voicemesh process

import argparse
import asyncio
import json
import time

import grpc
import uvloop

from bench.stats import percentile

METHOD = "/bench.Echo/Echo"


def _same(data: bytes) -> bytes:
    return data


async def serve(port: int) -> None:
    async def echo(requests, context):
        async for message in requests:
            yield message

    handler = grpc.stream_stream_rpc_method_handler(echo, request_deserializer=_same, response_serializer=_same)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})])
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"port {port} is taken")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def ping(addr: str, count: int) -> dict:
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.stream_stream(METHOD, request_serializer=_same, response_deserializer=_same)()
        replies = aiter(call)
        rtts = []
        for index in range(count + 20):  # the first 20 warm the connection up
            start = time.perf_counter()
            await call.write(b"\x00" * 640)  # a 20 ms frame of 16 kHz PCM16
            await anext(replies)
            if index >= 20:
                rtts.append((time.perf_counter() - start) * 1e6)
            await asyncio.sleep(0.01)
        call.cancel()
    return {"p50_us": round(percentile(rtts, 50)), "p90_us": round(percentile(rtts, 90)), "count": len(rtts)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "ping"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--addr", default="")
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    if args.mode == "serve":
        uvloop.run(serve(args.port))
    else:
        print(json.dumps(uvloop.run(ping(args.addr, args.count))))
