"""The Python client of voicemesh's public API, the orchestrator's `Converse` stream.

    from voicemesh.client import talk_session, load_for_sending
    result = asyncio.run(talk_session("127.0.0.1:50051", load_for_sending("question.wav")))
    print([turn.bot_text for turn in result.turns])

`channel` opens the connection and builds the first message, `session` runs a session and
collects what happened per turn, `chat` drives typed turns, `wavio` reads and writes audio.
"""
from voicemesh.client.channel import (
    ADDR_ENV, END_REQUEST, INPUT_RATE_HZ, OUTPUT_RATE_HZ, config_request, default_addr, open_channel,
)
from voicemesh.client.chat import chat_session
from voicemesh.client.session import (
    ServerError, SessionTracker, TalkResult, TurnResult, open_session, read_responses, talk_session,
)
from voicemesh.client.wavio import load_for_sending, read_wav, write_wav

__all__ = [
    "ADDR_ENV", "END_REQUEST", "INPUT_RATE_HZ", "OUTPUT_RATE_HZ", "ServerError", "SessionTracker", "TalkResult",
    "TurnResult", "chat_session", "config_request", "default_addr", "load_for_sending", "open_channel", "open_session",
    "read_responses", "read_wav", "talk_session", "write_wav",
]
