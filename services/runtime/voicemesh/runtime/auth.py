"""API keys: who may call Converse (and the transport), checked once per call.

The key file (`VOICEMESH_API_KEYS_FILE`, or a mounted Kubernetes Secret) holds one SHA-256 hex
digest per line, never a key: whoever reads the file (or the Secret) cannot call with it.
Blank lines and `#` comments are ignored, so a rotation is "add the new digest, roll the
clients, remove the old one". `python -m voicemesh.runtime.auth hash` prints the digest of a key
(read from stdin, so it stays out of the shell history); `... new` makes a random key and prints
the key and its digest.

Callers send `authorization: Bearer <key>`. The presented key is hashed and compared with every
stored digest by `hmac.compare_digest` (constant time, no early exit). The file is re-read when
it changes (a stat per call: a Secret's update is an atomic symlink swap, so a new inode), so a
rotation needs no restart. A file that turns malformed keeps those of the previous keys it still
lists (a typo must not lock every caller out, and a digest removed in the same edit is still
revoked); one that turns unreadable keeps the previous keys; a file emptied of digests revokes
every key: emptying it is how an operator shuts the door, so it must not be mistaken for a bad edit.

On the orchestrator the check is a grpc.aio server interceptor: it runs before the handler, once
per call, so a refused call makes no session and costs nothing per message.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import sys
import threading
from pathlib import Path

import grpc

from voicemesh.runtime.streams import before_refusing

log = logging.getLogger("voicemesh.auth")
DIGEST = re.compile(r"^[0-9a-f]{64}$")
# What a key protects, per service kind. Health and reflection stay open: the kubelet and Envoy
# probe health without credentials, and reflection only describes the public, published schema.
# The orchestrator's Info is protected: it lists every service's provider, model and version.
PROTECTED_METHODS = {
    "orchestrator": frozenset({"/voicemesh.v1.OrchestratorService/Converse", "/voicemesh.v1.OrchestratorService/Info"}),
}
MISSING = "missing credential: this service requires an API key; send the metadata 'authorization: Bearer <key>'"
MALFORMED = "malformed credential: the authorization metadata must be 'Bearer <key>'"
WRONG = "invalid API key"


def digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def parse_key_file(text: str, source: str, allow_empty: bool = False) -> tuple[str, ...]:
    """The digests of a key file; ValueError (naming the line, never its content) if malformed,
    or if it holds none and `allow_empty` is false (at startup an empty file is a mistake)."""
    digests = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not DIGEST.match(line):
            raise ValueError(f"{source} line {number}: not a SHA-256 hex digest; the file holds digests, not keys "
                             "(make one with: python -m voicemesh.runtime.auth hash)")
        digests.append(line)
    if not digests and not allow_empty:
        raise ValueError(f"{source}: no key digests")
    return tuple(digests)


class KeyStore:
    """The digests of one key file, re-read when the file changes."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._digests: tuple[str, ...] = ()
        self._refresh(initial=True)

    def _refresh(self, initial: bool = False) -> None:
        try:
            info = os.stat(self.path)
        except OSError as err:
            if initial:
                raise SystemExit(f"API keys file {self.path}: {err.strerror}") from None
            return  # a Secret mid-update, or removed: keep the keys we have
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                text = Path(self.path).read_text()
                digests = parse_key_file(text, self.path, allow_empty=not initial)
            except (OSError, ValueError) as err:
                if initial:
                    raise SystemExit(f"API keys: {err}") from None
                listed = set(text.lower().split()) if isinstance(err, ValueError) else set(self._digests)
                kept = tuple(d for d in self._digests if d in listed)
                log.warning("API keys file not reloaded, keeping %d of the previous %d keys (those it still lists): %s",
                            len(kept), len(self._digests), err)
                self._digests, self._stamp = kept, stamp  # one warning per change
                return
            self._digests, self._stamp = digests, stamp
            if digests:
                log.info("API keys loaded", extra={"keys_file": self.path, "keys": len(digests)})
            else:
                log.warning("API keys file holds no digests: every key is revoked, every call refused",
                            extra={"keys_file": self.path})

    def check(self, key: str) -> bool:
        self._refresh()
        presented = digest(key).encode()
        found = False
        for stored in self._digests:  # every digest compared: the time does not say which matched
            found |= hmac.compare_digest(presented, stored.encode())
        return found

    def check_header(self, value: str | None) -> str | None:
        """None when `value` (an authorization header) carries a valid key, else why not."""
        if not value:
            return MISSING
        scheme, _, key = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return MALFORMED
        return None if self.check(key.strip()) else WRONG


def bearer(metadata) -> str | None:
    for name, value in metadata or ():
        if name == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED; a
    streaming one after the caller's first message (streams.before_refusing), which it takes as
    raw bytes, never parsed: the caller is unknown."""

    async def refuse(request, context):
        if handler.request_streaming:
            await before_refusing(request)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, store: KeyStore, methods: frozenset[str]):
        self.store = store
        self.methods = methods

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method not in self.methods:
            return handler
        problem = self.store.check_header(bearer(details.invocation_metadata))
        if problem is None:
            return handler
        log.info("call refused", extra={"method": details.method, "reason": problem})
        return _deny(handler, problem)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name or a wildcard: reachable from elsewhere


def server_interceptors(kind: str, keys_file: str, host: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a service installs: the key check where the kind has protected methods
    and a key file is set; none otherwise (open, as before, with a warning off loopback)."""
    methods = PROTECTED_METHODS.get(kind)
    if not methods:
        return []
    if not keys_file:
        if not is_loopback(host):
            log.warning("no API keys configured (VOICEMESH_API_KEYS_FILE): %s is open to anyone who reaches %s",
                        kind, host)
        return []
    return [ApiKeyInterceptor(KeyStore(keys_file), methods)]


def read_key(path: str, what: str) -> str:
    """A client's own key from a file (a mounted Secret); SystemExit saying what is wrong."""
    try:
        key = Path(path).read_text().strip()
    except OSError as err:
        raise SystemExit(f"{what}: cannot read the key file {path}: {err.strerror}") from None
    if not key:
        raise SystemExit(f"{what}: the key file {path} is empty")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voicemesh.runtime.auth", description="API key digests for key files.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("hash", help="read keys from stdin (one per line), print one digest per line")
    commands.add_parser("new", help="make a random key; print the key (for the client) and its digest (for the file)")
    args = parser.parse_args(argv)
    if args.command == "new":
        key = secrets.token_urlsafe(32)
        print(f"key:    {key}\ndigest: {digest(key)}")
        return 0
    keys = [line.strip() for line in sys.stdin if line.strip()]
    if not keys:
        print("no key on stdin", file=sys.stderr)
        return 1
    for key in keys:
        print(digest(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
