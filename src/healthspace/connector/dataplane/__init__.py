"""The connector's compute-to-data data plane: job records, the job service and its router.

make_dataplane_router(get_service) -> APIRouter        mount on the connector app
JobService(db, provider_id=, provider_jurisdiction=, key=, agreement=, transfer=, consent=, connect=,
           record=, clock=, consumer=, approvals=)    needs migration branches "jobs" and "compute"
lazy_store_connection(path, keys_dir)                   the clinical store's DuckDB connection, opened once
"""

from healthspace.connector.dataplane.api import make_dataplane_router
from healthspace.connector.dataplane.service import (
    AgreementView,
    AuditRecorder,
    ConsumerProfile,
    GlmStep,
    JobCreate,
    JobPublic,
    JobService,
    PolicyDeniedError,
    TransferView,
    sign_payload,
)
from healthspace.connector.dataplane.states import JOB, JobState
from healthspace.connector.dataplane.store import lazy_store_connection
from healthspace.connector.dataplane.terms import data_classes_of, rules_from_policy

__all__ = [
    "JOB",
    "AgreementView",
    "AuditRecorder",
    "ConsumerProfile",
    "GlmStep",
    "JobCreate",
    "JobPublic",
    "JobService",
    "JobState",
    "PolicyDeniedError",
    "TransferView",
    "data_classes_of",
    "lazy_store_connection",
    "make_dataplane_router",
    "rules_from_policy",
    "sign_payload",
]
