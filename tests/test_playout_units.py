"""The orchestrator's playout: immediate first audio, chunk merging, numbering, markers, clear.

Pure unit tests on an event loop: the chunks are queued before the playout task runs, so
what it merges does not depend on timing (only the pacing waits take real time, < 1 s).
"""
from __future__ import annotations

import asyncio

from voicemesh.orchestrator.playout import MAX_QUEUED_SECONDS, MERGE_SECONDS, HeldPlayout, Playout
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

CHUNK_S = 0.04
DRAIN_S = 60  # deadline for the playout to drain (the pacing waits take < 1 s idle); never a speed claim


def chunk(index: int, turn: int = 1) -> pb.ConverseResponse:
    return pb.ConverseResponse(audio=pb.BotAudio(chunk=common_pb2.AudioChunk(data=bytes([index]) * 4), turn_number=turn))


async def play(items, lead: float = 0.0) -> list:
    """Feed `items` ("marker:<name>" or (index, turn)) and return what was sent, in order."""
    sent: list = []
    playout = Playout(sent.append, lead_seconds=lead)
    task = asyncio.create_task(playout.run())
    for item in items:
        if isinstance(item, str):
            playout.marker(lambda name=item: sent.append(name))
        else:
            playout.audio(chunk(*item), CHUNK_S, item[1])
    await asyncio.wait_for(playout.drained(), DRAIN_S)
    task.cancel()
    return sent


def audio_parts(sent) -> list[tuple[bytes, int, int]]:
    return [(m.audio.chunk.data, m.audio.chunk.seq, m.audio.turn_number) for m in sent if not isinstance(m, str)]


