"""llama.cpp's OpenAI-compatible HTTP server on the mesh's GGUF, for the Pipecat side of the
voice-to-voice comparison (run from the main .venv, which has xllamacpp).

The same engine settings as the mesh's llamacpp provider (voicemesh.llm.providers.llamacpp):
2 threads, 4096-token context, one slot, 256-token prefill chunks, no polling. Binds
127.0.0.1 only; prints {"url": ...} once the model is loaded and warmed up, and stops when
its standard input closes (the driver holds the other end), so it never outlives the bench.

`python -m bench.v2v_llm_server --port N`
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request

from voicemesh.llm.models import QWEN_05B
from voicemesh.llm.providers.llamacpp import POLL, PREFILL_CHUNK_TOKENS
from voicemesh.runtime.cpu import set_omp_wait_policy
from voicemesh.runtime.models import model_path


def start(port: int, threads: int, context: int):
    set_omp_wait_policy("xllamacpp")  # before the library loads, as the provider does
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path(QWEN_05B))
    params.n_parallel = 1
    params.n_ctx = context
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cpuparams.poll = POLL
    params.cpuparams_batch.poll = POLL
    params.n_batch = PREFILL_CHUNK_TOKENS
    params.verbosity = -1
    params.hostnames = ["127.0.0.1"]
    params.port = port
    return xllamacpp.Server(params)


def warm_up(url: str) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    server = start(args.port, args.threads, args.context)
    url = f"{server.listening_address}/v1"
    warm_up(url)
    print(json.dumps({"url": url}), flush=True)
    sys.stdin.read()  # until the driver closes it (or dies)
    del server


if __name__ == "__main__":
    main()
