"""The plain frozen values the ledger takes and returns, each field declared once.

A field of :class:`NewImage` is the ``images`` column of the same name. A field of
:class:`PredictionRecord` is the ``predictions`` column of the same name, except those in
:data:`PREDICTION_IMAGE_FIELDS`, which go onto the image's row. A field of :class:`ClaimedImage`
is the ``images`` column of the same name (``image_id`` is ``id``), and so is a field of
:class:`FailureRecord` (:data:`FAILURE_IMAGE_FIELDS`). So a new column is one new
field here (plus the schema and its Alembic migration); the statements follow the fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Self, cast


class FromAttrs:
    """``from_attrs``: build the dataclass from another object's attributes of the same names."""

    @classmethod
    def from_attrs(cls, source: object, /, **overrides: Any) -> Self:
        """Each field from ``overrides``, else from ``source``'s attribute of that name, else its
        default. For example ``NewImage.from_attrs(meta, queue="bulk")`` for an ingest
        ``ImageMeta``, or ``PredictionRecord.from_attrs(prediction, image_id=..., ...)``.

        Raises:
            TypeError: an override names no field, or a field without a default has no value.
        """
        names = [f.name for f in fields(cast(Any, cls))]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
        values = {
            name: overrides[name] if name in overrides else getattr(source, name)
            for name in names
            if name in overrides or hasattr(source, name)
        }
        return cls(**values)


@dataclass(frozen=True)
class NewImage(FromAttrs):
    """A file (or frame) seen by ingest, to be registered in the ledger.

    ``status`` is ``queued`` unless the header already showed the file to be ``failed`` or
    ``unsupported``, in which case ``error_class`` and ``reason`` say why.
    """

    path: str
    sha256: str | None
    size_bytes: int | None
    format: str | None
    queue: str = "live"
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    patient_hash: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    mura_part: str | None = None
    mura_label: int | None = None
    frame_number: int | None = None
    status: str = "queued"
    error_class: str | None = None
    reason: str | None = None
    run_id: int | None = None


@dataclass(frozen=True)
class Registered:
    """Where a registered file stands: its row id, status, original if duplicate, new or not."""

    image_id: int
    status: str
    duplicate_of: int | None
    created: bool
    requeued: bool = False  # an old row that had failed for a passing reason, queued again
    retaken: bool = False  # the path's row without a result, taken again for its new bytes
    deferred: bool = False  # no row now: the path's row is being processed; offer it again


@dataclass(frozen=True)
class ClaimedImage:
    """An image leased to one worker for processing."""

    image_id: int
    path: str
    sha256: str | None
    attempts: int
    queue: str
    study_uid: str | None
    body_part_examined: str | None
    run_id: int | None = None


@dataclass(frozen=True, kw_only=True)
class PredictionOutcome:
    """What the two stages said about one image: each field the ``predictions`` column of the
    same name, stored by :class:`PredictionRecord` and read back by the study page
    (``worklist.PredictionView``)."""

    body_part_probs: dict[str, float]
    body_part: str | None
    body_part_confidence: float | None
    body_part_examined: str | None
    body_part_disagrees: bool
    p_fracture: float | None
    label: str | None
    threshold: float | None
    fracture_model: str | None


# The outcome's fields, in order: the prediction columns a reader selects.
PREDICTION_OUTCOME_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PredictionOutcome))


@dataclass(frozen=True, kw_only=True)
class PredictionRecord(PredictionOutcome, FromAttrs):
    """One bundle version's result for one image; ``status`` is ``done`` or ``unsupported``."""

    image_id: int
    bundle_name: str
    bundle_version: str
    status: str
    reason: str | None
    # Milliseconds per step, and ``engine``: the engine/precision that served (``onnx/int8``).
    timings: dict[str, float | str]
    heatmap_path: str | None = None
    rows: int | None = None
    columns: int | None = None


# The fields of a PredictionRecord that update its image's row rather than the prediction's.
PREDICTION_IMAGE_FIELDS: tuple[str, ...] = ("status", "reason", "rows", "columns")


@dataclass(frozen=True)
class FailureRecord:
    """A final, non-retryable outcome for an image: ``failed`` or ``unsupported``."""

    image_id: int
    status: str
    error_class: str
    reason: str


# The fields of a FailureRecord that set its image's row: all but the id.
FAILURE_IMAGE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(FailureRecord) if f.name != "image_id"
)


@dataclass(frozen=True)
class NewRun:
    """A run to create: each field is the ``runs`` column of that name. ``key`` names a
    long-lived run (a watched folder, a listener) that a restart carries on with."""

    kind: str
    queue: str
    paths: tuple[str, ...]
    started_by: str
    bundle_name: str | None = None
    bundle_version: str | None = None
    bulk_window: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class RunInfo:
    """Where a run stands. ``control`` is what its owner asked for (active, paused,
    cancelled); ``state`` is derived from it and the counts: queued (nothing finished or
    taken yet), running, paused, cancelled or done (registration over and nothing left).

    ``counts`` has every image status; ``left`` is queued + processing + cancelled. The rate
    fields are for images the workers finished (not those refused at the door or duplicates):
    ``recent`` images finished in the last ``recent_seconds``, measured between the first and
    last finish times there (``recent_span_seconds``, with ``recent_first`` images finished
    at the first one); ``total_*`` the same over the run's whole life.
    """

    id: int
    kind: str
    key: str | None
    queue: str
    paths: tuple[str, ...]
    started_by: str
    bundle_name: str | None
    bundle_version: str | None
    bulk_window: str | None
    control: str
    reason: str | None
    created_at: datetime
    updated_at: datetime
    sealed_at: datetime | None
    state: str
    counts: dict[str, int]
    left: int
    recent_seconds: float
    recent: int
    recent_first: int
    recent_span_seconds: float
    total_worked: int
    total_first: int
    total_span_seconds: float
    last_finished_at: datetime | None


def image_values(item: NewImage) -> dict[str, Any]:
    """The ``images`` columns a NewImage sets, by name."""
    return asdict(item)


def prediction_values(record: PredictionRecord) -> dict[str, Any]:
    """The ``predictions`` columns a PredictionRecord sets, by name."""
    return {k: v for k, v in asdict(record).items() if k not in PREDICTION_IMAGE_FIELDS}
