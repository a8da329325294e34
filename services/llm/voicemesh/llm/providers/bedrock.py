"""Amazon Bedrock LLM provider: one round is one boto3 `bedrock-runtime` `converse_stream` request
(Converse: Bedrock's one request shape for every chat model it hosts).

- ChatTurns -> Converse messages: system turns to `system`; text to text blocks; tool calls to
  `toolUse` blocks; tool results to a user message of `toolResult` blocks (`json` for a JSON
  object, else `text`). Converse wants user/assistant alternation starting with the user: runs of
  one role are merged, empty turns dropped, a leading assistant turn (a greeting) gets a short user
  turn in front. Tool blocks need a `toolConfig`, so a round without tools gets its tool history
  as text. ToolSpecs -> `toolConfig`; params -> `inferenceConfig` (Converse has no seed).
- Events: `contentBlockDelta.text` -> TextDelta at once; a `toolUse` block (id and name at
  `contentBlockStart`, JSON input in fragments) -> one ToolCallRequest at `contentBlockStop`;
  `messageStop.stopReason` + `metadata.usage` -> the RoundEnd.

boto3 blocks: each round runs on a thread of its own; each event hops to the loop as it comes.
Cancel (task cancelled, generator closed) shuts the socket down and closes the stream from the
loop (`EventStream.close()` alone neither wakes the blocked reader nor drops the connection before
the model's next event); Bedrock sees the connection drop and stops generating and billing.
Retries: botocore's standard mode, on the opening request only (throttling, ModelNotReady, 5xx,
connection errors); once events flow a failure is final. Errors map through `_CODES`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from voicemesh.llm.providers.base import (
    ChatTurn, GenerationParams, LlmEvent, LlmProvider, RoundEnd, TextDelta, ToolCallRequest, ToolSpec,
)
from voicemesh.runtime.errors import (
    DeadlineExceeded, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError, Unauthenticated, Unavailable,
)
from voicemesh.runtime.provider import ProviderInfo
from voicemesh.runtime.upstream import http_error, read_secret

log = logging.getLogger(__name__)

DEFAULT_MODEL = "amazon.nova-lite-v1:0"  # on-demand in us-east-1, tool use while streaming, cheap and quick
PROBE_TIMEOUT_S = 5.0
CONVERSATION_START = "(The conversation starts.)"  # Converse requires the first message to be the user's
API_KEY_ENV = "AWS_BEARER_TOKEN_BEDROCK"  # botocore's own variable for Bedrock API keys
_STOP = {"max_tokens": "length", "model_context_window_exceeded": "length", "tool_use": "tool_calls"}  # else "stop"
_PROFILE_PREFIXES = ("us.", "us-gov.", "eu.", "apac.", "jp.", "au.", "ca.", "global.")  # us.amazon.nova-lite-v1:0


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class BedrockSettings:
    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "model id (amazon.nova-lite-v1:0, anthropic.claude-3-haiku-20240307-v1:0), inference profile id (us.amazon...) or ARN"))
    region: str = field(default="", metadata=_help("AWS region; default: AWS_REGION, AWS_DEFAULT_REGION, the profile's"))
    endpoint: str = field(default="", metadata=_help("bedrock-runtime URL (VPC endpoint, gateway); default: AWS's regional"))
    control_endpoint: str = field(default="", metadata=_help("control-plane URL for the probe; default: --endpoint, else AWS's"))
    probe_mode: str = field(default="model", metadata=_help(
        "health probe: model (free, signed GetFoundationModel: endpoint, credentials, model), reachability, off"))
    profile: str = field(default="", metadata=_help("AWS shared-config profile; default: AWS_PROFILE, else the default chain"))
    api_key_file: str = field(default="", metadata=_help(f"file holding a Bedrock API key; else {API_KEY_ENV}; else SigV4"))
    max_attempts: int = field(default=3, metadata=_help("attempts at opening a request (botocore retries); never mid-stream"))
    connect_timeout_seconds: float = field(default=5.0, metadata=_help("longest wait to connect"))
    timeout_seconds: float = field(default=60.0, metadata=_help("longest wait for the response and between stream events"))
    send_top_p: bool = field(default=True, metadata=_help("send topP with temperature (false for models that reject both)"))


# --- request -------------------------------------------------------------------------------------
def converse_request(model: str, turns: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams,
                     send_top_p: bool = True) -> dict[str, Any]:
    """The ConverseStream arguments for one round."""
    if not (0 <= params.temperature <= 1 and 0 <= params.top_p <= 1):
        raise InvalidInput(f"bedrock: temperature {params.temperature} and top_p {params.top_p} must be within 0-1 for Converse")
    inference: dict[str, Any] = {"maxTokens": params.max_tokens, "temperature": params.temperature}
    if send_top_p:
        inference["topP"] = params.top_p
    if stop := [text for text in params.stop if text]:
        inference["stopSequences"] = stop
    request: dict[str, Any] = {"modelId": model, "messages": converse_messages(turns, native_tools=bool(tools)),
                               "inferenceConfig": inference}
    if system := [{"text": turn.content} for turn in turns if turn.role == "system" and turn.content]:
        request["system"] = system
    if tools:
        request["toolConfig"] = {"tools": [{"toolSpec": _tool_spec(tool)} for tool in tools]}
    return request


def _tool_spec(tool: ToolSpec) -> dict[str, Any]:
    schema = {"json": tool.parameters or {"type": "object", "properties": {}}}
    return {"name": tool.name, "inputSchema": schema, **({"description": tool.description} if tool.description else {})}


def _tool_result(content: str) -> list[dict[str, Any]]:
    with contextlib.suppress(json.JSONDecodeError):
        if isinstance(value := json.loads(content or "null"), dict):  # a JSON object as such; anything else as text
            return [{"json": value}]
    return [{"text": content or "(empty)"}]


def _blocks(turn: ChatTurn, native_tools: bool, names: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """The Converse role and content blocks of one turn."""
    if turn.role == "tool":
        if native_tools:
            return "user", [{"toolResult": {"toolUseId": turn.tool_call_id, "content": _tool_result(turn.content)}}]
        name = names.get(turn.tool_call_id) or turn.name or "tool"
        return "user", [{"text": f"[{name} returned: {turn.content}]"}]
    blocks: list[dict[str, Any]] = [{"text": turn.content}] if turn.content else []
    for call in turn.tool_calls:
        names[call.id] = call.name
        if native_tools:
            blocks.append({"toolUse": {"toolUseId": call.id, "name": call.name, "input": call.arguments}})
        else:
            blocks.append({"text": f"[called {call.name}({json.dumps(call.arguments)})]"})
    return turn.role, blocks


def converse_messages(turns: list[ChatTurn], native_tools: bool = True) -> list[dict[str, Any]]:
    """User/assistant turns as alternating Converse messages, first the user's."""
    messages: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> name, for tool history written as text
    for turn in turns:
        role, blocks = _blocks(turn, native_tools, names) if turn.role != "system" else ("system", [])
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    if not messages or messages[0]["role"] != "user":
        messages.insert(0, {"role": "user", "content": [{"text": CONVERSATION_START}]})
    return messages


