"""Property-based fuzzing of every RPC (strategies from the message descriptors, see
strategies.py and rpcs.py) against the real servicers with fake providers and the real
orchestrator, while a healthy Converse session runs on the same orchestrator throughout.

Per case (harness.FuzzMesh.run_case): a status within the deadline, a clear one (never UNKNOWN
or INTERNAL), in-band errors likewise, and the process still SERVING with Info answering. The
budget per RPC is BUDGET x VOICEMESH_FUZZ_SCALE (CI: scale 1, 2,000 cases; `make fuzz`
runs tests/fuzz/run.py, scale 5, 10,000). CI is derandomized (the same cases every run);
`run.py` passes a seed instead and prints it.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz.rpcs import RPCS

BUDGET = {"VadService/Detect": 250, "VadService/DetectMany": 200, "SttService/Recognize": 250, "LlmService/Generate": 250,
          "TtsService/Synthesize": 250, "OrchestratorService/Converse": 350}
INFO_BUDGET = 90  # x 5 Info RPCs: 2,000 cases in all at scale 1
SCALE = float(os.environ.get("VOICEMESH_FUZZ_SCALE", "1"))
SEEDED = bool(os.environ.get("VOICEMESH_FUZZ_SEED"))  # run.py: --hypothesis-seed; else derandomized


def examples(name: str) -> int:
    return max(1, round(BUDGET.get(name, INFO_BUDGET) * SCALE))


# The heaviest module of the suite on 2 cores: a couple of minutes at scale 1 (mesh start included).
pytestmark = pytest.mark.timeout(int(900 * max(1.0, SCALE)))


@pytest.mark.parametrize("name", list(RPCS))
def test_fuzz_rpc(fuzz, name):
    rpc = RPCS[name]

    @settings(max_examples=examples(name), deadline=None, derandomize=not SEEDED, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(payloads=rpc.requests)
    def case(payloads):
        fuzz.run_case(rpc, payloads)

    try:
        case()
    finally:
        fuzz.save()  # the counts so far, for run.py, even if a later RPC's run is cut short
    assert fuzz.tallies[name].cases >= examples(name)  # Hypothesis ran the budget, not fewer
    for kind in ("vad", "stt", "llm", "tts", "orchestrator"):  # every process, not only the one fuzzed
        assert fuzz.serving(kind) is None, fuzz.serving(kind)


def test_healthy_session_untouched(fuzz):
    """The conversation that ran through every fuzz case above: each turn answered, no error, End."""
    assert fuzz.healthy.thread.is_alive(), f"the healthy session stopped early: {fuzz.healthy.problems}"
    result = fuzz.healthy.finish()
    print(f"healthy session: {result['turns']} turns answered during the fuzz run")
    assert not result["problems"], result
    assert result["turns"] >= 2, result
    assert result["last_events"][-1] == "session_ended", result
