#!/usr/bin/env python
"""Stage 1 of a bundle on two inference streams, images per second, for each way of compiling it.

Compares OpenVINO compiled as bonewatch compiles it (one OpenVINO stream per inference stream)
with one stream of one thread, and the bundle's 7-bit-weight int8 model (``reduce_range``, as
``bundle quantize`` writes it) with the same model quantized with 8-bit weights, on ONNX Runtime
and OpenVINO. Usage, after a bench run kept its folder (``--work-dir /tmp/bw``):

    .venv/bin/python scripts/engine-streams.py /tmp/bw/bundle-densenet121-224-seed0
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bonewatch.models.bundle import read_manifest
from bonewatch.models.engines import (
    InferenceThreads,
    OnnxPredictor,
    OpenVinoPredictor,
    openvino_core,
)
from bonewatch.models.onnx_export import max_output_difference, parity_inputs
from bonewatch.models.quantize import calibration_inputs, quantize_model

STREAMS = 2


def rate(call, x: np.ndarray, calls: int) -> float:
    with ThreadPoolExecutor(STREAMS) as pool:
        list(pool.map(lambda _: call(x), range(4 * STREAMS)))  # warm-up, every thread
        start = time.perf_counter()
        list(pool.map(lambda _: call(x), range(calls)))
    return calls * len(x) / (time.perf_counter() - start)


def one_stream_one_thread(path: Path, precision: str):
    """OpenVINO compiled with NUM_STREAMS 1 and one thread: the infer requests take turns."""
    compiled = openvino_core().compile_model(
        openvino_core().read_model(str(path)),
        "CPU",
        {
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        },
    )
    local = threading.local()

    def call(x: np.ndarray) -> np.ndarray:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        return next(iter(local.request.infer({0: x}).values()))

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calls", type=int, default=120)
    args = parser.parse_args()
    entry = read_manifest(args.bundle).body_part
    fp32 = args.bundle / entry.onnx.file
    int8 = args.bundle / entry.int8.file
    threads = InferenceThreads(1, streams=STREAMS)
    x = np.random.default_rng(0).random(
        (1, entry.spec.input_size, entry.spec.input_size, entry.spec.channels), dtype=np.float32
    )
    px = parity_inputs(entry.spec)
    ref = OnnxPredictor(fp32, InferenceThreads())(px)
    with tempfile.TemporaryDirectory() as tmp:
        int8_full = Path(tmp) / "body_part.int8-8bit.onnx"
        x8 = calibration_inputs("body_part", entry.spec, n=16)
        quantize_model(fp32, int8_full, x8, reduce_range=False)
        rows = [
            ("onnx fp32", OnnxPredictor(fp32, threads)),
            ("onnx int8, 7-bit weights", OnnxPredictor(int8, threads)),
            ("onnx int8, 8-bit weights", OnnxPredictor(int8_full, threads)),
            ("openvino fp32, 1 stream of 1 thread", one_stream_one_thread(fp32, "fp32")),
            ("openvino fp32", OpenVinoPredictor(fp32, threads, "fp32")),
            ("openvino bf16, 1 stream of 1 thread", one_stream_one_thread(fp32, "bf16")),
            ("openvino bf16", OpenVinoPredictor(fp32, threads, "bf16")),
            ("openvino int8, 1 stream of 1 thread", one_stream_one_thread(int8, "fp32")),
            ("openvino int8, 7-bit weights", OpenVinoPredictor(int8, threads, "fp32")),
            ("openvino int8, 8-bit weights", OpenVinoPredictor(int8_full, threads, "fp32")),
        ]
        print(f"stage 1 of {args.bundle.name}, {STREAMS} streams, 1 image per call")
        for label, call in rows:
            gap = max_output_difference(np.asarray(call(px), np.float64), ref)
            print(f"{label:38s} {rate(call, x, args.calls):6.1f} images/s   |dp| {gap:.4f}")


if __name__ == "__main__":
    main()
