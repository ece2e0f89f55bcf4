"""Study orchestration on the consumer side: fan jobs out to providers, verify, combine, review.

Study(scenario, spec, sites)                     sites from STARTED transfers (site_from_transfer)
run_study(study, timeout_s=) -> StudyResult      per-site status, combined figures, provenance
fit_federated_glm(study, analysis) -> GlmStudyResult   exact IRLS over HTTP site callables
Airlock(required=2)                               results wait for two reviewers other than the requester
"""

from healthspace.lab.review import REVIEW, Airlock, HeldResult, ReviewState
from healthspace.lab.sites import Site, fetch_public_key, site_from_transfer, verify_envelope
from healthspace.lab.study import (
    GlmStudyResult,
    SiteOutcome,
    Study,
    StudyResult,
    combine,
    fit_federated_glm,
    run_study,
)

__all__ = [
    "REVIEW",
    "Airlock",
    "GlmStudyResult",
    "HeldResult",
    "ReviewState",
    "Site",
    "SiteOutcome",
    "Study",
    "StudyResult",
    "combine",
    "fetch_public_key",
    "fit_federated_glm",
    "run_study",
    "site_from_transfer",
    "verify_envelope",
]
