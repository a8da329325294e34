"""What every cloud provider shares: its settings, its secret, its errors, its retries.

- Settings: a dataclass per provider (`Provider.settings_class`), read from
  VOICEMESH_<KIND>_<PROVIDER>_<FIELD> and from `--<field>` flags (`voicemesh-serve stt --provider riva
  --help` lists them). Secrets are never settings: flags show in `ps`, and settings are logged.
- Secrets: `read_secret` takes a mounted file first (a Kubernetes Secret volume), then the
  provider's own standard env vars. `Secret` never prints its value.
- Errors: `http_error` maps an upstream HTTP status onto the StreamError a caller can act on.
- Retries: `open_with_retry` retries opening an upstream request (connect, first response)
  with backoff; once a single result has gone out, a failure is final (never mid-stream).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TypeVar

from voicemesh.runtime.errors import (
    DeadlineExceeded, InvalidInput, NotFound, PermissionDenied, ResourceExhausted, StreamError, Unauthenticated,
    Unavailable,
)

log = logging.getLogger("voicemesh.upstream")
T = TypeVar("T")
S = TypeVar("S")


class Secret:
    """A credential: `reveal()` gives the value; str/repr/format never do."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str):
        self._value = value
        self.source = source  # where it came from (an env var name or a file path), safe to log

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"

    __str__ = __repr__


def read_secret(file_path: str, env_names: tuple[str, ...], what: str, required: bool = True) -> Secret | None:
    """The credential from `file_path` (a mounted Secret) if set, else the first set env var.
    Raises SystemExit with what to set when `required` and none is there."""
    if file_path:
        try:
            value = Path(file_path).read_text().strip()
        except OSError as err:
            raise SystemExit(f"{what}: cannot read the key file {file_path}: {err.strerror}") from None
        if value:
            return Secret(value, file_path)
    for name in env_names:
        if value := os.environ.get(name, "").strip():
            return Secret(value, name)
    if required:
        raise SystemExit(f"{what}: no credential; set {' or '.join(env_names)}, or mount one and set its path")
    return None


def _convert(raw: str, default: object, name: str, where: str) -> object:
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"{where}: {name} must be true or false, got {raw!r}")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise SystemExit(f"{where}: {name} must be a {type(default).__name__}, got {raw!r}") from None
    return raw


def env_name(kind: str, provider: str, name: str) -> str:
    """VOICEMESH_<KIND>_<PROVIDER>_<FIELD>: qualified by the provider, so one environment (a
    ConfigMap) holds the settings of several providers without one's voice or model reaching
    another, and a swap is VOICEMESH_<KIND>_PROVIDER alone."""
    return f"VOICEMESH_{kind.upper()}_{provider.upper().replace('-', '_')}_{name.upper()}"


def load_settings(kind: str, provider: str, settings_class: type[S], overrides: dict[str, object] | None = None) -> S:
    """Defaults, then env vars (`env_name`), then flags (`overrides`, None = unset)."""
    values: dict[str, object] = {}
    for spec in fields(settings_class):
        default = spec.default if spec.default is not MISSING else ""
        variable = env_name(kind, provider, spec.name)
        raw = os.environ.get(variable)
        if raw not in (None, ""):
            values[spec.name] = _convert(raw, default, spec.name, variable)
        override = (overrides or {}).get(spec.name)
        if override is not None:
            values[spec.name] = _convert(str(override), default, spec.name, f"--{spec.name.replace('_', '-')}")
    return settings_class(**values)


def http_error(provider: str, status: int, detail: str, hint: str = "") -> StreamError:
    """The StreamError for an upstream HTTP (or WebSocket handshake) status."""
    detail = (detail or "").strip()[:300]
    message = f"{provider}: {detail or 'HTTP ' + str(status)} (upstream HTTP {status})"
    if hint:
        message += f"; {hint}"
    if status == 401:
        return Unauthenticated(message)
    if status == 403:
        return PermissionDenied(message)
    if status == 404:
        return NotFound(message)
    if status in (408, 504):
        return DeadlineExceeded(message)
    if status == 429:
        return ResourceExhausted(message)
    if 400 <= status < 500:
        return InvalidInput(message)
    return Unavailable(message)


def is_transient(err: BaseException) -> bool:
    """Worth another try: the provider is unreachable, overloaded or throttling."""
    return isinstance(err, (Unavailable, ResourceExhausted, DeadlineExceeded, ConnectionError, asyncio.TimeoutError))


async def open_with_retry(
    open_call: Callable[[], Awaitable[T]], what: str, attempts: int = 3, base_delay_s: float = 0.2,
    max_delay_s: float = 2.0, transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """`await open_call()`, retried with full-jitter exponential backoff on transient errors.
    Only for work that has produced nothing yet: the caller never retries mid-stream."""
    for attempt in range(1, attempts + 1):
        try:
            return await open_call()
        except Exception as err:  # noqa: BLE001 - classified below
            if attempt == attempts or not transient(err):
                raise
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1)))
            log.info("%s: attempt %d failed (%s); retrying in %.2f s", what, attempt, err, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
