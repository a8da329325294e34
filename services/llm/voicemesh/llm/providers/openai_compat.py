"""OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, NIM, llama.cpp server) and Azure OpenAI.

One provider round is one `chat.completions.create(stream=True)` request through the official
`openai` SDK (AsyncOpenAI / AsyncAzureOpenAI), because every server named above speaks that
request and its server-sent-event chunks:

- ChatTurns become chat messages as they are (assistant `tool_calls`, `tool` messages with
  `tool_call_id`): these servers render tool history with the model's own chat template.
- `delta.content` comes out as a TextDelta at once (that is the time to first audio).
- `delta.tool_calls` arrive in fragments keyed by `index` (the id and name once, the JSON
  arguments in pieces); they are assembled per index and come out as ToolCallRequests when the
  choice's `finish_reason` arrives, once their arguments are whole JSON.
- With `stream_options.include_usage` the last chunk has no choices and carries the usage; the
  RoundEnd goes out when the stream ends, with it. Azure's first chunk (`prompt_filter_results`,
  no choices) carries nothing for us and is skipped the same way.

Retries: the SDK retries (max_retries: connection errors, 408, 409, 429, 5xx) inside `create()`,
that is before the first chunk exists; once chunks flow, a failure is final (nothing is ever
replayed mid-stream). Cancel: the stream is closed in `finally`, which closes the HTTP
connection; the server sees the client gone and stops generating (llama.cpp and vLLM cancel the
request; OpenAI stops billing output tokens).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from voicemesh.llm.providers.base import (
    ChatTurn, GenerationParams, LlmEvent, LlmProvider, RoundEnd, TextDelta, ToolCallRequest, ToolSpec,
)
from voicemesh.runtime.errors import DeadlineExceeded, InvalidInput, StreamError, Unavailable
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import Secret, http_error, read_secret

log = logging.getLogger(__name__)

NO_KEY = "no-key"  # the SDK insists on a key; servers without auth ignore this placeholder
PROBE_TIMEOUT_S = 5.0
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls"}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class _CallSettings:
    """How requests are made; both flavours have these (their own fields come after them)."""

    timeout_seconds: float = field(default=30.0, metadata=_help("longest wait for the first byte and between chunks"))
    connect_timeout_seconds: float = field(default=5.0, metadata=_help("longest wait to connect"))
    max_retries: int = field(default=2, metadata=_help(
        "SDK retries with backoff before the first chunk (connection errors, 408, 409, 429, 5xx); never mid-stream"))
    max_tokens_field: str = field(default="max_tokens", metadata=_help(
        "request field for the token limit: max_tokens, or max_completion_tokens (reasoning models require it)"))
    send_sampling: bool = field(default=True, metadata=_help("send temperature and top_p (reasoning models reject them)"))


@dataclass
class OpenAiSettings(_CallSettings):
    base_url: str = field(default="https://api.openai.com/v1", metadata=_help(
        "the server's OpenAI API root: vLLM http://HOST:8000/v1, Ollama http://HOST:11434/v1, "
        "llama.cpp server http://HOST:8080/v1, NIM http://HOST:8000/v1 or https://integrate.api.nvidia.com/v1"))
    model: str = field(default="gpt-4o-mini", metadata=_help("model name as the server knows it (vLLM: the served model name)"))
    api_key_file: str = field(default="", metadata=_help(
        "file holding the API key (a mounted secret); else OPENAI_API_KEY; none at all is fine for servers without auth"))


@dataclass
class AzureOpenAiSettings(_CallSettings):
    endpoint: str = field(default="", metadata=_help(
        "resource endpoint, https://RESOURCE.openai.azure.com (default AZURE_OPENAI_ENDPOINT)"))
    deployment: str = field(default="", metadata=_help("the model deployment's name (the request path names it)"))
    api_version: str = field(default="2024-10-21", metadata=_help("the api-version query parameter (a GA version)"))
    api_key_file: str = field(default="", metadata=_help(
        "file holding the resource key (a mounted secret); else AZURE_OPENAI_API_KEY"))


def chat_messages(turns: list[ChatTurn]) -> list[dict[str, Any]]:
    """ChatTurns as OpenAI chat messages, tool history included as the API defines it."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role == "tool":
            messages.append({"role": "tool", "tool_call_id": turn.tool_call_id, "content": turn.content})
            continue
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.name:
            message["name"] = turn.name
        if turn.role == "assistant" and turn.tool_calls:
            message["content"] = turn.content or None  # the API's shape for "only tool calls"
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
                for call in turn.tool_calls
            ]
        messages.append(message)
    return messages


