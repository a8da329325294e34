"""Silero VAD v6 on onnxruntime, one thread: CPU per 32 ms window at batch sizes 1..256.

Evidence for batching windows across sessions in the VAD service: one call per window per
stream pays onnxruntime's per-call overhead every time. `python -m bench.vad_batch_probe`.
"""
from __future__ import annotations

import json
import time

import numpy as np


def probe(batches=(1, 8, 32, 64, 128, 256), seconds: float = 1.0) -> dict:
    import onnxruntime as ort

    from voicemesh.runtime.models import model_path

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path("silero-vad")), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    result = {}
    for batch in batches:
        feeds = {names[0]: np.random.default_rng(0).normal(0, 0.1, (batch, 576)).astype(np.float32),
                 names[1]: np.zeros((2, batch, 128), np.float32), names[2]: np.array(16000, np.int64)}
        session.run(None, feeds)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, feeds)
            calls += 1
        per_window_us = (time.perf_counter() - start) / (calls * batch) * 1e6
        # One stream needs 1000/32 windows per second: streams one core can serve at 100 %.
        result[batch] = {"us_per_window": round(per_window_us, 2),
                         "streams_per_core_at_100pct": int(1e6 / (per_window_us * 31.25))}
    return result


if __name__ == "__main__":
    print(json.dumps(probe(), indent=1))
