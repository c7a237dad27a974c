"""Inference engines: one model's forward pass on Keras (TensorFlow), ONNX Runtime or OpenVINO.

Every engine takes a float32 batch (N, S, S, C) and return float64 outputs (N, K), so the cascade
does not know which one runs. Only this module imports ``onnxruntime``, and only when an ONNX model
is loaded; a worker serving ONNX never imports TensorFlow at all.

Framework threads are set here, once per process, before the first model loads: the decode pool
runs beside inference, and both frameworks otherwise start a thread per core (TensorFlow two
pools of them), which then compete with decoding for the same cores.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENGINES = ("keras", "onnx", "openvino")
AUTO = "auto"
# Numeric precisions: fp32 the exported graphs; int8 the statically quantized (QDQ) graphs that
# ``bonewatch bundle quantize`` adds; bf16 the fp32 graphs run by OpenVINO in bfloat16.
PRECISIONS = ("fp32", "int8", "bf16")
# Engines that run the bundle's ONNX files.
ONNX_ENGINES = ("onnx", "openvino")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class InferenceThreads:
    """How the inference framework runs on this host's CPU: its threads and its pass size.

    Attributes:
        intra_op: Threads that share the work of one operation (a convolution); 0 means the
            available cores divided among the streams.
        inter_op: Operations that may run side by side; the cascade's graphs are chains, so 1
            loses nothing and keeps a second pool from competing with the first.
        streams: Batches the process runs through the models at the same time, each on its own
            thread (the embedded worker's inference threads); 0 means the engine's default,
            settled by :meth:`for_engine` when a bundle loads.
        forward_batch: The most images one forward pass takes; a claimed batch larger than this
            runs in several passes. 0 means the engine's own choice: on the CPU
            :func:`cpu_pass_size`, on a GPU the whole batch.
    """

    intra_op: int = 0
    inter_op: int = 1
    streams: int = 1
    forward_batch: int = 0

    def resolved_intra_op(self) -> int:
        if self.intra_op > 0:
            return self.intra_op
        return max(1, available_cores() // max(1, self.streams))

    def for_engine(self, engine: str) -> InferenceThreads:
        """These threads with an unset stream count replaced by ``engine``'s default."""
        return self if self.streams else replace(self, streams=default_streams(engine))


# Above this many cores a stream's operations are wide enough to keep its threads busy.
MAX_AUTO_STREAMS = 4


def default_streams(engine: str) -> int:
    """Batches in inference at once on ``engine`` when the user sets none: the embedded worker's
    inference streams, and the processes a ``bonewatch worker`` starts.

    ONNX Runtime runs one batch per core, each operation on a single thread (at most
    :data:`MAX_AUTO_STREAMS`): a decode thread that takes a core for a moment then delays one
    batch, instead of every operation of a batch split over all the cores waiting for its slowest
    thread. Keras keeps one: two streams on TensorFlow ran at two thirds of one (the README's
    "Throughput" section has the figures).
    """
    if engine in ONNX_ENGINES:
        return max(1, min(available_cores(), MAX_AUTO_STREAMS))
    return 1


# Input pixels per forward pass on the CPU, by engine. A DenseNet121 image at 224 px has about
# 3 MB of activations in its first blocks, so batches of 16 run out of the cache and wait on
# memory: two-stage passes on 2 cores ran 12% faster on ONNX Runtime at 1 image per pass (one
# thread per session) and 26% faster on Keras at 4 (two threads) than at 16. Small models lose
# more to the call overhead than they gain, so the budget is in pixels, not images: the demo's
# 128 px CNN gets 3 and 12 per pass (the README's "Throughput" has the figures).
CPU_PASS_PIXELS = {"keras": 4 * 224 * 224, "onnx": 224 * 224, "openvino": 224 * 224}


def cpu_pass_size(engine: str, input_shape: Sequence[Any]) -> int:
    """Images per forward pass on the CPU for a model taking ``input_shape`` (N, H, W, C);
    0 (the whole batch) where the shape's sides are not fixed."""
    try:
        pixels = int(input_shape[1]) * int(input_shape[2])
    except (TypeError, ValueError, IndexError):
        return 0
    return max(1, CPU_PASS_PIXELS[engine] // max(1, pixels))


_tf_threads: InferenceThreads | None = None


# What TensorFlow's C++ runtime prints on stderr at start-up whatever TF_CPP_MIN_LOG_LEVEL says.
_TF_START_UP_CHATTER = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
    "Unable to register cu",
    "TF-TRT Warning",
    "could not open file to read NUMA node",
)
_tf_imported = False
_tf_import_lock = threading.Lock()


def import_tensorflow() -> Any:
    """TensorFlow, imported once with its start-up lines held back; anything else it prints
    then (a real error) is passed on to stderr."""
    global _tf_imported
    with _tf_import_lock:
        if _tf_imported:
            import tensorflow as tf

            return tf
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tempfile

        with tempfile.TemporaryFile() as held:
            saved = os.dup(2)
            try:
                os.dup2(held.fileno(), 2)
                import tensorflow as tf
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            held.seek(0)
            lines = held.read().decode("utf-8", "replace").splitlines()
        for line in lines:
            if line.strip() and not any(chatter in line for chatter in _TF_START_UP_CHATTER):
                print(line, file=sys.stderr)
        _tf_imported = True
        return tf


def configure_tensorflow_threads(threads: InferenceThreads) -> None:
    """Set TensorFlow's thread pools; effective only before TensorFlow runs its first operation.

    Later calls with other values are logged and ignored: TensorFlow cannot resize its pools once
    they exist.
    """
    global _tf_threads
    if _tf_threads == threads:
        return
    tf = import_tensorflow()

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads.resolved_intra_op())
        tf.config.threading.set_inter_op_parallelism_threads(threads.inter_op)
    except RuntimeError:
        log.warning(
            "TensorFlow is already running with %s; keeping them instead of %s",
            _tf_threads or "its default threads",
            threads,
        )
        return
    _tf_threads = threads


