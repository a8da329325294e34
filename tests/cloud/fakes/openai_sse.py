"""A fake OpenAI / Azure OpenAI chat completions server, and the real llama.cpp one.

`OpenAiSseFake` speaks the chat completions streaming protocol on 127.0.0.1 (aiohttp): the
request JSON in, server-sent events out (`data: {chat.completion.chunk}` ... `data: [DONE]`),
with what real servers send that a client must cope with:

- tool calls in fragments: the id and name in the first, the JSON arguments in pieces after,
  `finish_reason: "tool_calls"`, then (with `stream_options.include_usage`) a usage chunk with
  empty `choices`;
- OpenAI errors as HTTP statuses with `{"error": {"message", "type", "param", "code"}}`, and
  Azure's (`{"error": {"code", "message"}}`), for each of `fail_next`'s error classes;
- Azure (`azure=True`): `POST /openai/deployments/{deployment}/chat/completions?api-version=..`
  with the `api-key` header, a first chunk with `prompt_filter_results` and no choices, and
  `GET /openai/models?api-version=..`; OpenAI: `POST /v1/chat/completions`, `GET /v1/models`,
  `Authorization: Bearer KEY`.

It records "request" (path, query, auth header, body), "models" (the probe's GETs),
"refused" (a wrong key), "closed" (the client went away mid-stream: cancel) and "completed".

`start_llama_server` runs the real llama.cpp HTTP server (xllamacpp) with the embedded Qwen2.5
0.5B model in this process, for tests of the text path against a real server and as the
`OpenAiChat` backend of other fakes (the swap test, Bedrock).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cloud.fakes.backends import Finish, ScriptedChat, TextPart, ToolCallPart
from cloud.fakes.base import FakeProvider

OPENAI_ERRORS: dict[str, tuple[int, dict]] = {
    "auth": (401, {"message": "Incorrect API key provided: sk-wr***ng. You can find your API key at "
                              "https://platform.openai.com/account/api-keys.",
                   "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}),
    "permission": (403, {"message": "Project `proj_fake` does not have access to model `gpt-fake`",
                         "type": "invalid_request_error", "param": None, "code": "model_not_found"}),
    "throttle": (429, {"message": "Rate limit reached for gpt-fake in organization org-fake on requests per min (RPM): "
                                  "Limit 3, Used 3, Requested 1.", "type": "requests", "param": None,
                       "code": "rate_limit_exceeded"}),
    "not_found": (404, {"message": "The model `gpt-fake` does not exist or you do not have access to it.",
                        "type": "invalid_request_error", "param": None, "code": "model_not_found"}),
    "bad_format": (400, {"message": "Invalid value for 'temperature': must be between 0 and 2.",
                         "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}),
    "unavailable": (503, {"message": "The server is overloaded or not ready yet.", "type": "server_error",
                          "param": None, "code": None}),
}
AZURE_ERRORS: dict[str, tuple[int, dict]] = {
    "auth": (401, {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make "
                                             "sure to provide a valid key for an active subscription and use a correct "
                                             "regional API endpoint for your resource."}),
    "permission": (403, {"code": "PermissionDenied", "message": "The principal lacks the required data action."}),
    "throttle": (429, {"code": "429", "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
                                                 "version 2024-10-21 have exceeded token rate limit of your current "
                                                 "pricing tier. Please retry after 1 second."}),
    "not_found": (404, {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist. If "
                                                                 "you created the deployment within the last 5 minutes, "
                                                                 "please wait a moment and try again."}),
    "bad_format": (400, {"code": "BadRequest", "message": "Invalid value for 'temperature': must be between 0 and 2."}),
    "unavailable": (503, {"code": "ServiceUnavailable", "message": "The service is temporarily unable to process your "
                                                                   "request. Please try again later."}),
}
_FILTER_OK = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}


class OpenAiSseFake(FakeProvider):
    """backend: anything with `chat(messages, tools)` (ScriptedChat by default, OpenAiChat for real
    text); read per request, so a test may swap it. api_key: the one key accepted (None: no auth,
    like a self-hosted server). models: the names `/models` lists and requests may use (None: any).
    chunk_delay_s: a pause before each chunk. argument_piece: characters of tool call arguments
    per fragment."""

    name = "openai"

    def __init__(self, backend: Any = None, api_key: str | None = "sk-fake-openai-test", azure: bool = False,
                 deployment: str = "voicemesh-gpt", api_version: str = "2024-10-21",
                 models: tuple[str, ...] | None = ("gpt-fake",), chunk_delay_s: float = 0.0, argument_piece: int = 7):
        super().__init__()
        self.backend = backend or ScriptedChat()
        self.api_key = api_key  # None: no auth (a self-hosted server); a test may change it: then 401s
        self.azure = azure
        self.deployment = deployment
        self.api_version = api_version
        self.models = models
        self.chunk_delay_s = chunk_delay_s
        self.argument_piece = argument_piece
        self._http_failures: list[tuple[int, dict]] = []
        self._runner: web.AppRunner | None = None
        self._count = 0
        if azure:
            self.name = "azure-openai"

    # --- addresses -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """OpenAI: the base_url a client uses (…/v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def endpoint(self) -> str:
        """Azure: the resource endpoint a client uses."""
        return f"http://127.0.0.1:{self.port}"

    def fail_next_http(self, status: int, error: dict) -> None:
        """The next chat request gets this status and {"error": error}."""
        with self._changed:
            self._http_failures.append((status, error))

    # --- server --------------------------------------------------------------------------------
    async def _start(self) -> None:
        app = web.Application()
        if self.azure:
            app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
            app.router.add_get("/openai/models", self._models)
        else:
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", self._models)
        # Cancel the handler when the client goes away, as servers that stop generating do.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _auth(self, request: web.Request) -> str:
        if self.azure:
            return request.headers.get("api-key", "")
        return request.headers.get("Authorization", "").removeprefix("Bearer ")

    def _error(self, status: int, error: dict) -> web.Response:
        if not self.azure:
            error = {"param": None, "code": None, **error}
        return web.json_response({"error": error}, status=status)

    def _check(self, request: web.Request) -> web.Response | None:
        """Auth and, for Azure, the api-version: the answers a real server gives first."""
        if self.azure and request.query.get("api-version") != self.api_version:
            return self._error(404, {"code": "404", "message": "Resource not found"})
        if self.api_key is not None and self._auth(request) != self.api_key:
            self.record("refused", self._auth(request))
            return self._error(*(AZURE_ERRORS if self.azure else OPENAI_ERRORS)["auth"])
        return None

    async def _models(self, request: web.Request) -> web.Response:
        self.record("models", {"path": request.path, "query": dict(request.query), "auth": self._auth(request)})
        if (refused := self._check(request)) is not None:
            return refused
        names = self.models or ("gpt-fake",)
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"} for name in names]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._changed:
            self._count += 1
            number = self._count
        self.record("request", {"number": number, "path": request.path, "query": dict(request.query),
                                "auth": self._auth(request), "body": body})
        if (refused := self._check(request)) is not None:
            return refused
        if self._http_failures:
            with self._changed:
                status, error = self._http_failures.pop(0)
            return self._error(status, error)
        if failure := self.take_failure():
            return self._error(*(AZURE_ERRORS if self.azure else OPENAI_ERRORS)[failure])
        if self.azure and request.match_info["deployment"] != self.deployment:
            return self._error(*AZURE_ERRORS["not_found"])
        if not self.azure and self.models is not None and body.get("model") not in self.models:
            message = f"The model `{body.get('model')}` does not exist or you do not have access to it."
            return self._error(404, {**OPENAI_ERRORS["not_found"][1], "message": message})
        if problem := _invalid_messages(body.get("messages")):
            return self._error(400, {"message": problem, "type": "invalid_request_error", "param": "messages",
                                     **({"code": "BadRequest"} if self.azure else {})})
        return await self._stream(request, body, number)

    async def _stream(self, request: web.Request, body: dict, number: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        model = self.deployment if self.azure else body.get("model", "")
        chunk_id = f"chatcmpl-fake{number}"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def send(choices: list, **extra) -> None:
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                     "system_fingerprint": "fp_fake", "choices": choices, **extra}
            if include_usage and "usage" not in chunk:
                chunk["usage"] = None
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        def choice(delta: dict, finish: str | None = None) -> dict:
            item = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if self.azure:
                item["content_filter_results"] = _FILTER_OK if delta.get("content") else {}
            return item

        try:
            if self.azure:
                await send([], prompt_filter_results=[{"prompt_index": 0, "content_filter_results": _FILTER_OK}])
            await send([choice({"role": "assistant", "content": "", "refusal": None})])
            finish, tool_index = Finish("stop"), 0
            async for part in self.backend.chat(body.get("messages", []), body.get("tools", [])):
                if isinstance(part, TextPart):
                    await send([choice({"content": part.text})])
                elif isinstance(part, ToolCallPart):
                    await send([choice({"tool_calls": [{"index": tool_index, "id": part.id, "type": "function",
                                                        "function": {"name": part.name, "arguments": ""}}]})])
                    for start in range(0, len(part.arguments), self.argument_piece):
                        piece = part.arguments[start:start + self.argument_piece]
                        await send([choice({"tool_calls": [{"index": tool_index, "function": {"arguments": piece}}]})])
                    tool_index += 1
                elif isinstance(part, Finish):
                    finish = part
            await send([choice({}, finish.reason)])
            if include_usage:
                usage = {"prompt_tokens": finish.input_tokens, "completion_tokens": finish.output_tokens,
                         "total_tokens": finish.input_tokens + finish.output_tokens}
                await send([], usage=usage)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.record("closed", number)  # the client closed the stream: stop generating
            raise
        self.record("completed", number)
        return response


def _invalid_messages(messages: Any) -> str:
    """What OpenAI answers 400 for in `messages`: the checks a client's mapping must pass."""
    if not isinstance(messages, list) or not messages:
        return "Invalid 'messages': empty array. Expected an array with minimum length 1."
    open_calls: set[str] = set()
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool", "developer"):
            return f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'tool', and 'developer'."
        if role == "tool":
            if message.get("tool_call_id") not in open_calls:
                return (f"Invalid parameter: messages[{index}]: messages with role 'tool' must be a response to a "
                        "preceeding message with 'tool_calls'.")
            open_calls.discard(message["tool_call_id"])
            continue
        if open_calls:
            return (f"An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                    f"'tool_call_id'. The following tool_call_ids did not have response messages: {sorted(open_calls)}")
        for call in message.get("tool_calls") or ():
            if call.get("type") != "function" or not isinstance(call.get("function", {}).get("arguments"), str):
                return f"Invalid 'messages[{index}].tool_calls': expected type 'function' with string arguments."
            open_calls.add(call["id"])
        if message.get("tool_calls") is None and not isinstance(message.get("content"), str):
            return f"Invalid 'messages[{index}].content': expected a string."
    if open_calls:
        return f"The following tool_call_ids did not have response messages: {sorted(open_calls)}"
    return ""


# --- the real llama.cpp server ------------------------------------------------------------------
@dataclass
class LlamaServer:
    """llama.cpp's own OpenAI-compatible HTTP server, in this process, on 127.0.0.1."""

    base_url: str  # http://127.0.0.1:P/v1
    api_key: str  # "" when it takes any request
    model: str  # the alias it answers to (it serves its one model whatever the name)
    _server: Any = field(repr=False, default=None)

    def stop(self) -> None:
        """Stops the server (xllamacpp stops it when the object goes) and frees the model."""
        server, self._server = self._server, None
        del server

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_llama_server(api_key: str = "sk-voicemesh-llama-test", model: str = "qwen2.5-0.5b-instruct",
                       threads: int = 1, context: int = 1024) -> LlamaServer:
    """The embedded Qwen2.5 0.5B GGUF behind llama.cpp's server (Bearer auth with `api_key`;
    "" for none), `threads` CPU threads, `context` tokens. Takes a few seconds; call stop()."""
    from voicemesh.llm.models import QWEN_05B
    from voicemesh.runtime.cpu import set_omp_wait_policy
    from voicemesh.runtime.models import model_path

    set_omp_wait_policy("xllamacpp")  # idle OpenMP threads sleep instead of spinning on shared cores
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path(QWEN_05B))
    params.model_alias = {model}  # a set of names
    if api_key:
        params.api_keys = [api_key]
    params.n_ctx = context
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_threads_http = 2
    params.use_jinja = True
    params.endpoint_metrics = True  # /metrics: llamacpp:n_decode_total shows a cancel stopped decoding
    params.endpoint_slots = True  # /slots: is_processing
    params.warmup = False
    params.verbosity = -1
    server = xllamacpp.Server(params)  # binds 127.0.0.1 on a free port (its defaults)
    address = server.listening_address  # "http://127.0.0.1:P"
    assert address.startswith("http://127.0.0.1:"), address
    return LlamaServer(f"{address}/v1", api_key, model, server)
