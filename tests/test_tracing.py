"""Traces and metrics from every process of the embedded mesh, collected by a real OTLP/gRPC
receiver: one tree per conversation, one span per turn, service spans under the right turn."""
from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

import pytest

from conftest import FIXTURES, utterances
from support import ConverseProbe, event_is
from otlp_receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.models]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
CONTENT_ATTRIBUTES = {"transcript", "input", "output", "text", "tool.arguments", "tool.result"}
REPLY_WAIT_S = 180  # deadline for a turn on the embedded models: generous, no speed is asserted


@dataclass
class SpokenConversation:
    session_id: str
    turns: list  # its TurnEnded events, in order


async def _two_turns(address: str) -> SpokenConversation:
    """The two questions of two_questions.wav, the second asked only once the first is answered
    (as a user waits for the bot), so that no turn depends on the bot answering within the
    fixture's 7 s pause."""
    from voicemesh.client import config_request

    first, second = utterances("two_questions.wav")
    async with ConverseProbe(address, config_request(client="voicemesh-tests").config) as probe:
        await probe.speak_until(first, event_is("turn_ended", turn_number=1), timeout=REPLY_WAIT_S)
        await probe.speak_until(second, event_is("turn_ended", turn_number=2), timeout=REPLY_WAIT_S)
        await probe.end()
        await probe.wait_for(lambda e: e.HasField("session_ended"), timeout=REPLY_WAIT_S)
    return SpokenConversation(probe.of("session_started")[0].session_id, probe.of("turn_ended"))


def _traced_run(tmp_path_factory, content: bool):
    """Start the mesh exporting to a receiver, run the conversations, stop it (SIGTERM), collect."""
    from voicemesh.cli.mesh import Mesh, free_ports
    from voicemesh.client.session import talk_session
    from voicemesh.client.wavio import load_for_sending

    receiver = Receiver().start()
    env = {**receiver.env(), "VOICEMESH_TRACE_CONTENT": "true" if content else "false"}
    mesh = Mesh(ports=free_ports(), env=env, log_dir=tmp_path_factory.mktemp("traced-mesh"), ready_timeout=300)
    try:
        mesh.start()

        async def conversations():
            two_turns = await _two_turns(mesh.orchestrator_address)
            question = load_for_sending(FIXTURES / "question_capital.wav")
            patient = {"wait_after": REPLY_WAIT_S, "start_timeout": REPLY_WAIT_S, "end_timeout": REPLY_WAIT_S}
            concurrent = await asyncio.gather(*(talk_session(mesh.orchestrator_address, question, **patient)
                                                for _ in range(2)))
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
            async with ConverseProbe(mesh.orchestrator_address, metadata=(("traceparent", traceparent),)) as probe:
                await probe.send_text("Say hello.")
                await probe.wait_for(event_is("turn_ended", turn_number=1), timeout=REPLY_WAIT_S)
                await probe.end()
                joined = (await probe.wait_for(lambda e: e.HasField("session_started"))).session_started.session_id
                await probe.wait_for(lambda e: e.HasField("session_ended"), timeout=REPLY_WAIT_S)
            return two_turns, concurrent, joined

        results = asyncio.run(conversations())
        # Each process exports its spans as they end (OTEL_BSP_SCHEDULE_DELAY 200 ms): wait until
        # every conversation's root span is in, so that the exit flush on SIGTERM (time-boxed)
        # only has the tail left. The tests below say what is missing if it never comes.
        sessions = {results[0].session_id, results[2], *(result.session_id for result in results[1])} - {""}
        receiver.wait_until(lambda spans: sessions <= {s.attributes.get("conversation.id") for s in spans
                                                       if s.name == "conversation"}, timeout=REPLY_WAIT_S)
    finally:
        mesh.stop()  # SIGTERM: every process flushes its spans and metrics before it exits
        receiver.stop()
    return results, receiver


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return _traced_run(tmp_path_factory, content=True)


def _by_conversation(receiver: Receiver, session_id: str):
    roots = [s for s in receiver.spans if s.name == "conversation" and s.attributes.get("conversation.id") == session_id]
    seen = sorted(str(s.attributes.get("conversation.id")) for s in receiver.spans if s.name == "conversation")
    assert len(roots) == 1, f"{len(roots)} conversation spans for {session_id}; conversations received: {seen}"
    (root,) = roots
    return root, [s for s in receiver.spans if s.trace_id == root.trace_id]