class Predictor(ABC):
    """One model's forward pass for inference: a float32 batch in, float64 outputs out.

    Attributes:
        forward_batch: The most images :meth:`__call__` should be given at once; 0 = no limit.
            Callers split larger batches (:func:`models.cascade.predict_probs`).
    """

    engine: str = ""
    forward_batch: int = 0

    def _settle_pass(self, requested: int, on_gpu: bool, input_shape: Sequence[Any]) -> None:
        """``forward_batch`` from the requested size: 0 = the engine's choice for the device."""
        self.forward_batch = requested or (0 if on_gpu else cpu_pass_size(self.engine, input_shape))

    def pass_size(self, batch_size: int) -> int:
        """Images per call when ``batch_size`` are asked for: the smaller of the two."""
        return min(batch_size, self.forward_batch) if self.forward_batch > 0 else batch_size

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for a batch ``x`` of shape (N, S, S, C)."""


class KerasPredictor(Predictor):
    """A Keras model traced once for every batch size.

    ``predict_on_batch`` traces a new graph for each distinct batch shape; stage 2's per-part
    groups come in all sizes, so the worker would keep retracing. One input signature with an
    open batch dimension keeps a single graph per model.
    """

    engine = "keras"

    def __init__(self, model: Any, forward_batch: int = 0) -> None:
        import tensorflow as tf

        self.model = model
        self._tf = tf
        self._settle_pass(
            forward_batch, bool(tf.config.list_logical_devices("GPU")), model.input_shape
        )
        spec = tf.TensorSpec(model.input_shape, tf.float32)
        # Traced here, once: a concrete function never goes back through tracing.
        self._forward = tf.function(
            lambda x: model(x, training=False), input_signature=[spec]
        ).get_concrete_function()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(
            self._forward(self._tf.convert_to_tensor(x, self._tf.float32)), np.float64
        )


class OnnxPredictor(Predictor):
    """An ONNX model in an ONNX Runtime session: on CUDA where the build has it, else the CPU."""

    engine = "onnx"

    def __init__(self, path: Path, threads: InferenceThreads) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads.resolved_intra_op()
        options.inter_op_num_threads = threads.inter_op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would otherwise spin for work between batches and between the
        # two stages, taking the cores that the decode pool needs at exactly that moment.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if _register_shared_cpu_arena(ort):
            # One arena for all of the bundle's sessions: each session's own arena keeps its
            # peak activations (about 200 MB for DenseNet121 at batch 16), eight times over.
            options.add_session_config_entry("session.use_env_allocators", "1")
        self.session = ort.InferenceSession(
            str(path), options, providers=_onnx_providers(ort.get_available_providers())
        )
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path.name} has {len(inputs)} inputs; a bundle model has one")
        self._input = inputs[0].name
        self._output = self.session.get_outputs()[0].name
        self.input_shape = tuple(inputs[0].shape)
        on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"
        self._settle_pass(threads.forward_batch, on_gpu, self.input_shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(x, dtype=np.float32)
        (out,) = self.session.run([self._output], {self._input: batch})
        return np.asarray(out, np.float64)


_arena_lock = threading.Lock()
_arena_registered: bool | None = None


def _register_shared_cpu_arena(ort: Any) -> bool:
    """Register one CPU arena allocator for every session of this process; True when it is."""
    global _arena_registered
    with _arena_lock:
        if _arena_registered is None:
            try:
                info = ort.OrtMemoryInfo(
                    "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
                )
                ort.create_and_register_allocator(info, None)
                _arena_registered = True
            except Exception as exc:  # an onnxruntime build without it: per-session arenas
                log.info("ONNX Runtime sessions keep their own memory arenas: %s", exc)
                _arena_registered = False
        return _arena_registered


def _onnx_providers(available: list[str]) -> list[str]:
    """CUDA first where this onnxruntime build has it, the CPU always as the fallback."""
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*preferred, "CPUExecutionProvider"]


class OpenVinoPredictor(Predictor):
    """An ONNX model compiled by OpenVINO for the CPU, in fp32 or bf16 (int8 graphs run their
    quantized operations in int8 either way).

    One compiled model per file; each calling thread gets its own infer request, so inference
    streams share the weights as they share ONNX Runtime's sessions.
    """

    engine = "openvino"

    def __init__(self, path: Path, threads: InferenceThreads, precision: str = "fp32") -> None:
        core = openvino_core()
        model = core.read_model(str(path))
        config = openvino_config(threads, precision)
        self.compiled = core.compile_model(model, "CPU", config)
        self.precision = precision
        shape = model.inputs[0].get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in shape)
        self._local = threading.local()
        self._settle_pass(threads.forward_batch, False, self.input_shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        batch = np.ascontiguousarray(x, dtype=np.float32)
        out = request.infer({0: batch})
        return np.asarray(next(iter(out.values())), np.float64)


def openvino_config(threads: InferenceThreads, precision: str) -> dict[str, Any]:
    """The CPU plugin's settings for a model served on ``threads`` in ``precision``.

    One OpenVINO stream per inference stream, each with the stream's intra-op threads. A
    compiled model runs at most ``NUM_STREAMS`` infer requests at once, whichever threads call
    them: compiled with one stream of one thread, the worker's two inference streams took turns
    on one core (DenseNet121 at 224 px on 2 cores, fp32: 15.5 images/s against 27.4 with two
    streams of one thread; int8: 32.3 against 63.6).
    """
    streams = max(1, threads.streams)
    return {
        "NUM_STREAMS": streams,
        "INFERENCE_NUM_THREADS": threads.resolved_intra_op() * streams,
        # bf16 is asked for by name: the default on CPUs with AMX is bf16 already.
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        # Threads pinned to cores fight the decode threads for them: 96 full-size JPEG 2000
        # files through `bonewatch process` on 2 cores (DenseNet121 at 224 px, int8) ran at
        # 12.58 and 12.59 images/s pinned, 14.37 and 14.83 not.
        "ENABLE_CPU_PINNING": False,
    }


_ov_core: Any = None
_ov_lock = threading.Lock()


def openvino_core() -> Any:
    """The process's one OpenVINO ``Core`` (it owns the CPU plugin and its thread pool)."""
    global _ov_core
    with _ov_lock:
        if _ov_core is None:
            import openvino as ov

            _ov_core = ov.Core()
        return _ov_core


_ov_cache_dir: str | None = None


def use_openvino_cache(folder: Path) -> None:
    """Keep OpenVINO's compiled models under ``folder`` (its ``CACHE_DIR``): a later process
    on this host loads them instead of compiling them again. Failing to is logged, not raised."""
    global _ov_cache_dir
    target = str(folder)
    with _ov_lock:
        if _ov_cache_dir == target:
            return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        openvino_core().set_property({"CACHE_DIR": target})
    except Exception as exc:  # an unwritable folder, or a plugin without the property
        log.info("OpenVINO compiles every model at load: no cache in %s (%s)", folder, exc)
        return
    with _ov_lock:
        _ov_cache_dir = target


def openvino_available() -> bool:
    """Whether OpenVINO can be imported in this environment."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native bfloat16 (AVX-512 BF16 or AMX) here."""
    if not openvino_available():
        return False
    try:
        caps = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no CPU plugin
        return False
    return "BF16" in [str(c).upper() for c in caps]


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported in this environment."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