def chat_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in tools]


@dataclass
class _PartialCall:  # one tool call being assembled from its fragments
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


def _redact_url(url: str) -> str:
    """The URL without user:password@ or a query (either may hold a credential), for Info and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _OpenAiBase(LlmProvider):
    """What both flavours share: the request, the chunk mapping, the error mapping, the probe."""

    settings: OpenAiSettings | AzureOpenAiSettings
    _key: Secret | None
    _lists_models_by_name = True  # GET /models lists the names requests use (Azure lists base models)
    _probe_404 = "check base_url (it usually ends in /v1)"

    def __init__(self, model: str, where: str) -> None:
        self.model = model  # as requests name it (Azure: the deployment)
        self._where = where  # the server, for messages: no credentials in it
        self._client: Any = None
        self._warned_model = False
        if self.settings.max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise SystemExit(f"{self.name}: max_tokens_field must be max_tokens or max_completion_tokens, "
                             f"got {self.settings.max_tokens_field!r}")

    def _make_client(self, timeout: Any) -> Any:
        raise NotImplementedError

    def _hint(self, status: int) -> str:
        if status >= 500:
            return f"the server is failing or overloaded (after {self.settings.max_retries} retries); try again later"
        key = f"the key from {self._key.source}" if self._key else "no key (set OPENAI_API_KEY or api_key_file)"
        return {
            401: f"the server refused {key}; check it is valid for {self._where}",
            403: f"the key may not use model {self.model!r}; check the project or organization's model access",
            404: f"model {self.model!r} does not exist at {self._where}; check --model (GET /models lists them)",
            429: f"rate limit or quota reached (after {self.settings.max_retries} retries); slow down, or raise the limit",
            400: f"check the request parameters for {self.model!r} (max_tokens_field, send_sampling, tools)",
        }.get(status, "")

    # --- lifecycle -----------------------------------------------------------------------------
    async def load(self) -> None:
        import openai  # the optional extra: only processes running this provider need it

        timeout = openai.Timeout(self.settings.timeout_seconds, connect=self.settings.connect_timeout_seconds)
        self._client = self._make_client(timeout)
        # The SDK's HTTP client logs every request (and each probe) at INFO; failures are logged by the servicer.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        log.info("%s: model %s at %s, credentials from %s", self.name, self.model, self._where,
                 self._key.source if self._key else "nowhere (no key)")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def probe(self) -> str | None:
        """GET /models: unbilled, and it needs a valid key (OpenAI, vLLM --api-key, llama.cpp
        --api-key; Azure: GET /openai/models?api-version=...)."""
        import openai

        try:
            page = await self._client.with_options(timeout=PROBE_TIMEOUT_S, max_retries=0).models.list()
        except openai.NotFoundError:
            return f"{self.name}: GET /models at {self._where} answered 404; {self._probe_404}"
        except Exception as err:  # noqa: BLE001 - every failure is a reason
            return self._error(err).message
        ids = {model.id for model in page.data}
        # A warning, not a failure: llama.cpp and others answer to any model name.
        if self._lists_models_by_name and ids and self.model not in ids and not self._warned_model:
            self._warned_model = True
            log.warning("%s: model %r is not among the %d models listed at %s", self.name, self.model, len(ids), self._where)
        return None

    # --- one round -----------------------------------------------------------------------------
    def _request(self, messages: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model, "messages": chat_messages(messages), "stream": True,
            "stream_options": {"include_usage": True}, self.settings.max_tokens_field: params.max_tokens,
        }
        if self.settings.send_sampling:
            request.update(temperature=params.temperature, top_p=params.top_p)
        if params.stop:
            request["stop"] = list(params.stop)
        if params.seed is not None:
            request["seed"] = params.seed
        if tools:
            request["tools"] = chat_tools(tools)
        return request

    async def stream(self, messages: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams) -> AsyncIterator[LlmEvent]:
        try:  # the SDK's retries all happen in here, before any chunk
            upstream = await self._client.chat.completions.create(**self._request(messages, tools, params))
        except Exception as err:  # noqa: BLE001 - mapped onto a status the caller can act on
            raise self._error(err) from None
        calls: dict[int, _PartialCall] = {}
        finish: str | None = None
        usage = None
        async with upstream:  # leaving it, however (cancel included), closes the connection
            try:
                async for chunk in upstream:
                    usage = getattr(chunk, "usage", None) or usage
                    for choice in chunk.choices or ():  # none: Azure's filter results, the usage chunk
                        if choice.index:
                            continue  # n=1: only choice 0 exists
                        delta = getattr(choice, "delta", None)
                        if delta is not None and delta.content:
                            yield TextDelta(delta.content)
                        for fragment in (getattr(delta, "tool_calls", None) or ()):
                            index = fragment.index if fragment.index is not None else max(calls, default=0)
                            if fragment.id and calls.get(index, _PartialCall(fragment.id)).id not in ("", fragment.id):
                                index = max(calls) + 1  # a new id at a used index: servers that number every call 0
                            call = calls.setdefault(index, _PartialCall())
                            call.id = fragment.id or call.id
                            function = fragment.function
                            if function is not None:
                                call.name = function.name or call.name
                                if function.arguments:
                                    call.arguments.append(function.arguments)
                        if choice.finish_reason and finish is None:
                            finish = choice.finish_reason
                            for request in self._finished_calls(calls, finish, params):
                                yield request
            except StreamError:
                raise
            except Exception as err:  # noqa: BLE001 - a failure mid-stream is final, never retried
                raise self._error(err, mid_stream=True) from None
        if finish is None:
            raise Unavailable(f"{self.name}: the stream from {self._where} ended before model {self.model!r} "
                              "finished (no finish_reason); the server or a proxy closed it early")
        if finish == "content_filter":
            log.warning("%s: model %r stopped by the content filter", self.name, self.model)
        reason = "tool_calls" if calls else _FINISH.get(finish, "stop")  # some servers say "stop" with calls
        yield RoundEnd(reason, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)

    def _finished_calls(self, calls: dict[int, _PartialCall], finish: str, params: GenerationParams) -> list[ToolCallRequest]:
        """The assembled calls, in index order, each with its arguments parsed."""
        requests = []
        for index in sorted(calls):
            call = calls[index]
            text = "".join(call.arguments).strip()
            try:
                arguments = json.loads(text) if text else {}
            except json.JSONDecodeError as err:
                if finish == "length":
                    raise InvalidInput(
                        f"{self.name}: model {self.model!r} ran out of tokens (max_tokens {params.max_tokens}) inside the "
                        f"arguments of tool call {call.name!r}; raise max_tokens") from None
                raise StreamError(f"{self.name}: model {self.model!r} called tool {call.name!r} with arguments that are not "
                                  f"valid JSON ({err.msg}, char {err.pos}): {text[:120]!r}") from None
            if not isinstance(arguments, dict):
                raise StreamError(f"{self.name}: model {self.model!r} called tool {call.name!r} with arguments that are "
                                  f"not a JSON object: {text[:120]!r}")
            if not call.name:
                raise StreamError(f"{self.name}: model {self.model!r} sent tool call {index} without a function name")
            requests.append(ToolCallRequest(call.id or f"call_{uuid.uuid4().hex[:24]}", call.name, arguments))
        return requests

    # --- errors --------------------------------------------------------------------------------
    def _error(self, err: BaseException, mid_stream: bool = False) -> StreamError:
        """The StreamError for an SDK exception: HTTP status first, then timeouts and connections."""
        import openai

        if isinstance(err, StreamError):
            return err
        who = f"{self.name} (model {self.model!r})"
        if isinstance(err, openai.APITimeoutError):
            return DeadlineExceeded(f"{who}: no answer from {self._where} within {self.settings.timeout_seconds:g} s "
                                    "(timeout_seconds); check the server's load, or raise the timeout")
        if isinstance(err, openai.APIConnectionError):
            cause = err.__cause__ or err.__context__
            detail = f": {type(cause).__name__}: {cause}" if cause else ""
            what = "lost the connection to" if mid_stream else "cannot connect to"
            return Unavailable(self._scrub(f"{who}: {what} {self._where}{detail}; check base_url/endpoint and the network"))
        if isinstance(err, openai.APIError):  # an HTTP status, or an error event inside the stream
            body = err.body.get("error", err.body) if isinstance(err.body, dict) else None
            body = body if isinstance(body, dict) else {}
            detail = str(body.get("message") or err.message)
            if isinstance(code := body.get("code") or body.get("type"), str):
                detail += f" [{code}]"
            if isinstance(err, openai.APIStatusError):
                status = err.status_code
            else:
                status, detail = (body["code"] if isinstance(body.get("code"), int) else 503), f"error in the stream: {detail}"
            return http_error(who, status, self._scrub(detail), self._hint(status))
        return Unavailable(self._scrub(f"{who}: {type(err).__name__}: {err}"))

    def _scrub(self, text: str) -> str:
        """Never echo the key, even where a server quotes it back."""
        if self._key and self._key.reveal() in text:
            text = text.replace(self._key.reveal(), "***")
        return text


class OpenAiLlmProvider(_OpenAiBase):
    """Any OpenAI-compatible server: Bearer auth, `{base_url}/chat/completions`."""

    name = "openai"
    settings_class = OpenAiSettings

    def __init__(self, settings: OpenAiSettings | None = None) -> None:
        self.settings = settings or OpenAiSettings()
        self._key = read_secret(self.settings.api_key_file, ("OPENAI_API_KEY",), "openai", required=False)
        super().__init__(self.settings.model, _redact_url(self.settings.base_url))

    def _make_client(self, timeout: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.settings.base_url, api_key=self._key.reveal() if self._key else NO_KEY,
                                  timeout=timeout, max_retries=self.settings.max_retries)

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider=self.name, model=self.model, details={
            "base_url": self._where, "credentials": self._key.source if self._key else "none",
            "max_tokens_field": self.settings.max_tokens_field, "max_retries": str(self.settings.max_retries),
            "timeout_seconds": f"{self.settings.timeout_seconds:g}",
        })


class AzureOpenAiLlmProvider(_OpenAiBase):
    """Azure OpenAI: `api-key` header, `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=`."""

    name = "azure-openai"
    settings_class = AzureOpenAiSettings
    _lists_models_by_name = False
    _probe_404 = "check the endpoint and api_version"

    def __init__(self, settings: AzureOpenAiSettings | None = None) -> None:
        self.settings = settings or AzureOpenAiSettings()
        self.settings.endpoint = self.settings.endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT", "")
        if not self.settings.endpoint or not self.settings.deployment:
            raise SystemExit("azure-openai: set the endpoint (--endpoint or AZURE_OPENAI_ENDPOINT, "
                             "https://RESOURCE.openai.azure.com) and the deployment (--deployment)")
        self._key = read_secret(self.settings.api_key_file, ("AZURE_OPENAI_API_KEY",), "azure-openai")
        super().__init__(self.settings.deployment,
                         f"{_redact_url(self.settings.endpoint)} (deployment {self.settings.deployment!r})")

    def _hint(self, status: int) -> str:
        if status == 404:
            return (f"deployment {self.settings.deployment!r} does not exist on {_redact_url(self.settings.endpoint)}, "
                    f"or api-version {self.settings.api_version} does not know it; check --deployment and --api-version")
        if status == 401:
            endpoint = _redact_url(self.settings.endpoint)
            return f"the resource refused the key from {self._key.source}; check it belongs to {endpoint}"
        return super()._hint(status)

    def _make_client(self, timeout: Any) -> Any:
        import openai

        return openai.AsyncAzureOpenAI(
            azure_endpoint=self.settings.endpoint, azure_deployment=self.settings.deployment,
            api_version=self.settings.api_version, api_key=self._key.reveal(), timeout=timeout,
            max_retries=self.settings.max_retries)

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider=self.name, model=self.model, details={
            "endpoint": _redact_url(self.settings.endpoint), "deployment": self.settings.deployment,
            "api_version": self.settings.api_version, "credentials": self._key.source,
            "max_tokens_field": self.settings.max_tokens_field, "max_retries": str(self.settings.max_retries),
        })
