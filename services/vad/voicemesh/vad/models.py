"""The VAD's embedded models (`voicemesh-models setup vad`): Silero VAD and Smart Turn.

Both ONNX files ship inside wheels whose own dependencies are heavy (torch, Pipecat's), so
those wheels are installed with --no-deps (requirements/nodeps.txt) and only the file is
copied out and checked; the service never imports them.
"""
from voicemesh.runtime.models import ModelSpec, PartSource

SILERO_VAD = ModelSpec(
    name="silero-vad",
    env_var="VOICEMESH_VAD_MODEL",
    licence="MIT (Silero VAD v6)",
    upstream="snakers4/silero-vad silero_vad.onnx (wheel silero-vad 6.2.3)",
    parts=(PartSource("silero_vad", "data/silero_vad.onnx"),),
    output="silero-vad/silero_vad.onnx",
    size_bytes=2_327_524,
    sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
)

SMART_TURN = ModelSpec(
    name="smart-turn",
    env_var="VOICEMESH_SMART_TURN_MODEL",
    licence="BSD-2-Clause (Smart Turn v3.2, pipecat-ai)",
    upstream="pipecat-ai/smart-turn-v3 smart-turn-v3.2-cpu.onnx (wheel pipecat-ai 1.14.0)",
    parts=(PartSource("pipecat", "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"),),
    output="smart-turn/smart-turn-v3.2-cpu.onnx",
    size_bytes=8_679_182,
    sha256="2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
)

MODELS = (SILERO_VAD, SMART_TURN)
