"""Compute-to-data: query specs, SQL compilation, engines, disclosure control, privacy budget, federated GLM.

parse_spec(doc) -> QuerySpec                      validate a version-1 spec (ValidationError with pointers)
authorise(spec, rules)                            refuse what the agreement does not allow, before running
run_job(spec, engine, consent, rules, ctx, ledger=, guard=) -> JobResult   (JobResult.to_json(): canonical)
GlmSite(engine, consent, spec, analysis_id, rules)   a site callable β -> SiteStats
fit_glm(sites, family, n_params) -> GlmFit        the coordinator (sites may be HTTP calls)
BudgetLedger(db).spend(key, epsilon, limit, job_id)   guarded ε ledger (branch "compute")
DifferencingGuard(history, min_difference)        the minimum-difference rule across jobs
"""

from healthspace.compute.budget import BudgetExhaustedError, BudgetKey, BudgetLedger
from healthspace.compute.disclosure import DisclosureError, DisclosureRules, dp_counts
from healthspace.compute.engine import DuckDBEngine, PostgresEngine, attach_parquet, load_postgres
from healthspace.compute.glm import GlmFit, GlmSite, SiteStats, fit_glm, site_stats
from healthspace.compute.guard import DifferencingGuard, MemoryCohortHistory, SqlCohortHistory
from healthspace.compute.job import JobContext, JobResult, authorise, canonical_json, job_parameters, run_job
from healthspace.compute.spec import QuerySpec, parse_spec

__all__ = [
    "BudgetExhaustedError",
    "BudgetKey",
    "BudgetLedger",
    "DifferencingGuard",
    "DisclosureError",
    "DisclosureRules",
    "DuckDBEngine",
    "GlmFit",
    "GlmSite",
    "JobContext",
    "JobResult",
    "MemoryCohortHistory",
    "PostgresEngine",
    "QuerySpec",
    "SiteStats",
    "SqlCohortHistory",
    "attach_parquet",
    "authorise",
    "canonical_json",
    "dp_counts",
    "fit_glm",
    "job_parameters",
    "load_postgres",
    "parse_spec",
    "run_job",
    "site_stats",
]