def test_first_chunk_leaves_at_once_and_queued_chunks_merge_up_to_the_limit():
    sent = asyncio.run(play([(i, 1) for i in range(6)]))
    per_message = int(MERGE_SECONDS / CHUNK_S + 1e-6)  # 3 chunks of 40 ms in one message
    parts = audio_parts(sent)
    # Chunk 0 alone (sent before the playout task ran), then the rest in merged messages.
    assert [len(data) // 4 for data, _, _ in parts] == [1, per_message, 5 - per_message]
    assert b"".join(data for data, _, _ in parts) == b"".join(bytes([i]) * 4 for i in range(6))  # nothing lost or reordered
    assert [seq for _, seq, _ in parts] == [0, 1, 2]  # numbered as sent


def test_markers_and_turns_are_never_merged_across():
    sent = asyncio.run(play([(0, 1), (1, 1), "marker:a", (2, 1), (3, 2), (4, 2)]))
    kinds = [m if isinstance(m, str) else [b for b in m.audio.chunk.data[::4]] for m in sent]
    assert kinds == [[0], [1], "marker:a", [2], [3, 4]]
    parts = audio_parts(sent)
    assert [(seq, turn) for _, seq, turn in parts] == [(0, 1), (1, 1), (2, 1), (0, 2)]  # numbering restarts per turn


def test_clear_drops_what_was_not_sent():
    async def scenario():
        sent: list = []
        playout = Playout(sent.append, lead_seconds=0.0)
        for i in range(5):
            playout.audio(chunk(i), CHUNK_S, 1)
        dropped = playout.clear()
        task = asyncio.create_task(playout.run())
        playout.audio(chunk(9, turn=2), CHUNK_S, 2)  # the next turn starts a new clock: sent at once
        await asyncio.wait_for(playout.drained(), DRAIN_S)
        task.cancel()
        return sent, dropped

    sent, dropped = asyncio.run(scenario())
    assert dropped == 4  # chunk 0 had already left
    assert [(data[0], turn) for data, _, turn in audio_parts(sent)] == [(0, 1), (9, 2)]


def test_audio_of_an_interrupted_turn_that_comes_after_the_clear_is_dropped():
    """The interrupted reply's TTS may deliver one more chunk before its cancellation lands: it
    must neither play nor start the clock, so the next turn's first audio is still reported."""
    async def scenario():
        sent: list = []
        first_audio: list[int] = []
        playout = Playout(sent.append, lead_seconds=0.0, on_first_audio=first_audio.append)
        playout.audio(chunk(0), CHUNK_S, 1)
        playout.clear(1)
        playout.audio(chunk(1), CHUNK_S, 1)  # late: after the clear
        task = asyncio.create_task(playout.run())
        playout.audio(chunk(9, turn=2), CHUNK_S, 2)
        await asyncio.wait_for(playout.drained(), DRAIN_S)
        task.cancel()
        return sent, first_audio

    sent, first_audio = asyncio.run(scenario())
    assert [(data[0], turn) for data, _, turn in audio_parts(sent)] == [(0, 1), (9, 2)]
    assert first_audio == [1, 2]


def test_room_waits_while_more_than_the_bound_is_queued_and_clear_frees_it():
    """The reply's backpressure: queueing past MAX_QUEUED_SECONDS makes room() wait (the reply
    stops reading its TTS); playing the excess, or a barge-in's clear(), lets it go on."""
    async def scenario():
        sent: list = []
        playout = Playout(sent.append, lead_seconds=0.0)
        playout.audio(chunk(0), CHUNK_S, 1)  # leaves at once, starting the clock
        chunks = int(MAX_QUEUED_SECONDS / CHUNK_S) + 2  # just past the bound
        for i in range(chunks):
            playout.audio(chunk(1 + i % 200), CHUNK_S, 1)
        assert playout.queued_seconds > MAX_QUEUED_SECONDS
        waiting = asyncio.create_task(playout.room())
        await asyncio.sleep(0)  # let it reach its wait (no playout task runs: nothing can free it)
        assert not waiting.done()
        dropped = playout.clear(turn_number=1)  # barge-in
        await asyncio.wait_for(waiting, DRAIN_S)
        assert dropped == chunks and playout.queued_seconds == 0.0
        # Played out rather than cleared: the playout task frees room as it sends.
        for i in range(chunks):
            playout.audio(chunk(1 + i % 200, turn=2), CHUNK_S, 2)
        waiting = asyncio.create_task(playout.room())
        await asyncio.sleep(0)
        assert not waiting.done()  # blocked until the playout task sends some
        task = asyncio.create_task(playout.run())
        await asyncio.wait_for(waiting, DRAIN_S)
        assert playout.queued_seconds <= MAX_QUEUED_SECONDS
        task.cancel()

    asyncio.run(scenario())


def test_a_held_reply_past_the_bound_waits_for_its_release():
    async def scenario():
        playout = Playout([].append, lead_seconds=0.0)
        held = HeldPlayout(playout)
        for i in range(int(MAX_QUEUED_SECONDS / CHUNK_S) + 2):
            held.audio(chunk(1 + i % 200), CHUNK_S, 1)
        waiting = asyncio.create_task(held.room())
        await asyncio.sleep(0)
        assert not waiting.done()
        task = asyncio.create_task(playout.run())
        held.release()  # the turn was confirmed: everything moves to the playout, which plays it
        await asyncio.wait_for(waiting, DRAIN_S)
        task.cancel()

    asyncio.run(scenario())


def test_clear_ends_a_wait_for_the_drain():
    """A session ending after its last reply waits for the playout to drain; a barge-in that clears
    the queue meanwhile must end that wait, not leave it hanging."""
    async def scenario():
        playout = Playout([].append, lead_seconds=0.0)
        playout.audio(chunk(0), CHUNK_S, 1)
        for i in range(5):
            playout.audio(chunk(1 + i), CHUNK_S, 1)
        draining = asyncio.create_task(playout.drained())
        await asyncio.sleep(0)
        assert not draining.done()  # no playout task: nothing sends, nothing drains
        playout.clear(turn_number=1)
        await asyncio.wait_for(draining, DRAIN_S)

    asyncio.run(scenario())
