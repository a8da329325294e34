"""espeak-ng: the formant synthesizer from Debian's `espeak-ng` package, one subprocess per request.

Robotic but tiny, instant and multilingual (100+ languages): a fallback and a load-test voice.
espeak-ng writes a WAV stream to stdout as it synthesizes, with placeholder sizes in the
header, so we parse the header ourselves and pass PCM on as it is read.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
from collections.abc import AsyncIterator

from voicemesh.runtime.provider import ProviderInfo
from voicemesh.tts.providers.base import SynthesisRequest, TtsProvider

SAMPLE_RATE_HZ = 22_050
DEFAULT_VOICE = "en-us"
DEFAULT_WPM = 175  # espeak-ng's own default speed
MIN_SPEED, MAX_SPEED = 0.5, 2.0


class EspeakTtsProvider(TtsProvider):
    """espeak-ng TTS. voice: default voice (env VOICEMESH_TTS_VOICE, else "en-us"); a voice is a
    language code from `espeak-ng --voices`, optionally with a variant ("en-us+f3").
    binary: the executable (env VOICEMESH_ESPEAK_BIN, else espeak-ng on PATH).
    """

    name = "espeak"
    sample_rate_hz = SAMPLE_RATE_HZ

    def __init__(self, voice: str | None = None, binary: str | None = None, chunk_ms: int = 100) -> None:
        self.default_voice = voice or os.environ.get("VOICEMESH_TTS_VOICE") or DEFAULT_VOICE
        self.binary = binary or os.environ.get("VOICEMESH_ESPEAK_BIN") or "espeak-ng"
        self.chunk_bytes = 2 * SAMPLE_RATE_HZ * chunk_ms // 1000
        self._voices: list[str] = []
        self._variants: frozenset[str] = frozenset()
        self._version = ""

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> None:
        path = shutil.which(self.binary)
        if path is None:
            raise FileNotFoundError(f"{self.binary!r} not found; install it with `apt-get install espeak-ng`")
        self.binary = path
        self._version = (await self._output("--version")).split(":")[1].split()[0]
        self._voices = _parse_voice_list(await self._output("--voices"))
        self._variants = frozenset(_parse_voice_list(await self._output("--voices=variant"), column=4))
        self._check_voice(self.default_voice)
        # Warm-up: one real synthesis proves the binary, its data files and the WAV format.
        async for _ in self.synthesize(SynthesisRequest(text="Ready.")):
            pass

    def info(self) -> ProviderInfo:
        return ProviderInfo(
            provider=self.name,
            model=f"espeak-ng-{self._version}" if self._version else "espeak-ng",
            sample_rates_hz=(SAMPLE_RATE_HZ,),
            details={"voice": self.default_voice, "voices": str(len(self._voices))},
        )

    def voices(self) -> list[str]:
        return list(self._voices)

    # -- synthesis ------------------------------------------------------------------------

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[bytes]:
        voice = request.voice or self._language_voice(request.language) or self.default_voice
        self._check_voice(voice)
        speed = request.speed or 1.0
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed {speed} is outside [{MIN_SPEED}, {MAX_SPEED}]")
        if not request.text.strip():
            return

        # --stdin reads the whole text before speaking, so writing it all first cannot
        # deadlock against a full stdout pipe; it also keeps text like "-5" from being an option.
        args = ("--stdout", "--stdin", "-b", "1", "-v", voice, "-s", str(round(DEFAULT_WPM * speed)))
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            proc.stdin.write(request.text.encode("utf-8"))
            await proc.stdin.drain()
            proc.stdin.close()
            await _read_wav_header(proc)
            carry = b""
            while block := await proc.stdout.read(self.chunk_bytes):
                block = carry + block
                # Keep whole samples: a pipe read can end between the two bytes of one.
                cut = len(block) - len(block) % 2
                carry = block[cut:]
                if cut:
                    yield block[:cut]
            if await proc.wait() != 0:
                err = (await proc.stderr.read()).decode(errors="replace").strip()
                raise RuntimeError(f"espeak-ng exited with {proc.returncode}: {err}")
        finally:
            # Consumer gone early (generator closed, task cancelled) or an error: end the
            # child and reap it, so no orphan keeps synthesizing and no zombie stays behind.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                # communicate(), not wait(): on Python 3.11 wait() only returns once every pipe
                # has hit EOF, and a stalled consumer has left stdout paused (buffer full), so
                # wait() alone can hang forever. Draining the dead child's output unpauses it.
                await asyncio.shield(proc.communicate())

    # -- helpers --------------------------------------------------------------------------

    async def _output(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{self.binary} {' '.join(args)} failed: {err.decode(errors='replace')}")
        return out.decode("utf-8", errors="replace")

    def _language_voice(self, language: str) -> str:
        """A voice for a BCP-47 language ("en-GB" -> "en-gb"), if espeak has one."""
        code = language.strip().lower()
        return code if code in self._voices else ""

    def _check_voice(self, voice: str) -> None:
        # espeak-ng exits 0 with no audio for an unknown voice, so validate before spawning.
        base, _, variant = voice.partition("+")
        if base in self._voices and (not variant or variant in self._variants):
            return
        raise ValueError(
            f"unknown espeak-ng voice {voice!r}; available: {', '.join(self._voices) or 'none (not loaded)'}"
            f" (optionally with +variant, e.g. +f3: {', '.join(sorted(self._variants))})"
        )


def _parse_voice_list(listing: str, column: int = 1) -> list[str]:
    """Names from `espeak-ng --voices` (language column) or `--voices=variant` (file column).

    MBROLA voices (file "mb/...") need a separate engine and data that Debian does not ship
    by default; they fail silently, so they are left out.
    """
    names: list[str] = []
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5 or fields[4].startswith("mb/"):
            continue
        name = fields[column].removeprefix("!v/")
        if name not in names:
            names.append(name)
    return names


async def _read_wav_header(proc: asyncio.subprocess.Process) -> None:
    """Consume the RIFF header up to the data chunk and check it is 16-bit mono at 22050 Hz."""
    try:
        riff = await proc.stdout.readexactly(12)
        if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            raise RuntimeError(f"espeak-ng did not write a WAV stream (starts with {riff[:12]!r})")
        while True:
            chunk_id, size = struct.unpack("<4sI", await proc.stdout.readexactly(8))
            if chunk_id == b"data":
                return  # size is a placeholder while streaming; read to EOF instead
            body = await proc.stdout.readexactly(size + size % 2)  # chunks are word-aligned
            if chunk_id == b"fmt ":
                fmt, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                if (fmt, channels, rate, bits) != (1, 1, SAMPLE_RATE_HZ, 16):
                    raise RuntimeError(
                        f"espeak-ng wrote format {fmt}, {channels} ch, {rate} Hz, {bits} bit; "
                        f"expected PCM mono {SAMPLE_RATE_HZ} Hz 16 bit"
                    )
    except asyncio.IncompleteReadError as exc:
        err = (await proc.stderr.read()).decode(errors="replace").strip()
        raise RuntimeError(f"espeak-ng produced no audio: {err or 'no error message'}") from exc
