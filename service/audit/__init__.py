"""Hash-chained audit log with signed checkpoints, search and IHE BALP AuditEvent export."""

from service.audit.balp import export_ndjson, to_audit_event
from service.audit.chain import GENESIS_HASH, canonical_json, record_hash
from service.audit.log import (
    AuditAction,
    AuditEntry,
    AuditError,
    AuditLog,
    AuditOutcome,
    AuditRecordRef,
    CheckpointSink,
    FileCheckpointSink,
    JsonlCheckpointSink,
    SignedCheckpoint,
    VerifyResult,
)

__all__ = [
    "GENESIS_HASH",
    "AuditAction",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditOutcome",
    "AuditRecordRef",
    "CheckpointSink",
    "FileCheckpointSink",
    "JsonlCheckpointSink",
    "SignedCheckpoint",
    "VerifyResult",
    "canonical_json",
    "export_ndjson",
    "record_hash",
    "to_audit_event",
]