# --- errors --------------------------------------------------------------------------------------
_CREDENTIALS = "check the AWS credentials (or the Bedrock API key)"
_CODES: dict[str, tuple[type[StreamError], str]] = {  # error code, lower-cased -> status, what to do
    "accessdeniedexception": (PermissionDenied, "grant bedrock:InvokeModelWithResponseStream and enable access to the model"),
    **dict.fromkeys(("unrecognizedclientexception", "invalidsignatureexception", "expiredtokenexception", "expiredtoken",
                     "incompletesignatureexception", "incompletesignature", "missingauthenticationtokenexception",
                     "missingauthenticationtoken"), (Unauthenticated, _CREDENTIALS)),
    **dict.fromkeys(("throttlingexception", "toomanyrequestsexception"), (ResourceExhausted, "too many requests: slow down")),
    "servicequotaexceededexception": (ResourceExhausted, "a Bedrock quota is used up: raise it in Service Quotas"),
    "resourcenotfoundexception": (NotFound, "check the model id and region"),
    "validationexception": (InvalidInput, ""),
    **dict.fromkeys(("modelnotreadyexception", "serviceunavailableexception", "internalserverexception",
                     "modelstreamerrorexception", "modelerrorexception"), (Unavailable, "try again")),
    "modeltimeoutexception": (DeadlineExceeded, "the model took too long; try a shorter request"),
}


