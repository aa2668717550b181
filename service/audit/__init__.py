"""Hash-chained audit log with signed checkpoints, search and IHE BALP AuditEvent export."""

from service.audit.balp import export_ndjson, to_audit_event
from service.audit.chain import GENESIS_HASH, canonical_json, record_hash
from service.audit.checkpoints import (
    CheckpointSink,
    FileCheckpointSink,
    JsonlCheckpointSink,
    SignedCheckpoint,
    sign_checkpoint,
)
from service.audit.log import (
    AuditAction,
    AuditAppend,
    AuditEntity,
    AuditEntry,
    AuditError,
    AuditLog,
    AuditOutcome,
    AuditRecordRef,
    CareCanvasObject,
    EntityRole,
    canonical_actor,
    carecanvas_ref,
)
from service.audit.verify import VerifyResult, verify_chain

__all__ = [
    "GENESIS_HASH",
    "AuditAction",
    "AuditAppend",
    "AuditEntity",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditOutcome",
    "AuditRecordRef",
    "CareCanvasObject",
    "CheckpointSink",
    "EntityRole",
    "FileCheckpointSink",
    "JsonlCheckpointSink",
    "SignedCheckpoint",
    "VerifyResult",
    "canonical_actor",
    "canonical_json",
    "carecanvas_ref",
    "export_ndjson",
    "record_hash",
    "sign_checkpoint",
    "to_audit_event",
    "verify_chain",
]
