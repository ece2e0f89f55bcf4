"""The lifecycle of a dataset: states, the allowed moves between them, and what each state permits.

    ACQUIRED ──curate──> CURATED ──publish──> PUBLISHED ──suspend──> SUSPENDED
       ^                 |  ^  <──unpublish──┘    ^   <──resume────────┘ |
       └──reopen─────────┘  └──────────────────────────withdraw──────────┘
    ACQUIRED, CURATED, SUSPENDED ──archive──> ARCHIVED ──restore──> CURATED
    ACQUIRED, CURATED, SUSPENDED, ARCHIVED ──destroy──> DESTROYED (final)

A published dataset is offered to others, so it is first suspended (or unpublished) before it can be
archived or destroyed: nothing in use disappears in one step.
"""

from __future__ import annotations

from enum import StrEnum

from healthspace.core.states import StateMachine

__all__ = ["DATASET_LIFECYCLE", "READABLE", "WRITABLE", "DatasetState"]


class DatasetState(StrEnum):
    ACQUIRED = "acquired"  # loaded (or being loaded) from the source system; not yet reviewed
    CURATED = "curated"  # a steward reviewed validation and quality; not offered yet
    PUBLISHED = "published"  # offered in the catalog; usable under agreements
    SUSPENDED = "suspended"  # withdrawn from use for now (incident, review); data kept live
    ARCHIVED = "archived"  # compacted into the archive until its retention date; not readable
    DESTROYED = "destroyed"  # crypto-shredded; final


S = DatasetState

DATASET_LIFECYCLE: StateMachine[DatasetState] = StateMachine(
    "dataset",
    {
        S.ACQUIRED: {S.CURATED, S.ARCHIVED, S.DESTROYED},
        S.CURATED: {S.PUBLISHED, S.ACQUIRED, S.ARCHIVED, S.DESTROYED},
        S.PUBLISHED: {S.SUSPENDED, S.CURATED},
        S.SUSPENDED: {S.PUBLISHED, S.CURATED, S.ARCHIVED, S.DESTROYED},
        S.ARCHIVED: {S.CURATED, S.DESTROYED},
    },
)

# Live data exists (the store can be opened) in these states.
READABLE = frozenset({S.ACQUIRED, S.CURATED, S.PUBLISHED, S.SUSPENDED})
# New batches (ingest, quarantine re-submission) are accepted only before publication.
WRITABLE = frozenset({S.ACQUIRED, S.CURATED})
