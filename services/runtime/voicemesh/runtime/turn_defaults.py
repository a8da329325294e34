"""End-of-turn defaults and limits that the VAD applies and the orchestrator checks a session
against, in one place (both depend on the runtime, neither on the other). vad.proto states them."""

SMART_TURN_STOP_SECS = 0.2  # with Smart Turn, a short pause is enough to ask the model
PLAIN_STOP_SECS = 0.8  # without it, the pause alone ends the turn
MAX_SILENCE_SECS = 3.0  # with Smart Turn: silence after which the turn ends whatever the model says
MAX_SILENCE_LIMIT_SECS = 60.0  # the largest max_silence_secs accepted
