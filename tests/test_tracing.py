"""Traces and metrics from every process of the embedded mesh, collected by a real OTLP/gRPC
receiver: one tree per conversation, one span per turn, service spans under the right turn."""
from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from conftest import FIXTURES
from converse_probe import ConverseProbe, event_is
from otlp_receiver import Receiver

pytestmark = [pytest.mark.e2e, pytest.mark.models]
TOLERANCE_NS = 5_000_000  # children must lie within their parent, give or take 5 ms
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
CONTENT_ATTRIBUTES = {"transcript", "input", "output", "text", "tool.arguments", "tool.result"}


def _traced_run(tmp_path_factory, content: bool):
    """Start the mesh exporting to a receiver, run the conversations, stop it (SIGTERM), collect."""
    from voicemesh.launcher import Mesh, free_ports
    from voicemesh.talk import talk_session
    from voicemesh.wavio import load_for_sending

    receiver = Receiver().start()
    env = {**receiver.env(), "VOICEMESH_TRACE_CONTENT": "true" if content else "false"}
    mesh = Mesh(ports=free_ports(), env=env, log_dir=tmp_path_factory.mktemp("traced-mesh"), ready_timeout=300)
    try:
        mesh.start()

        async def conversations():
            two_turns = await talk_session(mesh.orchestrator_address, load_for_sending(FIXTURES / "two_questions.wav"))
            question = load_for_sending(FIXTURES / "question_capital.wav")
            concurrent = await asyncio.gather(*(talk_session(mesh.orchestrator_address, question) for _ in range(2)))
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
            async with ConverseProbe(mesh.orchestrator_address, metadata=(("traceparent", traceparent),)) as probe:
                await probe.send_text("Say hello.")
                await probe.wait_for(event_is("turn_ended", turn_number=1), timeout=120)
                await probe.end()
                joined = (await probe.wait_for(lambda e: e.HasField("session_started"))).session_started.session_id
                await probe.wait_for(lambda e: e.HasField("session_ended"), timeout=60)
            return two_turns, concurrent, joined

        results = asyncio.run(conversations())
    finally:
        mesh.stop()  # SIGTERM: every process flushes its spans and metrics before it exits
        receiver.stop()
    return results, receiver


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    return _traced_run(tmp_path_factory, content=True)


def _by_conversation(receiver: Receiver, session_id: str):
    (root,) = [s for s in receiver.spans if s.name == "conversation" and s.attributes.get("conversation.id") == session_id]
    return root, [s for s in receiver.spans if s.trace_id == root.trace_id]


def test_one_trace_per_conversation_with_two_turns(traced):
    (two_turns, _, _), receiver = traced
    assert len(two_turns.turns) == 2
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
    assert tts and all({"voice_id", "text", "metrics.character_count", "metrics.ttfb", "interrupted"} <= s.attributes.keys() for s in tts)
    assert any(s.attributes["interrupted"] is False and s.attributes["metrics.character_count"] > 0 for s in tts)


def test_every_child_lies_within_its_parent(traced):
    (two_turns, _, _), receiver = traced
    _, spans = _by_conversation(receiver, two_turns.session_id)
    by_id = {s.span_id: s for s in spans}
    for span in spans:
        parent = by_id.get(span.parent_span_id)
        if parent is None:
            continue
        assert span.start_ns >= parent.start_ns - TOLERANCE_NS, (span.name, parent.name)
        assert span.end_ns <= parent.end_ns + TOLERANCE_NS, (span.name, parent.name)


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
