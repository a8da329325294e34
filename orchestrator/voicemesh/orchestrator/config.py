"""A Converse call's SessionConfig: its audio formats, the defaults derived from it, and its checks."""
from __future__ import annotations

import math

from voicemesh.runtime.audio import validate_format
from voicemesh.runtime.errors import InvalidInput
from voicemesh.runtime.turn_defaults import MAX_SILENCE_LIMIT_SECS, MAX_SILENCE_SECS, PLAIN_STOP_SECS, SMART_TURN_STOP_SECS
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

# What a session gets when its config sets no system prompt (the clients send none by default).
DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."


def session_formats(config: pb.SessionConfig) -> tuple[common_pb2.AudioFormat, common_pb2.AudioFormat]:
    """Input and output formats; an entirely unset format takes the default."""
    default_in = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
    default_out = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=24000, channels=1)
    fmt_in = config.input_format if config.HasField("input_format") else default_in
    fmt_out = config.output_format if config.HasField("output_format") else default_out
    validate_format(fmt_in, "Converse: input_format", max_channels=2)
    validate_format(fmt_out, "Converse: output_format")
    return fmt_in, fmt_out


def smart_turn_and_stop_secs(config: pb.SessionConfig) -> tuple[bool, float]:
    """Smart Turn (unset: on, where the VAD has the model) and the VAD's stop wait (unset:
    0.2 s with Smart Turn, 0.8 s without; a VAD without the model also takes 0.8). The one
    place the orchestrator derives them: validation and the caller audio's batching use it."""
    turn = config.turn
    smart_turn = turn.smart_turn if turn.HasField("smart_turn") else True
    return smart_turn, config.vad.stop_secs or (SMART_TURN_STOP_SECS if smart_turn else PLAIN_STOP_SECS)


MAX_TOKENS_LIMIT = 4096  # the LLM service's own limit: refused here, before SessionStarted
# The first piece of a reply may end at a clause end after this many words (TurnOptions.first_clause_words).
DEFAULT_FIRST_CLAUSE_WORDS = 4
MAX_FIRST_CLAUSE_WORDS = 50


def first_clause_words(config: pb.SessionConfig) -> int:
    turn = config.turn
    return turn.first_clause_words if turn.HasField("first_clause_words") else DEFAULT_FIRST_CLAUSE_WORDS


def _finite_floats(message, path: str = "") -> list[str]:
    """Names of the float fields in `message` (nested) that hold NaN or an infinity: every range
    check below passes NaN silently, and a NaN timeout never fires."""
    bad = []
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        if field.type == field.TYPE_MESSAGE and not field.is_repeated:
            bad += _finite_floats(value, name + ".")
        elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE) and not field.is_repeated:
            if not math.isfinite(value):
                bad.append(name)
    return bad


