"""The connector's compute-to-data data plane: job records, the job service and its router.

make_dataplane_router(get_service) -> APIRouter        mount on the connector app (jobs, GLM, token)
make_review_router(get_service, staff) -> APIRouter    the output-review airlock for staff API keys
JobService(db, provider_id=, provider_jurisdiction=, key=, agreement=, transfer=, consent=, connect=,
           record=, record_many=, clock=, consumer=, approvals=)
                                                        needs migration branches "jobs" and "compute";
                                                        record_many (AuditLog.append_many) batches a
                                                        job's audit entries into one commit
lazy_store_connection(path, keys_dir)                   the store's DuckDB connection, fresh after each commit
"""

from healthspace.connector.dataplane.api import make_dataplane_router, make_review_router
from healthspace.connector.dataplane.review import OutputReview, Reviewer, ReviewPublic
from healthspace.connector.dataplane.service import (
    AgreementView,
    AuditRecorder,
    ConsumerProfile,
    FixedAgreement,
    FixedTransfer,
    GlmStep,
    JobCreate,
    JobPublic,
    JobService,
    PolicyDeniedError,
    TokenPublic,
    TransferView,
    sign_payload,
)
from healthspace.connector.dataplane.states import JOB, REVIEW, JobState, ReviewState
from healthspace.connector.dataplane.store import lazy_store_connection
from healthspace.connector.dataplane.terms import data_classes_of, rules_from_policy

__all__ = [
    "JOB",
    "REVIEW",
    "AgreementView",
    "AuditRecorder",
    "ConsumerProfile",
    "FixedAgreement",
    "FixedTransfer",
    "GlmStep",
    "JobCreate",
    "JobPublic",
    "JobService",
    "JobState",
    "OutputReview",
    "PolicyDeniedError",
    "ReviewPublic",
    "ReviewState",
    "Reviewer",
    "TokenPublic",
    "TransferView",
    "data_classes_of",
    "lazy_store_connection",
    "make_dataplane_router",
    "make_review_router",
    "rules_from_policy",
    "sign_payload",
]
