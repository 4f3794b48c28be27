"""The job store: SQLAlchemy tables, the `Store` repository, engines and migrations.

Light on purpose (SQLAlchemy and Alembic only), so the API process and workers can both import it.
"""

from service.store.base import new_id, utcnow
from service.store.credentials import CREDENTIAL_KINDS, CredentialInfo, OwnerCredential
from service.store.engine import STORE_UNREACHABLE, make_engine, normalize_url
from service.store.jobs import Heartbeat, JobPage, Spend, decode_cursor, encode_cursor
from service.store.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    ApiKey,
    Artifact,
    Base,
    Credential,
    Dataset,
    Job,
    JobStatus,
    MetricPoint,
)
from service.store.records import hash_api_key, new_dataset_id
from service.store.repo import Store
from service.store.schema import alembic_config, migrate, schema_is_current

__all__ = [
    "STORE_UNREACHABLE",
    "ACTIVE_STATUSES",
    "CREDENTIAL_KINDS",
    "TERMINAL_STATUSES",
    "ApiKey",
    "Artifact",
    "Base",
    "Credential",
    "CredentialInfo",
    "Dataset",
    "Heartbeat",
    "Job",
    "JobPage",
    "JobStatus",
    "MetricPoint",
    "OwnerCredential",
    "Spend",
    "Store",
    "alembic_config",
    "decode_cursor",
    "encode_cursor",
    "hash_api_key",
    "make_engine",
    "migrate",
    "new_dataset_id",
    "new_id",
    "normalize_url",
    "schema_is_current",
    "utcnow",
]
