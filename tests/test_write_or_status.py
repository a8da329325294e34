"""A write to a call the peer has already ended reports the peer's status, not the "Internal error
from Core" grpc.aio raises for the write itself (voicemesh.runtime.streams.write_or_status)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from voicemesh.runtime.streams import write_or_status


class _EndedCall:
    def __init__(self, code: grpc.StatusCode, details: str, ended: bool = True):
        self._code, self._details, self._ended = code, details, ended

    async def write(self, message) -> None:
        raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="Internal error from Core")

    def done(self) -> bool:
        return self._ended

    async def code(self) -> grpc.StatusCode:
        return self._code

    async def details(self) -> str:
        return self._details


@pytest.mark.parametrize("write_error", ["rpc", "finished"])
async def test_the_service_status_replaces_the_write_error(write_error):
    call = _EndedCall(grpc.StatusCode.UNAVAILABLE, "no healthy upstream")
    if write_error == "finished":
        async def finished(message):
            raise asyncio.InvalidStateError("RPC already finished.")
        call.write = finished
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await write_or_status(call, object())
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.UNAVAILABLE, "no healthy upstream")


@pytest.mark.parametrize("call", [_EndedCall(grpc.StatusCode.OK, "", ended=True),
                                  _EndedCall(grpc.StatusCode.UNAVAILABLE, "x", ended=False)])
async def test_otherwise_the_write_error_stands(call):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await write_or_status(call, object())
    assert raised.value.code() == grpc.StatusCode.INTERNAL
