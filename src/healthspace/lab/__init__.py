"""Study orchestration on the consumer side: fan jobs out to providers, verify, combine, review.

Study(scenario, spec, sites)                     sites from STARTED transfers (site_from_transfer)
run_study(study, timeout_s=) -> StudyResult      per-site status, combined figures, provenance
fetch_released(study, result) -> StudyResult      collect results a provider held for output review
fit_federated_glm(study, analysis) -> GlmStudyResult   exact IRLS over HTTP site callables
TokenKeeper / DEFAULT_TOKENS                      data-plane tokens refreshed near expiry or on 401
Airlock(required=2)                               in-memory airlock of the lab's own (the provider's is
                                                  persisted: connector.dataplane.OutputReview)
"""

from healthspace.lab.review import REVIEW, Airlock, HeldResult, ReviewState
from healthspace.lab.sites import (
    DEFAULT_TOKENS,
    Site,
    TokenKeeper,
    TokenRefreshError,
    fetch_public_key,
    site_from_transfer,
    verify_envelope,
)
from healthspace.lab.study import (
    GlmStudyResult,
    SiteOutcome,
    Study,
    StudyResult,
    combine,
    fetch_released,
    fit_federated_glm,
    run_study,
)

__all__ = [
    "DEFAULT_TOKENS",
    "REVIEW",
    "Airlock",
    "GlmStudyResult",
    "HeldResult",
    "ReviewState",
    "Site",
    "SiteOutcome",
    "Study",
    "StudyResult",
    "TokenKeeper",
    "TokenRefreshError",
    "combine",
    "fetch_public_key",
    "fetch_released",
    "fit_federated_glm",
    "run_study",
    "site_from_transfer",
    "verify_envelope",
]
