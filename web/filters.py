"""The worklist's query parameters: parsed and checked once, for the pages and the API alike,
and written back into links (pagination, sorting, a study's previous and next)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import urlencode

from bonewatch.db.reviews import PARTS
from bonewatch.db.schema import STATUSES
from bonewatch.db.worklist import LABEL_FILTERS, SORTS, BundleVersion, WorklistFilter

PER_PAGE = (25, 50, 100, 200)
DEFAULT_PER_PAGE = 50
MAX_PAGE = 100_000
MAX_TEXT = 128
# The parameters a worklist link carries, in the order links show them.
PARAMS = (
    "bundle",
    "version",
    "part",
    "label",
    "reviewed",
    "status",
    "min_p",
    "max_p",
    "since",
    "until",
    "sort",
    "page",
    "per_page",
)


class BadQuery(ValueError):
    """A query parameter out of its allowed values; the message names it."""


def _choice(params: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    if value not in allowed:
        raise BadQuery(f"{name} must be one of {', '.join(allowed)}")
    return value


def _probability(params: Mapping[str, str], name: str) -> float | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise BadQuery(f"{name} must be a number from 0 to 1") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise BadQuery(f"{name} must be a number from 0 to 1")
    return number


def _date(params: Mapping[str, str], name: str) -> date | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadQuery(f"{name} must be a date, YYYY-MM-DD") from None


def _integer(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    value = params.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise BadQuery(f"{name} must be a whole number from {lo} to {hi}")
    return int(value)


def text_param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    if len(value) > MAX_TEXT or not value.isprintable():
        raise BadQuery(f"{name} must be at most {MAX_TEXT} printable characters")
    return value


@dataclass(frozen=True)
class WorklistQuery:
    """The worklist a page or an API call asked for."""

    bundle: str | None = None
    version: str | None = None
    part: str | None = None
    label: str | None = None
    reviewed: str | None = None
    status: str | None = None
    min_p: float | None = None
    max_p: float | None = None
    since: date | None = None
    until: date | None = None
    sort: str = "score"
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> WorklistQuery:
        """Read the parameters; an empty one means "any".

        Raises:
            BadQuery: a value outside its parameter's allowed values.
        """
        per_page = _integer(params, "per_page", DEFAULT_PER_PAGE, 1, max(PER_PAGE))
        query = cls(
            bundle=text_param(params, "bundle"),
            version=text_param(params, "version"),
            part=_choice(params, "part", PARTS),
            label=_choice(params, "label", LABEL_FILTERS),
            reviewed=_choice(params, "reviewed", ("yes", "no")),
            status=_choice(params, "status", STATUSES),
            min_p=_probability(params, "min_p"),
            max_p=_probability(params, "max_p"),
            since=_date(params, "since"),
            until=_date(params, "until"),
            sort=_choice(params, "sort", SORTS) or "score",
            page=_integer(params, "page", 1, 1, MAX_PAGE),
            per_page=per_page,
        )
        if (query.bundle is None) != (query.version is None):
            raise BadQuery("give bundle and version together")
        return query

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def resolve_bundle(self, known: list[BundleVersion]) -> WorklistQuery:
        """This query with its bundle version named: the one asked for, else the newest.

        Raises:
            BadQuery: a bundle version the ledger has no results from.
        """
        if self.bundle is not None:
            if not any((b.name, b.version) == (self.bundle, self.version) for b in known):
                raise BadQuery("the ledger has no results from that bundle version")
            return self
        if not known:
            return self
        return replace(self, bundle=known[0].name, version=known[0].version)

    def to_filter(self) -> WorklistFilter:
        """The ledger's filter; dates are whole UTC days (``until`` included)."""

        def midnight(day: date) -> datetime:
            return datetime.combine(day, time(), tzinfo=UTC)

        return WorklistFilter(
            bundle_name=self.bundle,
            bundle_version=self.version,
            part=self.part,
            label=self.label,
            reviewed=None if self.reviewed is None else self.reviewed == "yes",
            min_p=self.min_p,
            max_p=self.max_p,
            since=midnight(self.since) if self.since else None,
            until=midnight(self.until) + timedelta(days=1) if self.until else None,
            status=self.status,
            sort=self.sort,
        )

    def params(self, **changes: object) -> dict[str, str]:
        """The non-default parameters (with ``changes``, which may add others such as ``pos``)
        as strings, in :data:`PARAMS` order, then the others."""
        values: dict[str, object] = {name: getattr(self, name) for name in PARAMS}
        values.update(changes)
        defaults = {"sort": "score", "page": 1, "per_page": DEFAULT_PER_PAGE}
        names = [*PARAMS, *(name for name in changes if name not in PARAMS)]
        return {
            name: str(values[name])
            for name in names
            if values.get(name) is not None and values.get(name) != defaults.get(name)
        }

    def query_string(self, **changes: object) -> str:
        """``?...`` for a link to this worklist (with ``changes``), or ``""``."""
        encoded = urlencode(self.params(**changes))
        return f"?{encoded}" if encoded else ""
