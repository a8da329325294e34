"""A fake Amazon Bedrock: ConverseStream (bedrock-runtime) and the model lookups (control plane).

It speaks Bedrock's REST-JSON wire protocol on 127.0.0.1, so boto3 talks to it unmodified but for
`endpoint_url` (requests are SigV4-signed with whatever credentials the client has; the fake
records the Authorization header's scheme and credential scope but does not check signatures):

- `POST /model/{modelId}/converse-stream` (the model id URL-encoded): the Converse request, as
  JSON. The answer is `application/vnd.amazon.eventstream`: messageStart, text blocks as
  contentBlockDelta.text, tool calls as contentBlockStart.toolUse + contentBlockDelta.toolUse.input
  fragments (`chunk_chars` each) + contentBlockStop, then messageStop and metadata. Each event is
  written as soon as the backend gives its part.
- `GET /foundation-models/{id}`, `GET /inference-profiles/{id}`: what the provider's probe asks.

The content comes from a chat backend (backends.ScriptedChat by default; OpenAiChat for the swap
test): the Converse messages are translated to OpenAI-shaped ones for it, its parts into events.

Errors come as Bedrock sends them: HTTP 4xx/5xx with `x-amzn-ErrorType` and `{"message"}` before
the stream (`fail_next(error_class)`, `fail_next_with(status, code, message)`), or an in-stream
exception message after some events (`fail_in_stream(code, message, after_parts)`). Only
converse-stream requests take these; `refuse_auth` makes every request (the probe's too) fail
with UnrecognizedClientException, and `pause()`/`resume()` make the endpoint go away and return.

Recorded: "auth" (header present, scheme, scope), "request" ({model, raw_path, body}), "probe"
(model), "fragments" (tool-input deltas sent), "done" (model), "cancelled" ({model, prompt: the last
user text}: the client dropped the connection mid-stream).
"""
from __future__ import annotations

import asyncio
import json
import uuid

from aiohttp import web

from cloud.fakes.backends import Finish, ScriptedChat, TextPart, ToolCallPart
from cloud.fakes.base import FakeProvider
from voicemesh.stt.providers.aws_eventstream import encode_message, event

MODELS = ("amazon.nova-lite-v1:0", "anthropic.claude-3-haiku-20240307-v1:0")
PROFILES = ("us.amazon.nova-lite-v1:0",)
_ERRORS = {  # error class -> how Bedrock answers it
    "auth": (403, "UnrecognizedClientException", "The security token included in the request is invalid."),
    "throttle": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
    "not_found": (400, "ValidationException", "The provided model identifier is invalid."),
    "bad_format": (400, "ValidationException", "Malformed input request: #/messages/0/content: expected type: JSONArray, "
                                               "please reformat your input and try again."),
    "unavailable": (503, "ServiceUnavailableException", "Bedrock is unable to process your request."),
}
def stream_exception(code: str, message: str) -> bytes:
    """An in-stream exception as Bedrock sends it: its members (`message`) are lower-case, unlike
    Transcribe's (`Message`, what aws_eventstream.exception writes)."""
    return encode_message({":message-type": "exception", ":exception-type": code, ":content-type": "application/json"},
                          json.dumps({"message": message}).encode())


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def openai_messages(body: dict) -> list[dict]:
    """The Converse request's system and messages in the OpenAI chat shape."""
    out: list[dict] = []
    if system := "\n".join(block["text"] for block in body.get("system", []) if "text" in block):
        out.append({"role": "system", "content": system})
    for message in body.get("messages", []):
        blocks = message.get("content", [])
        text = "\n".join(block["text"] for block in blocks if "text" in block)
        if message["role"] == "assistant":
            reply: dict = {"role": "assistant", "content": text}
            calls = [block["toolUse"] for block in blocks if "toolUse" in block]
            if calls:
                reply["tool_calls"] = [{"id": c["toolUseId"], "type": "function",
                                        "function": {"name": c["name"], "arguments": json.dumps(c.get("input", {}))}}
                                       for c in calls]
            out.append(reply)
            continue
        for block in blocks:
            if result := block.get("toolResult"):
                parts = [json.dumps(p["json"]) if "json" in p else p.get("text", "") for p in result.get("content", [])]
                out.append({"role": "tool", "tool_call_id": result["toolUseId"], "content": "\n".join(parts)})
        if text:
            out.append({"role": "user", "content": text})
    return out


