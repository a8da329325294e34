"""Every ConverseResponse the orchestrator sends is built here.

The turn controller names an event and its fields as plain values (turn_events.Emit); the
other stages (reply, playout, tools, recorder, session) call the builders below.
"""
from __future__ import annotations

from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as pb

_MESSAGES = {
    "session_started": pb.SessionStarted,
    "audio": pb.BotAudio,
    "user_transcript": pb.UserTranscript,
    "bot_text": pb.BotText,
    "speaking": pb.SpeakingEvent,
    "turn_started": pb.TurnStarted,
    "turn_ended": pb.TurnEnded,
    "error": common_pb2.Error,
    "session_ended": pb.SessionEnded,
    "clear_playback": pb.ClearPlayback,
    "tool_call": pb.ToolCallRequested,
    "tool_call_cancelled": pb.ToolCallCancelled,
    "metrics": pb.Metrics,
    "transcript": pb.TranscriptEntry,
    "recording": pb.RecordingAudio,
    "idle_timeout": pb.IdleTimeout,
    "dtmf": pb.DtmfReceived,
    "turn_delayed": pb.TurnDelayed,
}


def response(event: str, fields: dict) -> pb.ConverseResponse:
    """ConverseResponse(<event>=<its message with `fields`>), e.g. response("turn_started", {...})."""
    return pb.ConverseResponse(**{event: _MESSAGES[event](**fields)})


def session_started(session_id: str, output_format: common_pb2.AudioFormat) -> pb.ConverseResponse:
    return pb.ConverseResponse(session_started=pb.SessionStarted(session_id=session_id, output_format=output_format))


def session_ended(reason: int) -> pb.ConverseResponse:
    return pb.ConverseResponse(session_ended=pb.SessionEnded(reason=reason))


def error(code: str, message: str, source: str, fatal: bool = False) -> pb.ConverseResponse:
    return pb.ConverseResponse(error=common_pb2.Error(code=code, message=message, fatal=fatal, source=source))


def bot_audio(data: bytes, offset_ms: int, turn_number: int) -> pb.ConverseResponse:
    """The playout numbers the chunks (seq) as it sends them (it may merge some)."""
    chunk = common_pb2.AudioChunk(data=data, offset_ms=offset_ms)
    return pb.ConverseResponse(audio=pb.BotAudio(chunk=chunk, turn_number=turn_number))


def bot_text(text: str, turn_number: int) -> pb.ConverseResponse:
    return pb.ConverseResponse(bot_text=pb.BotText(text=text, turn_number=turn_number))


def tool_call(call: llm_pb2.ToolCall, turn_number: int) -> pb.ConverseResponse:
    return pb.ConverseResponse(tool_call=pb.ToolCallRequested(
        id=call.id, name=call.name, arguments_json=call.arguments_json, turn_number=turn_number))


def tool_call_cancelled(ids: list[str], reason: str) -> pb.ConverseResponse:
    return pb.ConverseResponse(tool_call_cancelled=pb.ToolCallCancelled(ids=ids, reason=reason))


def transcript_entry(entry: pb.TranscriptEntry) -> pb.ConverseResponse:
    return pb.ConverseResponse(transcript=entry)


def recording_audio(chunk: common_pb2.AudioChunk) -> pb.ConverseResponse:
    return pb.ConverseResponse(recording=pb.RecordingAudio(chunk=chunk))
