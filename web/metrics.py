"""``/metrics``: the ledger in Prometheus' text format, read at each scrape.

Counts come from the ledger itself, so every replica of the app reports the same numbers. The
inference histogram is built from the predictions' recorded timings; each scrape reads only the
predictions recorded since the last one.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from bonewatch.db.monitoring import pending_deliveries, prediction_timings_after, queued_by_queue
from bonewatch.db.queries import count_by_status
from bonewatch.db.reviews import review_counts

log = logging.getLogger(__name__)

# Seconds of model time per image: preprocessing, stage 1 and stage 2, as the worker recorded.
INFERENCE_PARTS = ("preprocess_ms", "stage1_ms", "stage2_ms")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROCESSED = ("done", "failed", "unsupported")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Histogram:
    """Cumulative inference-time buckets over every prediction read so far."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.last_id = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip([*map(str, BUCKETS), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


class LedgerCollector(Collector):
    """Reads the ledger at each scrape; ``queue_depths`` (the broker's, in distributed mode) is
    asked too where given."""

    def __init__(
        self, engine: Engine, queue_depths: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.engine = engine
        self.queue_depths = queue_depths
        self._histogram = _Histogram()
        self._lock = threading.Lock()

    def _inference(self) -> _Histogram:
        with self._lock:
            while True:
                rows = prediction_timings_after(self.engine, self._histogram.last_id)
                for prediction_id, timings in rows:
                    self._histogram.last_id = prediction_id
                    parts = [timings.get(k) for k in INFERENCE_PARTS]
                    known = [float(v) for v in parts if isinstance(v, int | float)]
                    if known:
                        self._histogram.add(sum(known) / 1000.0)
                if len(rows) < 5000:
                    return self._histogram

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        statuses = count_by_status(self.engine)
        images = GaugeMetricFamily(
            "bonewatch_images", "Images in the ledger by status.", labels=["status"]
        )
        for status, n in statuses.items():
            images.add_metric([status], n)
        yield images
        yield CounterMetricFamily(
            "bonewatch_images_processed",
            "Images that reached done, failed or unsupported.",
            value=sum(statuses[s] for s in PROCESSED),
        )
        histogram = self._inference()
        yield HistogramMetricFamily(
            "bonewatch_inference_seconds",
            "Model time per image (preprocessing, body part and fracture stages).",
            buckets=histogram.buckets(),
            sum_value=histogram.total,
        )
        depth = GaugeMetricFamily(
            "bonewatch_queue_depth",
            "Images waiting per queue: queued rows in the ledger, and messages in the broker.",
            labels=["queue", "source"],
        )
        for queue, n in queued_by_queue(self.engine).items():
            depth.add_metric([queue, "ledger"], n)
        if self.queue_depths is not None:
            try:
                for queue, n in self.queue_depths().items():
                    depth.add_metric([queue, "broker"], n)
            except Exception as exc:  # an unreachable broker must not cost the other metrics
                log.warning("queue depths unavailable: %s", exc)
        yield depth
        pending = pending_deliveries(self.engine)
        if pending is not None:
            yield GaugeMetricFamily(
                "bonewatch_deliveries_pending",
                "Result objects waiting in the outbox.",
                value=pending,
            )
        counts = review_counts(self.engine)
        reviews = CounterMetricFamily(
            "bonewatch_reviews", "Reviews by verdict.", labels=["verdict"]
        )
        for verdict in ("agree", "disagree"):
            reviews.add_metric([verdict], counts[verdict])
        yield reviews
        yield GaugeMetricFamily(
            "bonewatch_reviewed_studies",
            "Studies with at least one review.",
            value=counts["studies"],
        )


def metrics_registry(
    engine: Engine, queue_depths: Callable[[], dict[str, int]] | None = None
) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding the ledger collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(engine, queue_depths))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