def openai_tools(body: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": t["toolSpec"]["name"], "description": t["toolSpec"].get("description", ""),
                                              "parameters": t["toolSpec"]["inputSchema"]["json"]}}
            for t in body.get("toolConfig", {}).get("tools", [])]


def error_response(status: int, code: str, message: str) -> web.Response:
    error_type = f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    return web.json_response({"message": message}, status=status,
                             headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": str(uuid.uuid4())})


def _last_user_text(body: dict) -> str:
    texts = [b["text"] for m in body.get("messages", []) if m["role"] == "user" for b in m["content"] if "text" in b]
    return texts[-1] if texts else ""


def _scope(authorization: str) -> str:
    """`us-east-1/bedrock/aws4_request` from a SigV4 header (the access key id left out)."""
    for part in authorization.replace(",", " ").split():
        if part.startswith("Credential="):
            return "/".join(part.split("/")[2:])
    return ""


class FakeBedrock(FakeProvider):
    name = "bedrock"

    def __init__(self, backend=None, models: tuple[str, ...] = MODELS, chunk_chars: int = 8, ssl_context=None):
        """ssl_context: serve HTTPS (botocore sends a Bedrock API key over HTTPS only)."""
        super().__init__()
        self.ssl_context = ssl_context
        self.backend = backend or ScriptedChat()
        self.models = set(models)
        self.chunk_chars = chunk_chars
        self.refuse_auth = False
        self.fail_probe_next: tuple[str, str] | None = None  # (code, message): the next model lookup gets a 403
        self._raw_failures: list[tuple] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a voicemesh LLM service needs to use this fake (credentials: conftest.DUMMY_AWS)."""
        return {"VOICEMESH_LLM_BEDROCK_ENDPOINT": self.endpoint, "VOICEMESH_LLM_BEDROCK_MODEL": MODELS[0]}

    # --- failures on demand ------------------------------------------------------------------
    def fail_next_with(self, status: int, code: str, message: str) -> None:
        """The next converse-stream request gets this HTTP error."""
        with self._changed:
            self._raw_failures.append(("http", status, code, message))

    def fail_in_stream(self, code: str, message: str, after_parts: int = 1) -> None:
        """The next converse-stream request streams `after_parts` backend parts, then this
        in-stream exception (`:message-type: exception`, e.g. modelStreamErrorException)."""
        with self._changed:
            self._raw_failures.append(("stream", after_parts, code, message))

    def _take(self) -> tuple | None:
        if error_class := self.take_failure():
            return ("http", *_ERRORS[error_class])
        with self._changed:
            return self._raw_failures.pop(0) if self._raw_failures else None

    # --- lifecycle ---------------------------------------------------------------------------
    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/model/{model}/converse-stream", self._converse)
        app.router.add_get("/foundation-models/{model}", self._foundation_model)
        app.router.add_get("/inference-profiles/{model}", self._inference_profile)
        # Cancel the handler when the client drops the connection: that is how a cancel is seen.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.ssl_context)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def pause(self) -> None:
        """Stop listening and drop open connections (the endpoint is gone) until `resume()`; the
        port is kept."""
        async def go() -> None:
            await self._site.stop()
            for connection in self._runner.server.connections:  # pooled keep-alive ones too
                connection.force_close()

        self.call(go())

    def resume(self) -> None:
        self.call(self._listen())

    # --- handlers ----------------------------------------------------------------------------
    def _check_auth(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization", "")
        self.record("auth", {"present": bool(authorization), "scheme": authorization.split(" ", 1)[0],
                             "scope": _scope(authorization), "path": request.path})
        if self.refuse_auth or not authorization:
            return error_response(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
        return None

    async def _foundation_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        self.record("probe", model)
        if refused := self._check_auth(request):
            return refused
        if self.fail_probe_next:
            (code, message), self.fail_probe_next = self.fail_probe_next, None
            return error_response(403, code, message)
        if model not in self.models:
            return error_response(404, "ResourceNotFoundException",
                                  "Could not resolve the foundation model from the provided model identifier.")
        return web.json_response({"modelDetails": {
            "modelArn": f"arn:aws:bedrock:us-east-1::foundation-model/{model}", "modelId": model, "modelName": model,
            "providerName": model.split(".")[0], "inputModalities": ["TEXT"], "outputModalities": ["TEXT"],
            "responseStreamingSupported": True, "customizationsSupported": [], "inferenceTypesSupported": ["ON_DEMAND"],
            "modelLifecycle": {"status": "ACTIVE"}}})

    async def _inference_profile(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        self.record("probe", model)
        if refused := self._check_auth(request):
            return refused
        if model not in PROFILES:
            return error_response(404, "ResourceNotFoundException", "The inference profile was not found.")
        return web.json_response({"inferenceProfileName": model, "inferenceProfileId": model,
                                  "inferenceProfileArn": f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{model}",
                                  "models": [], "status": "ACTIVE", "type": "SYSTEM_DEFINED"})

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        if refused := self._check_auth(request):
            return refused
        model = request.match_info["model"]
        body = await request.json()
        self.record("request", {"model": model, "raw_path": request.raw_path, "body": body})
        failure = self._take()
        if failure and failure[0] == "http":
            return error_response(*failure[1:])
        if model not in self.models and model not in PROFILES:
            return error_response(400, "ValidationException", "The provided model identifier is invalid.")
        response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream",
                                               "x-amzn-RequestId": str(uuid.uuid4())})
        await response.prepare(request)
        try:
            await self._answer(response, body, failure)
        except (asyncio.CancelledError, ConnectionResetError):
            self.record("cancelled", {"model": model, "prompt": _last_user_text(body)})
            raise
        self.record("done", model)
        return response

    async def _answer(self, response: web.StreamResponse, body: dict, failure: tuple | None) -> None:
        async def send(event_type: str, payload: dict) -> None:
            await response.write(event(event_type, json.dumps(payload).encode(), "application/json"))

        await send("messageStart", {"role": "assistant"})
        index, text_open, parts, finish = 0, False, 0, None

        async def close_text() -> None:
            nonlocal index, text_open
            if text_open:
                await send("contentBlockStop", {"contentBlockIndex": index})
                index, text_open = index + 1, False

        async for part in self.backend.chat(openai_messages(body), openai_tools(body)):
            if failure and failure[0] == "stream" and parts >= failure[1]:
                await response.write(stream_exception(failure[2], failure[3]))
                return
            parts += 1
            if isinstance(part, TextPart):
                text_open = True  # Bedrock sends no contentBlockStart for text
                await send("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": part.text}})
            elif isinstance(part, ToolCallPart):
                await close_text()
                await send("contentBlockStart", {"contentBlockIndex": index,
                                                 "start": {"toolUse": {"toolUseId": part.id, "name": part.name}}})
                fragments = [part.arguments[i:i + self.chunk_chars] for i in range(0, len(part.arguments), self.chunk_chars)]
                for fragment in fragments:
                    await send("contentBlockDelta", {"contentBlockIndex": index, "delta": {"toolUse": {"input": fragment}}})
                self.record("fragments", len(fragments))
                await send("contentBlockStop", {"contentBlockIndex": index})
                index += 1
            elif isinstance(part, Finish):
                finish = part
        if failure and failure[0] == "stream":  # the backend gave fewer parts than asked for
            await response.write(stream_exception(failure[2], failure[3]))
            return
        await close_text()
        finish = finish or Finish("stop")
        await send("messageStop", {"stopReason": _STOP_REASONS.get(finish.reason, "end_turn")})
        await send("metadata", {"usage": {"inputTokens": finish.input_tokens, "outputTokens": finish.output_tokens,
                                          "totalTokens": finish.input_tokens + finish.output_tokens},
                                "metrics": {"latencyMs": 1}})
