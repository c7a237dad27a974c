"""The ledger: SQLAlchemy schema, Alembic migrations, and reading and writing results.

``db`` imports nothing else from bonewatch and takes and returns plain values. By domain:
``records`` (the values), ``registration``, ``leases`` (claims and retries), ``results``,
``queries``, ``rescoring``, ``studies`` (arrivals and completeness), ``backoff`` (the retry
delay), ``engine`` and ``schema``. For the review app: ``worklist`` (the worklist and study
pages), ``reviews`` (verdicts, labels), ``users``, ``audit`` and ``monitoring`` (``/metrics``).
"""

from bonewatch.db.backoff import retry_delay
from bonewatch.db.deliveries import count_deliveries
from bonewatch.db.engine import create_database, current_revision, make_engine, upgrade
from bonewatch.db.leases import (
    claim_batch,
    claim_images,
    exclusive,
    lease_holders,
    next_retry_at,
    reclaim_expired,
    release_for_retry,
    release_leases,
)
from bonewatch.db.queries import (
    count_by_status,
    ledger_health,
    query_results,
    query_studies,
    waiting_images,
)
from bonewatch.db.records import (
    ClaimedImage,
    FailureRecord,
    NewImage,
    PredictionRecord,
    Registered,
)
from bonewatch.db.registration import register_images
from bonewatch.db.rescoring import queue_for_rescoring
from bonewatch.db.results import record_results
from bonewatch.db.schema import FINAL_STATUSES, QUEUES, STATUSES
from bonewatch.db.studies import mark_stable_studies, query_arrivals

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
    "count_deliveries",
    "create_database",
    "current_revision",
    "exclusive",
    "lease_holders",
    "ledger_health",
    "make_engine",
    "mark_stable_studies",
    "next_retry_at",
    "query_arrivals",
    "query_results",
    "query_studies",
    "queue_for_rescoring",
    "reclaim_expired",
    "record_results",
    "register_images",
    "release_for_retry",
    "release_leases",
    "retry_delay",
    "upgrade",
    "waiting_images",
]