def test_one_trace_per_conversation_with_two_turns(traced):
    (two_turns, _, _), receiver = traced
    assert [(t.turn_number, t.interrupted) for t in two_turns.turns] == [(1, False), (2, False)], two_turns.turns
    root, spans = _by_conversation(receiver, two_turns.session_id)
    assert root.parent_span_id == ""  # a root: the client sent no trace context
    assert root.attributes["conversation.type"] == "voice"
    turns = sorted((s for s in spans if s.name == "turn"), key=lambda s: s.attributes["turn.number"])
    assert [t.attributes["turn.number"] for t in turns] == [1, 2]
    assert all(t.parent_span_id == root.span_id for t in turns)
    for turn in turns:
        assert turn.attributes["turn.was_interrupted"] is False
        assert turn.attributes["turn.duration_seconds"] > 0
        assert turn.attributes["turn.voice_to_voice_seconds"] > 0


def test_service_spans_come_from_their_processes_under_the_right_turn(traced):
    (two_turns, _, _), receiver = traced
    root, spans = _by_conversation(receiver, two_turns.session_id)
    turns = {s.span_id: s for s in spans if s.name == "turn"}
    by_name = defaultdict(list)
    for span in spans:
        by_name[span.name].append(span)
    for name in ("vad", "stt", "llm", "tts"):
        assert by_name[name], f"no {name} span"
        for span in by_name[name]:
            turn = turns[span.parent_span_id]  # a child of a turn ...
            assert span.attributes["turn.id"] == turn.attributes["turn.id"]  # ... of its own turn
            assert span.service == f"voicemesh-{name}"
    services = {span.service for span in spans}
    assert {"voicemesh-orchestrator", "voicemesh-vad", "voicemesh-stt", "voicemesh-llm", "voicemesh-tts"} <= services
    llm = by_name["llm"][0]
    assert llm.resource["voicemesh.provider"] == "llamacpp"


def test_service_span_attributes(traced):
    (two_turns, _, _), receiver = traced
    _, spans = _by_conversation(receiver, two_turns.session_id)
    confirmed = [s for s in spans if s.name == "llm" and not s.attributes.get("cancelled")]
    assert confirmed
    llm = confirmed[0]
    for key in ("gen_ai.system", "gen_ai.request.model", "input", "output", "gen_ai.usage.input_tokens",
                "gen_ai.usage.output_tokens", "metrics.ttfb", "tools.count"):
        assert key in llm.attributes, key
    assert "paris" in llm.attributes["output"].lower() or "tokyo" in llm.attributes["output"].lower()
    stt = [s for s in spans if s.name == "stt"]
    assert any("capital" in s.attributes["transcript"].lower() for s in stt)
    assert all(s.attributes["is_final"] is True and s.attributes["language"] and "metrics.ttfb" in s.attributes for s in stt)
    tts = [s for s in spans if s.name == "tts" and not s.attributes.get("cancelled")]
    tts_keys = {"voice_id", "text", "metrics.character_count", "metrics.ttfb", "interrupted"}
    assert tts and all(tts_keys <= s.attributes.keys() for s in tts)
    assert any(s.attributes["interrupted"] is False and s.attributes["metrics.character_count"] > 0 for s in tts)


# Every span of a trace is dated by the one wall clock of this machine, whichever process made
# it (nothing steps that clock during a run), so what causality guarantees can be asserted
# exactly, with no tolerance; a tolerance would only hide how late a span really ended.
#
# Starts. A child starts after its parent did. The orchestrator dates a turn from when the
# audio where the speech began reached it; a service learns of a turn only from what the
# orchestrator sends after creating the turn (the TurnContext message; the metadata of the LLM
# and TTS calls), and the VAD dates its segment span from when that same audio reached the VAD,
# which the orchestrator forwarded only after receiving it. Turns start inside their session,
# and tool calls inside their LLM call (the same process, in order).
#
# Ends. A child ends before its parent only where the parent waits for it:
# - conversation > turn, llm > llm_tool_call: the same process ends the child first, always;
# - an answered turn > its vad, stt, llm and tts spans: the VAD ends its span before it sends
#   the speech stop, the STT before it sends the final, and the LLM and TTS calls end (their
#   spans first) before the orchestrator has read their streams to the end; an answered turn
#   needed all of that before the bot could finish speaking.
# Not so for a span that was cancelled (it ends when the cancel reaches its service, whenever
# that is), for a speculative reply (one dropped may finish just after the orchestrator let it
# go), nor for a turn that ended otherwise (interrupted, or without a reply: a superseded
# turn may end before its STT final arrives).