def bedrock_error(err: BaseException, where: str) -> StreamError:
    """The StreamError for a botocore failure; `where` names the model and region."""
    from botocore import exceptions as bx

    if isinstance(err, bx.ClientError):  # EventStreamError (in-stream exceptions) is one too
        error = err.response.get("Error", {})
        code = str(error.get("Code", "")) or "Unknown"
        message = str(error.get("Message", "")).strip()[:300]
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        kind, hint = _CODES.get(code.lower(), (None, ""))
        if kind is None:
            return http_error("bedrock", status or 500, f"{code}: {message}", where)
        if kind is InvalidInput and "model identifier is invalid" in message.lower():  # Bedrock's answer to an unknown model
            kind, hint = NotFound, "no such model in this region: check the model id (or use an inference profile id)"
        if kind is InvalidInput and "top_p" in message and "temperature" in message:
            hint = "this model takes temperature or top_p, not both: set --send-top-p false"
        if kind is PermissionDenied and "access to the model" in message.lower():
            hint = "enable access to this model in the Bedrock console (Model access) for this account and region"
        return kind(f"bedrock: {code}: {message or 'no message'} ({where})" + (f"; {hint}" if hint else ""))
    if isinstance(err, bx.ParamValidationError):
        return InvalidInput(f"bedrock: the request does not fit Converse ({where}): {err}")
    if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return Unauthenticated(f"bedrock: no usable AWS credentials ({err}); {_CREDENTIALS}")
    if isinstance(err, (bx.ReadTimeoutError, bx.ConnectTimeoutError)):
        return DeadlineExceeded(f"bedrock: timed out ({where}): {err}")
    if isinstance(err, (bx.ConnectionError, bx.HTTPClientError, OSError)):
        return Unavailable(f"bedrock: cannot reach Bedrock ({where}): {err}")
    return StreamError(f"bedrock: unexpected failure ({where}): {type(err).__name__}: {err}")


# --- provider ------------------------------------------------------------------------------------
_END = object()  # the stream ended: put on the queue by the reading thread (a failure: the exception)


