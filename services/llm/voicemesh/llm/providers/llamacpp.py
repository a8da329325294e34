"""Embedded llama.cpp (xllamacpp) LLM provider.

xllamacpp runs llama.cpp's server in-process: `Server(CommonParams)` loads the model and
`handle_chat_completions(request, callback)` streams OpenAI chunks into the callback on
the calling thread (GIL released in between). The callback returning True makes the
server drop the response, which cancels the llama.cpp task, so that is how a cancelled
consumer stops generation: at the next token, or during prefill at the next prompt
progress report. Each request runs on a dedicated executor thread and its chunks hop to
the event loop via call_soon_threadsafe.

Concurrency: at most `parallel` requests (llama.cpp slots) run at once; extra ones wait
on an asyncio semaphore (cancelling a waiting one is instant), and a slot is freed only
when its thread has left llama.cpp. Default 1: on a 2-core box two interleaved streams
each get about half the tokens/s, and a voice turn wants the lowest latency. A waiting
request yields Queued at once and every QUEUED_EVERY_S, which the service sends on: the
caller's stall watchdog sees a busy model, not a hung one. Only while the generations holding
the slots make progress, though: once none has produced a chunk for HOLDER_STALL_S the
heartbeats stop, so the requests behind a hung generation fail at the caller's watchdog
instead of waiting forever.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from voicemesh.llm.providers.base import (
    ChatTurn,
    GenerationParams,
    LlmEvent,
    LlmProvider,
    Queued,
    RoundEnd,
    ToolSpec,
)
from voicemesh.llm.providers.toolcalls import ToolCallStreamParser, openai_messages, openai_tools
from voicemesh.runtime.cpu import EngineCpu, engine_threads, set_omp_wait_policy, wait_policy
from voicemesh.llm.models import QWEN_05B
from voicemesh.runtime.models import model_path
from voicemesh.runtime.provider import ProviderInfo

log = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 256
DEFAULT_THREADS = 2  # at most; fewer when the process has fewer CPUs (runtime/cpu.py)
# How hard ggml's own threadpool polls for work (0-100; 0: sleep at once). This build uses
# OpenMP instead, whose waits OMP_WAIT_POLICY governs, but a build without it would poll.
POLL = 0
_DONE = object()  # end-of-stream marker put on the queue by the generation thread
QUEUED_EVERY_S = 2.0  # how often a request waiting for a slot says so (well under a caller's stall limit)
HOLDER_STALL_S = 10.0  # no chunk from any running generation this long: it may be hung, stop saying Queued


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


class LlamaCppLlmProvider(LlmProvider):
    name = "llamacpp"

    def __init__(
        self,
        model: str | Path | None = None,
        threads: int | None = None,
        context: int | None = None,
        parallel: int | None = None,
        native_tool_history: bool = False,
    ) -> None:
        """model: GGUF path (default: the embedded Qwen2.5 model, VOICEMESH_LLM_MODEL).
        threads (VOICEMESH_LLM_THREADS, else 2, or the CPUs available if fewer: runtime/cpu.py),
        context tokens per slot (VOICEMESH_LLM_CONTEXT, 4096), parallel slots
        (VOICEMESH_LLM_PARALLEL, 1). native_tool_history: see toolcalls.openai_messages."""
        self._model_override = Path(model) if model else None
        self._threads = engine_threads("llm", DEFAULT_THREADS, threads)
        self.threads = self._threads.threads
        self._cpu = EngineCpu(self._threads, wait_policy())  # the wait policy is fixed in load()
        self.context = context or _env_int("VOICEMESH_LLM_CONTEXT", 4096)
        self.parallel = parallel or _env_int("VOICEMESH_LLM_PARALLEL", 1)
        self.native_tool_history = native_tool_history
        self._server: Any = None
        self._closing = False
        self._model_file: Path | None = None
        # One thread per slot, plus one so load/close/metrics never queue behind generation.
        self._executor = ThreadPoolExecutor(self.parallel + 1, thread_name_prefix="llamacpp")
        self._slots = asyncio.Semaphore(self.parallel)
        self._waiting: list[object] = []  # requests waiting for a slot, oldest first
        self._progress_at = time.monotonic()  # a running generation's last chunk (set on its thread)
        self._running: dict[asyncio.Future[None], threading.Event] = {}  # generation threads
        self._call_ids = itertools.count(1)

    def _resolve_model(self) -> Path:
        return self._model_override or model_path(QWEN_05B)

    async def load(self) -> None:
        if self._server is not None:
            return
        self._model_file = self._resolve_model()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._server = await loop.run_in_executor(self._executor, self._start_server, self._model_file)
        # Warm-up: one token through the whole chat path (template, sampling, decode).
        reply = await loop.run_in_executor(
            self._executor,
            self._server.handle_chat_completions,
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        )
        if "error" in reply or "choices" not in reply:
            raise RuntimeError(f"llama.cpp warm-up failed: {reply}")
        log.info("llama.cpp ready: %s, %s, poll %d, %d-token context x %d slot(s), %.2fs",
                 self._model_file.name, self._cpu.describe(), POLL, self.context, self.parallel,
                 time.perf_counter() - started)

    def _start_server(self, path: Path) -> Any:
        # Its OpenMP (libgomp) reads the wait policy once, when the library loads: set it first.
        self._cpu = EngineCpu(self._threads, set_omp_wait_policy("xllamacpp"))
        import xllamacpp  # heavy native module: only load it in processes that run this provider

        if not path.is_file():
            raise FileNotFoundError(f"LLM model not found at {path}")
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = self.parallel
        params.n_ctx = self.context * self.parallel  # the KV cache is split across slots
        params.cpuparams.n_threads = self.threads
        params.cpuparams_batch.n_threads = self.threads
        params.cpuparams.poll = POLL
        params.cpuparams_batch.poll = POLL
        # Prefill runs in chunks of n_batch tokens with a progress report after each, the
        # only points where a cancel can land before the first token (~1.3 s at 2 threads).
        params.n_batch = PREFILL_CHUNK_TOKENS
        params.endpoint_metrics = True
        params.verbosity = -1
        return xllamacpp.Server(params)

    def info(self) -> ProviderInfo:
        model = self._model_file or self._model_override
        return ProviderInfo(
            provider="llamacpp",
            model=model.name if model else QWEN_05B.output,
            details={
                **self._cpu.details(),
                "poll": str(POLL),
                "context": str(self.context),
                "parallel": str(self.parallel),
                "tool_format": "qwen2.5 <tool_call> json",
            },
        )

    async def close(self) -> None:
        self._closing = True
        for cancel in self._running.values():
            cancel.set()
        # Let running generations notice (at their next chunk) before the server goes.
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._server is not None:
            # The last reference is dropped on a worker thread: ~Server joins llama.cpp's
            # loop thread, which must not happen on the event loop.
            holder = [self._server]
            self._server = None
            await asyncio.get_running_loop().run_in_executor(self._executor, holder.clear)
        self._executor.shutdown(wait=False)

    async def probe(self) -> str | None:
        """Not serving while a running generation has produced nothing for HOLDER_STALL_S: a hung
        llama.cpp call never frees its slot, so the replica should get no more traffic."""
        stalled = time.monotonic() - self._progress_at
        if self._running and stalled > HOLDER_STALL_S:
            return f"a generation has produced nothing for {stalled:.0f} s (llama.cpp may be hung)"
        return None

    def _new_call_id(self) -> str:
        return f"call_{next(self._call_ids)}"

    def _request(
        self, messages: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "messages": openai_messages(messages, self.native_tool_history),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "cache_prompt": True,  # reuse the KV cache of the shared conversation prefix
            # Progress chunks during prefill give the callback a chance to cancel there too.
            "return_progress": True,
        }
        if params.stop:
            request["stop"] = list(params.stop)
        if params.seed is not None:
            request["seed"] = params.seed
        if tools:
            # The model's jinja template renders these into the system prompt.
            request["tools"] = openai_tools(tools)
        return request

    async def stream(
        self, messages: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams
    ) -> AsyncIterator[LlmEvent]:
        if self._server is None:
            raise RuntimeError("LlamaCppLlmProvider.stream() called before load()")
        request = self._request(messages, tools, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def on_chunk(chunk: dict[str, Any]) -> bool:
            # Runs on the generation thread. True tells llama.cpp to stop this request.
            if cancel.is_set():
                return True
            self._progress_at = time.monotonic()
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            return False

        async with contextlib.aclosing(self._take_slot()) as waits:  # a consumer gone gives up the place
            async for waiting in waits:
                yield waiting
        generation = self._start_generation(request, on_chunk, cancel, queue)
        try:
            async with contextlib.aclosing(self._events(queue, tools)) as events:
                async for event in events:
                    if self._closing:
                        raise RuntimeError("LlamaCppLlmProvider closed during generation")
                    yield event
            await generation  # surfaces an exception from the thread
        finally:
            # The consumer is free at once; the thread stops at llama.cpp's next chunk (a
            # token, or a prompt-progress report during prefill) and then frees the slot.
            cancel.set()

    async def _take_slot(self) -> AsyncIterator[Queued]:
        """Take a generation slot; while none is free, yield Queued now and every QUEUED_EVERY_S
        (while the running generations make progress). Closing the iterator while it waits
        gives up the place in the queue at once."""
        if not self._slots.locked():
            await self._slots.acquire()
            return
        ticket, started = object(), time.monotonic()
        self._waiting.append(ticket)
        acquiring = asyncio.ensure_future(self._slots.acquire())
        acquiring.add_done_callback(lambda _: self._leave_queue(ticket))  # "ahead" counts only waiters
        try:
            heartbeat = True  # the first one always goes: the wait has begun
            while True:
                if heartbeat:
                    waited_ms = round((time.monotonic() - started) * 1000)
                    yield Queued(ahead=self._waiting.index(ticket) if ticket in self._waiting else 0, waited_ms=waited_ms)
                done, _ = await asyncio.wait({acquiring}, timeout=QUEUED_EVERY_S)
                if done:
                    acquiring.result()
                    return
                heartbeat = time.monotonic() - self._progress_at < HOLDER_STALL_S
        except BaseException:
            if acquiring.done() and not acquiring.cancelled() and acquiring.exception() is None:
                self._slots.release()  # the slot came as the wait was given up
            acquiring.cancel()
            raise
        finally:
            self._leave_queue(ticket)

    def _leave_queue(self, ticket: object) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)

    def _start_generation(
        self, request: dict[str, Any], on_chunk: Any, cancel: threading.Event, queue: asyncio.Queue[Any]
    ) -> asyncio.Future[None]:
        """Run the request on a worker thread, in the slot taken; the slot is freed when it ends."""
        if self._closing or self._server is None:
            self._slots.release()
            raise RuntimeError("LlamaCppLlmProvider is closed")
        loop = asyncio.get_running_loop()
        self._progress_at = time.monotonic()
        # The thread pops the server so its last reference never drops on the loop.
        server_ref = [self._server]

        def generate() -> None:
            try:
                server_ref.pop().handle_chat_completions(request, on_chunk)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        generation = loop.run_in_executor(self._executor, generate)
        self._running[generation] = cancel

        def finished(future: asyncio.Future[None]) -> None:
            self._running.pop(future, None)
            self._slots.release()

        generation.add_done_callback(finished)
        return generation

    async def _events(self, queue: asyncio.Queue[Any], tools: list[ToolSpec]) -> AsyncIterator[LlmEvent]:
        parser = ToolCallStreamParser((t.name for t in tools), self._new_call_id)
        native: dict[int, dict[str, str]] = {}  # llama.cpp-parsed tool calls, by index
        finish_reason = "stop"
        input_tokens = output_tokens = 0
        while (chunk := await queue.get()) is not _DONE:
            if "error" in chunk or ("message" in chunk and "choices" not in chunk):
                error = chunk.get("error", chunk)
                raise RuntimeError(f"llama.cpp: {error.get('message', error)}")
            if usage := chunk.get("usage"):
                input_tokens = usage.get("prompt_tokens", 0)
                output_tokens = usage.get("completion_tokens", 0)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if content := delta.get("content"):
                    for event in parser.feed(content):
                        yield event
                for call in delta.get("tool_calls") or ():
                    slot = native.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
                    function = call.get("function") or {}
                    slot["name"] += function.get("name") or ""
                    slot["arguments"] += function.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        for event in parser.finish():
            yield event
        for call in native.values():
            for event in parser.native_call(call["name"], call["arguments"]):
                yield event
        yield RoundEnd(
            finish_reason="tool_calls" if parser.calls else finish_reason,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )

    async def server_metrics(self) -> dict[str, float]:
        """llama.cpp's Prometheus counters (tokens_predicted_total, requests_processing, ...)."""
        if self._server is None:
            return {}
        text = await asyncio.get_running_loop().run_in_executor(self._executor, self._server.handle_metrics)
        metrics: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition(" ")
                metrics[key.removeprefix("llamacpp:")] = float(value)
        return metrics