def _answered(turn) -> bool:
    """Whether the turn ended because its reply was played to the end."""
    reason = turn.attributes.get("turn.end_reason")
    if reason is not None:
        return reason == "REASON_ANSWERED"
    return turn.attributes.get("turn.was_interrupted") is False and turn.attributes.get("turn.voice_to_voice_seconds", 0) > 0


def _parent_waits(parent, child) -> bool:
    if (parent.name, child.name) in (("conversation", "turn"), ("llm", "llm_tool_call")):
        return True
    if parent.name != "turn" or child.attributes.get("cancelled") or not _answered(parent):
        return False
    return child.name in ("vad", "stt") or (child.name in ("llm", "tts") and child.attributes.get("speculative") is False)


def test_every_child_lies_within_its_parent(traced):
    _, receiver = traced
    spans = receiver.spans  # every conversation of the run: two turns, two concurrent, the client's trace
    by_id = {s.span_id: s for s in spans}
    started, ended, violations = [], [], []

    def describe(span):
        return f"{span.name} {span.span_id} ({span.service}, {span.attributes})"

    for span in spans:
        parent = by_id.get(span.parent_span_id)
        if parent is None:
            continue  # a root (its parent, if any, is the client's)
        started.append((parent.name, span.name))
        if span.start_ns < parent.start_ns:
            violations.append(f"{describe(span)} starts {(parent.start_ns - span.start_ns) / 1e6:.3f} ms "
                              f"before its parent {describe(parent)}")
        if _parent_waits(parent, span):
            ended.append((parent.name, span.name))
            if span.end_ns > parent.end_ns:
                violations.append(f"{describe(span)} ends {(span.end_ns - parent.end_ns) / 1e6:.3f} ms "
                                  f"after its parent {describe(parent)}, which waits for it")
    assert not violations, "\n".join(violations)
    # Not vacuous: every kind of parent that waits was checked, on the spans of this run.
    turns = [describe(s) for s in spans if s.name == "turn"]
    assert {("conversation", "turn"), ("turn", "vad"), ("turn", "stt"), ("turn", "llm"), ("turn", "tts")} <= set(ended), (
        sorted(set(ended)), turns)
    assert len(started) == sum(1 for s in spans if s.parent_span_id in by_id) > 0


def test_concurrent_sessions_are_separate_trees(traced):
    (_, concurrent, _), receiver = traced
    ids = [result.session_id for result in concurrent]
    assert len(set(ids)) == 2
    trees = [_by_conversation(receiver, session_id) for session_id in ids]
    assert trees[0][0].trace_id != trees[1][0].trace_id
    for (_root, spans), other in zip(trees, reversed(ids), strict=True):
        turn_ids = {s.attributes.get("turn.id", "") for s in spans}
        assert not any(turn_id.startswith(other) for turn_id in turn_ids)  # nothing of the other session
        assert sum(1 for s in spans if s.name == "turn") == 1


def test_client_traceparent_is_joined(traced):
    (_, _, joined), receiver = traced
    root, spans = _by_conversation(receiver, joined)
    assert root.trace_id == CLIENT_TRACE and root.parent_span_id == CLIENT_PARENT
    assert any(s.name == "llm" for s in spans)


def test_metrics_arrive(traced):
    _, receiver = traced
    names = defaultdict(set)
    for service, metric in receiver.metrics:
        names[service].add(metric)
    assert {"voicemesh.turn.voice_to_voice", "voicemesh.ttfb", "voicemesh.orchestrator.hop", "voicemesh.sessions",
            "voicemesh.turns", "voicemesh.sessions.active"} <= names["voicemesh-orchestrator"]
    for service in ("voicemesh-vad", "voicemesh-stt", "voicemesh-llm", "voicemesh-tts"):
        assert "voicemesh.streams.active" in names[service], service


def test_content_switch_removes_text(tmp_path_factory):
    (two_turns, _, _), receiver = _traced_run(tmp_path_factory, content=False)
    _, spans = _by_conversation(receiver, two_turns.session_id)
    assert {s.name for s in spans} >= {"conversation", "turn", "stt", "llm", "tts"}
    for span in receiver.spans:
        assert not CONTENT_ATTRIBUTES & span.attributes.keys(), (span.name, span.attributes)