class BedrockLlmProvider(LlmProvider):
    name = "bedrock"
    settings_class = BedrockSettings

    def __init__(self, settings: BedrockSettings | None = None) -> None:
        self.settings = settings or BedrockSettings()
        self.model, self.region, self.endpoint = self.settings.model, self.settings.region, self.settings.endpoint
        self._runtime: Any = None
        self._control: Any = None
        self._credential_source = ""
        self._probe_mode = self.settings.probe_mode.strip().lower()
        if self._probe_mode not in ("model", "reachability", "off"):
            raise SystemExit(f"bedrock: probe_mode must be model, reachability or off, got {self.settings.probe_mode!r}")
        self._probe_note_logged = False

    async def load(self) -> None:
        if self._runtime is None:  # boto3's import, endpoint resolution and the credential chain (IMDS?) block
            await asyncio.to_thread(self._make_clients)
        log.info("bedrock ready: model %s, region %s, endpoint %s, credentials from %s, probe %s",
                 self.model, self.region, self.endpoint, self._credential_source, self._probe_mode)

    def _make_clients(self) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        s = self.settings
        key = read_secret(s.api_key_file, (API_KEY_ENV,), "bedrock API key", required=False)
        if key is not None and key.source != API_KEY_ENV:  # botocore reads a Bedrock API key from there only
            os.environ[API_KEY_ENV] = key.reveal()
        try:
            # boto3 reads AWS_DEFAULT_REGION and the profile's region, not AWS_REGION (the other SDKs' variable)
            region = s.region or os.environ.get("AWS_REGION") or None
            session = boto3.session.Session(profile_name=s.profile or None, region_name=region)
        except ProfileNotFound as err:
            raise SystemExit(f"bedrock: {err}") from None
        self.region = session.region_name or ""
        if not self.region:
            raise SystemExit("bedrock: no AWS region; set --region, VOICEMESH_LLM_BEDROCK_REGION or AWS_REGION")
        if key is not None:
            if s.endpoint.startswith("http://"):
                raise SystemExit("bedrock: a Bedrock API key is only sent over https; use an https --endpoint")
            self._credential_source = f"Bedrock API key ({key.source})"
        else:
            credentials = session.get_credentials()
            if credentials is None:
                raise SystemExit(f"bedrock: no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                                 f"attach a role, or use a Bedrock API key ({API_KEY_ENV}, --api-key-file)")
            self._credential_source = credentials.method  # "env", "shared-credentials-file", "iam-role", ...
        config = Config(retries={"mode": "standard", "total_max_attempts": max(1, s.max_attempts)},
                        connect_timeout=s.connect_timeout_seconds, read_timeout=s.timeout_seconds,
                        max_pool_connections=64, user_agent_extra="voicemesh")
        once = Config(retries={"total_max_attempts": 1}, connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S)
        try:
            self._runtime = session.client("bedrock-runtime", endpoint_url=s.endpoint or None, config=config)
            self._control = session.client("bedrock", endpoint_url=s.control_endpoint or s.endpoint or None, config=once)
        except (BotoCoreError, ValueError) as err:
            raise SystemExit(f"bedrock: cannot make the client: {err}") from None
        self.endpoint = self._runtime.meta.endpoint_url

    def info(self) -> ProviderInfo:
        return ProviderInfo(provider="bedrock", model=self.model, details={
            "region": self.region, "endpoint": self.endpoint, "api": "converse_stream", "credentials": self._credential_source,
            "probe": self._probe_mode, "max_attempts": str(self.settings.max_attempts)})

    async def close(self) -> None:
        for client in (self._runtime, self._control):
            with contextlib.suppress(Exception):
                client.close()

    # --- health ------------------------------------------------------------------------------
    async def probe(self) -> str | None:
        """`model`: the free, signed GetFoundationModel (GetInferenceProfile) on the control plane proves
        the endpoint answers, the credentials are valid and the model exists in the region, not that
        InvokeModel is allowed. AccessDenied and throttling prove the credentials valid too (AWS checks
        the signature first): they pass, logged once. `reachability`: any HTTP answer from the endpoint."""
        if self._probe_mode == "off" or self._runtime is None:
            return None
        try:
            details = await asyncio.to_thread(self._describe_model)
        except Exception as err:  # noqa: BLE001 - every failure is a reason
            mapped = bedrock_error(err, self._where())
            if not isinstance(mapped, (PermissionDenied, ResourceExhausted)):
                return mapped.message
            if not self._probe_note_logged:
                self._probe_note_logged = True
                log.warning("bedrock probe: %s; it then proves reachability and valid credentials only", mapped.message)
            return None
        if details.get("responseStreamingSupported") is False:
            return f"bedrock: model {self.model} does not support streaming ({self._where()}); choose another model"
        return None

    def _describe_model(self) -> dict[str, Any]:
        model = self.model
        if self._probe_mode == "reachability" or (model.startswith("arn:") and ":foundation-model/" not in model
                                                  and "inference-profile/" not in model):
            try:  # provisioned and imported models have no free per-model lookup either
                urllib.request.urlopen(self.endpoint, timeout=PROBE_TIMEOUT_S).close()  # noqa: S310 - our endpoint
            except urllib.request.HTTPError:
                pass  # any HTTP status: something answered
            return {}
        if model.startswith(_PROFILE_PREFIXES) or "inference-profile/" in model:
            return self._control.get_inference_profile(inferenceProfileIdentifier=model)
        return self._control.get_foundation_model(modelIdentifier=model).get("modelDetails", {})

    def _where(self) -> str:
        return f"model {self.model}, region {self.region}, endpoint {self.endpoint}"

    # --- one round -----------------------------------------------------------------------------
    async def stream(self, messages: list[ChatTurn], tools: list[ToolSpec], params: GenerationParams) -> AsyncIterator[LlmEvent]:
        if self._runtime is None:
            raise RuntimeError("BedrockLlmProvider.stream() called before load()")
        request = converse_request(self.model, messages, tools, params, self.settings.send_top_p)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled, finished = threading.Event(), threading.Event()
        opened: list[Any] = []  # the EventStream, once the response is in

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:  # on its own thread: boto3 blocks
            upstream = None
            try:
                upstream = self._runtime.converse_stream(**request)["stream"]  # botocore's retries happen in here
                opened.append(upstream)
                for event in () if cancelled.is_set() else upstream:  # cancelled while opening: the loop had nothing to stop
                    if cancelled.is_set():
                        return
                    put(event)
                put(_END)
            except Exception as err:  # noqa: BLE001 - handed to the loop, mapped there
                if not cancelled.is_set():
                    put(err)
            finally:
                finished.set()
                _close(upstream)

        threading.Thread(target=read, name="bedrock-stream", daemon=True).start()
        try:
            async for event in self._events(queue, params):
                yield event
        finally:
            cancelled.set()
            if opened and not finished.is_set():
                _close(opened[0], shutdown=True)

    async def _events(self, queue: asyncio.Queue[Any], params: GenerationParams) -> AsyncIterator[LlmEvent]:
        blocks: dict[int, dict[str, str]] = {}  # open toolUse blocks by index: id, name, input so far
        stop_reason, usage, calls = "", {}, 0
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise bedrock_error(item, self._where())
            if (start := item.get("contentBlockStart")) and (tool := start.get("start", {}).get("toolUse")):
                blocks[start.get("contentBlockIndex", 0)] = {"id": tool["toolUseId"], "name": tool["name"], "input": ""}
            elif delta := item.get("contentBlockDelta"):
                body = delta.get("delta", {})
                if text := body.get("text"):
                    yield TextDelta(text)
                elif "toolUse" in body and (block := blocks.get(delta.get("contentBlockIndex", 0))) is not None:
                    block["input"] += body["toolUse"].get("input", "")
                # reasoningContent and citations are not spoken
            elif "contentBlockStop" in item and (block := blocks.pop(item["contentBlockStop"].get("contentBlockIndex", 0), None)):
                calls += 1
                yield self._tool_call(block, params)
            elif stop := item.get("messageStop"):
                stop_reason = stop.get("stopReason", "")
            elif metadata := item.get("metadata"):
                usage = metadata.get("usage", {})
        if not stop_reason:
            raise Unavailable(f"bedrock: the stream ended before messageStop ({self._where()}); try again")
        finish = "tool_calls" if calls else _STOP.get(stop_reason, "stop")
        yield RoundEnd(finish, int(usage.get("inputTokens", 0)), int(usage.get("outputTokens", 0)))

    def _tool_call(self, block: dict[str, str], params: GenerationParams) -> ToolCallRequest:
        text, what = block["input"], f"bedrock: model {self.model} called tool {block['name']!r} with input that is"
        try:
            arguments = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            raise StreamError(f"{what} not valid JSON ({err.msg} at {err.pos}): {text[:120]!r}; "
                              f"cut short by max_tokens {params.max_tokens}?") from None
        if not isinstance(arguments, dict):
            raise StreamError(f"{what} not a JSON object: {text[:120]!r}")
        return ToolCallRequest(block["id"], block["name"], arguments)


def _close(upstream: Any, shutdown: bool = False) -> None:
    """Close an event stream. `shutdown`: another thread may be blocked reading it, so shut the socket
    down first (that wakes the reader; closing then drops the connection). Both return at once."""
    if shutdown:
        with contextlib.suppress(Exception):  # urllib3 >= 2.3; raises once the connection is closed or released
            upstream._raw_stream.shutdown()  # botocore's EventStream over a urllib3 response
    with contextlib.suppress(Exception):  # None, or closed already
        upstream.close()
