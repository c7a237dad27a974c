"""The ledger: SQLAlchemy schema, Alembic migrations, and reading and writing results.

``db`` imports nothing else from bonewatch and takes and returns plain values.
"""

from bonewatch.db.engine import current_revision, make_engine, upgrade
from bonewatch.db.ledger import (
    ClaimedImage,
    FailureRecord,
    NewImage,
    PredictionRecord,
    Registered,
    claim_batch,
    claim_images,
    count_by_status,
    exclusive,
    lease_holders,
    ledger_health,
    next_retry_at,
    query_results,
    query_studies,
    queued_ids,
    reclaim_expired,
    record_results,
    register_images,
    release_for_retry,
    release_leases,
    retry_delay,
    waiting_images,
)
from bonewatch.db.schema import FINAL_STATUSES, QUEUES, STATUSES

__all__ = [
    "FINAL_STATUSES",
    "QUEUES",
    "STATUSES",
    "ClaimedImage",
    "FailureRecord",
    "NewImage",
    "PredictionRecord",
    "Registered",
    "claim_batch",
    "claim_images",
    "count_by_status",
    "exclusive",
    "ledger_health",
    "current_revision",
    "make_engine",
    "query_results",
    "query_studies",
    "queued_ids",
    "lease_holders",
    "next_retry_at",
    "reclaim_expired",
    "release_leases",
    "record_results",
    "register_images",
    "release_for_retry",
    "retry_delay",
    "upgrade",
    "waiting_images",
]