def validate(config: pb.SessionConfig) -> None:
    if bad := _finite_floats(config):
        raise InvalidInput(f"Converse: {', '.join(bad)} must be a finite number")
    params = config.llm_params
    if params.max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidInput(f"Converse: llm_params.max_tokens {params.max_tokens} is above the limit of {MAX_TOKENS_LIMIT}")
    if (params.HasField("temperature") and not 0 <= params.temperature <= 2) or not 0 <= params.top_p <= 1:
        raise InvalidInput("Converse: llm_params out of range (temperature 0-2, top_p 0-1)")
    vad, turn = config.vad, config.turn
    if not (0 <= vad.confidence <= 1 and 0 <= vad.min_volume <= 1 and 0 <= vad.start_secs <= 5 and 0 <= vad.stop_secs <= 10):
        raise InvalidInput("Converse: vad options out of range (confidence, min_volume 0-1; start_secs 0-5; stop_secs 0-10)")
    if not (0 <= turn.smart_turn_threshold <= 1 and 0 <= turn.max_silence_secs <= MAX_SILENCE_LIMIT_SECS
            and 0 <= turn.final_transcript_timeout_secs <= 30 and 0 <= turn.final_transcript_give_up_secs <= 300):
        raise InvalidInput(f"Converse: turn options out of range (smart_turn_threshold 0-1; max_silence_secs "
                           f"0-{MAX_SILENCE_LIMIT_SECS:g}; final_transcript_timeout_secs 0-30; "
                           "final_transcript_give_up_secs 0-300)")
    if turn.first_clause_words > MAX_FIRST_CLAUSE_WORDS:
        raise InvalidInput(f"Converse: turn.first_clause_words {turn.first_clause_words} is over "
                           f"{MAX_FIRST_CLAUSE_WORDS} (0: whole sentences only)")
    if turn.final_transcript_give_up_secs and turn.final_transcript_give_up_secs < turn.final_transcript_timeout_secs:
        raise InvalidInput(f"Converse: turn.final_transcript_give_up_secs ({turn.final_transcript_give_up_secs}) must be at "
                           f"least final_transcript_timeout_secs ({turn.final_transcript_timeout_secs})")
    smart_turn, stop_secs = smart_turn_and_stop_secs(config)
    max_silence = turn.max_silence_secs or MAX_SILENCE_SECS  # unset: the VAD's default
    if smart_turn and max_silence < stop_secs:
        raise InvalidInput(f"Converse: turn.max_silence_secs "
                           f"({max_silence}, {'set' if turn.max_silence_secs else 'the default'}) "
                           f"must be at least vad.stop_secs ({stop_secs}) with Smart Turn on")
    lifecycle = config.lifecycle
    if min(lifecycle.idle_timeout_secs, lifecycle.user_idle_secs, lifecycle.max_duration_secs, config.tools.timeout_secs) < 0:
        raise InvalidInput("Converse: timeouts and durations must not be negative")
    names = [tool.name for tool in config.tools.tools]
    if len(set(names)) != len(names):
        raise InvalidInput("Converse: tool names must be unique")
    if any(strategy not in pb.MuteStrategy.values() or strategy == 0 for strategy in config.mute_strategies):
        raise InvalidInput("Converse: unknown mute strategy")


LISTED = 20  # names given in a refusal; Info has them all


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - LISTED} more (see the service's Info)" if len(names) > LISTED else ""
    return ", ".join(names[:LISTED]) + more


def unknown_voice(voice: str, voices: list[str]) -> str | None:
    """Why `voice` is refused, or None. An empty list says nothing (a provider that cannot list them)."""
    if not voice or not voices or voice in voices:
        return None
    return f"Converse: voice {voice!r} is not one of the TTS service's voices; available: {_listed(voices)}"


def served_languages(stt_info) -> list[str]:
    """The languages an STT service's Info lists (details["languages"], comma-separated), if any."""
    raw = stt_info.info.details.get("languages", "") if stt_info is not None else ""
    return [code.strip() for code in raw.split(",") if code.strip()]


def unknown_language(language: str, languages: list[str]) -> str | None:
    """Why `language` is refused, or None. A bare language ("en") matches any of its regions ("en-US"),
    as the STT providers resolve it."""
    if not language or not languages:
        return None
    asked = language.lower()
    if any(code.lower() == asked or ("-" not in asked and code.lower().split("-")[0] == asked) for code in languages):
        return None
    return f"Converse: language {language!r} is not one the STT service recognises; available: {_listed(sorted(languages))}"


async def check_against_backends(config: pb.SessionConfig, clients) -> None:
    """Refuse a voice the TTS service does not list, or a language the STT service does not, before
    the session starts (else its first turn would fail). From their Info answers, cached per endpoint
    (clients.InfoCache); a miss asks again at once, so a voice deployed since the last answer works.

    An Info that cannot be fetched refuses nothing: the backend may be restarting or briefly
    unreachable (behind Envoy, no healthy host for a moment), and refusing every session for that
    would turn a blip into an outage; the turn that needs the backend reports its failure in-band."""
    checks = [("tts", config.voice, lambda info: unknown_voice(config.voice, list(info.voices))),
              ("stt", config.language, lambda info: unknown_language(config.language, served_languages(info)))]
    for kind, asked, why in checks:
        if not asked:
            continue
        info, fetched_at = await clients.info(kind)
        if info is None or why(info) is None:
            continue
        info, _ = await clients.info(kind, older_than=fetched_at)  # a miss: the service may have it by now
        if info is not None and (reason := why(info)) is not None:
            raise InvalidInput(reason)
