"""Tool calls across Converse (ToolBroker: results, timeouts, barge-in, late answers) and the
SessionConfig defaults the orchestrator derives (Smart Turn's stop wait). In-process."""
from __future__ import annotations

import asyncio

import pytest

from voicemesh.orchestrator.config import smart_turn_and_stop_secs, validate
from voicemesh.orchestrator.tools import ToolBroker
from voicemesh.runtime.errors import InvalidInput
from voicemesh.v1 import llm_pb2, orchestrator_pb2 as pb

CALLS = [llm_pb2.ToolCall(id="a", name="weather", arguments_json='{"city": "Paris"}'), llm_pb2.ToolCall(id="b", name="time")]


def kinds(sent: list[pb.ConverseResponse]) -> list[str]:
    return [message.WhichOneof("event") for message in sent]


class Sent(list):
    """What the broker sends to the caller, with an event per message to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.grew = asyncio.Event()

    def append(self, message) -> None:
        super().append(message)
        self.grew.set()

    async def until(self, count: int, timeout: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while len(self) < count:
                    self.grew.clear()
                    await self.grew.wait()
        except TimeoutError:
            raise AssertionError(f"waited for {count} messages, saw {kinds(self)}") from None


async def test_calls_of_a_round_run_in_parallel_and_answer_in_call_order():
    sent, changes = Sent(), []
    broker = ToolBroker(sent.append, timeout_s=5, on_change=changes.append)
    task = asyncio.ensure_future(broker.run(CALLS, turn_number=3))
    await sent.until(2)
    assert [(m.tool_call.id, m.tool_call.turn_number) for m in sent] == [("a", 3), ("b", 3)] and broker.in_progress
    broker.resolve(pb.ToolCallResult(tool_call_id="b", content="noon", run_llm=False))
    broker.resolve(pb.ToolCallResult(tool_call_id="a", content="sunny"))
    results = await task
    assert [(r.tool_call_id, r.content, r.skip_reply, run_llm) for r, run_llm in results] == [
        ("a", "sunny", False, True), ("b", "noon", True, False)]
    assert changes[0] is True and changes[-1] is False and not broker.in_progress


async def test_a_tool_that_does_not_answer_in_time_gets_an_error_result():
    sent = []
    broker = ToolBroker(sent.append, timeout_s=0.01)
    ((result, run_llm),) = await broker.run(CALLS[:1], turn_number=1)
    assert result.is_error and "did not answer within 0.01 s" in result.content and run_llm
    assert kinds(sent) == ["tool_call", "tool_call_cancelled"]
    assert (list(sent[1].tool_call_cancelled.ids), sent[1].tool_call_cancelled.reason) == (["a"], "timeout")


async def test_barge_in_cancels_the_pending_calls_and_a_late_answer_is_an_error():
    sent, changes = Sent(), []
    broker = ToolBroker(sent.append, timeout_s=5, on_change=changes.append)
    task = asyncio.ensure_future(broker.run(CALLS, turn_number=1))
    await sent.until(2)
    broker.cancel_all("interrupted")  # the turn controller's CancelTools on barge-in
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled = sent[2].tool_call_cancelled
    assert (list(cancelled.ids), cancelled.reason, changes[-1]) == (["a", "b"], "interrupted", False)
    broker.resolve(pb.ToolCallResult(tool_call_id="a", content="late"))
    assert sent[-1].error.code == "FAILED_PRECONDITION" and not sent[-1].error.fatal


@pytest.mark.parametrize("turn,vad,expected", [
    ({}, {}, (True, 0.2)),  # Smart Turn on by default: a short pause is enough to ask the model
    ({"smart_turn": False}, {}, (False, 0.8)),
    ({"smart_turn": True}, {}, (True, 0.2)),
    ({}, {"stop_secs": 0.5}, (True, 0.5)),
    ({"smart_turn": False}, {"stop_secs": 1.5}, (False, 1.5)),
])
def test_smart_turn_and_its_stop_wait(turn, vad, expected):
    config = pb.SessionConfig(turn=pb.TurnOptions(**turn), vad=pb.VadOptions(**vad))
    assert smart_turn_and_stop_secs(config) == expected


@pytest.mark.parametrize("turn,vad,ok", [
    ({"max_silence_secs": 0.1}, {}, False),  # shorter than Smart Turn's 0.2 s stop wait
    ({"max_silence_secs": 0.2}, {}, True),
    ({"max_silence_secs": 0.5, "smart_turn": False}, {}, True),  # without Smart Turn it is not used
    ({"max_silence_secs": 1}, {"stop_secs": 2}, False),
    ({}, {"stop_secs": 4}, False),  # unset max_silence is the VAD's 3 s: the VAD would refuse it
    ({"smart_turn": False}, {"stop_secs": 4}, True),
    ({"max_silence_secs": 45}, {}, True),  # the VAD accepts up to 60 s
    ({"max_silence_secs": 61}, {}, False),
    ({"final_transcript_timeout_secs": 5, "final_transcript_give_up_secs": 4}, {}, False),
    ({"final_transcript_timeout_secs": 5, "final_transcript_give_up_secs": 5}, {}, True),
])
def test_turn_options_checked_against_the_derived_stop_wait(turn, vad, ok):
    config = pb.SessionConfig(turn=pb.TurnOptions(**turn), vad=pb.VadOptions(**vad))
    if ok:
        validate(config)
    else:
        with pytest.raises(InvalidInput):
            validate(config)


@pytest.mark.parametrize("config, message", [
    (pb.SessionConfig(tools=pb.ToolOptions(timeout_secs=float("nan"))), "tools.timeout_secs must be a finite number"),
    (pb.SessionConfig(lifecycle=pb.LifecycleOptions(idle_timeout_secs=float("inf"))), "lifecycle.idle_timeout_secs"),
    (pb.SessionConfig(vad=pb.VadOptions(stop_secs=float("-inf"))), "vad.stop_secs must be a finite number"),
    (pb.SessionConfig(llm_params=llm_pb2.GenerationParams(max_tokens=5000)), "max_tokens 5000 is above the limit of 4096"),
    (pb.SessionConfig(llm_params=llm_pb2.GenerationParams(temperature=3.0)), "temperature 0-2, top_p 0-1"),
    (pb.SessionConfig(llm_params=llm_pb2.GenerationParams(top_p=float("nan"))), "llm_params.top_p must be a finite number"),
])
def test_config_numbers_that_would_never_fire_or_fail_later_are_refused(config, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)
