"""The audit vocabulary on SQLite and PostgreSQL: canonical actors, sealed entities, descriptions, our ids."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.audit import AuditAction, AuditEntity, AuditLog, CareCanvasObject, EntityRole, carecanvas_ref
from service.crypto import Keyring
from service.crypto.keyring import new_key_material
from service.db.models import AuditRecord

JOB = carecanvas_ref(CareCanvasObject.JOB, "0b6f3c1e-6a47-4f59-9d1e-7b1a0c2d3e4f")


async def test_actor_is_canonical_and_entities_are_sealed(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    audit = AuditLog(Keyring(new_key_material()))
    async with sessionmaker() as db, db.begin():
        # The same practitioner, spelled as the launch's fhirUser URL and as a relative reference.
        await audit.append(
            db,
            action=AuditAction.LAUNCH,
            outcome="success",
            actor="http://127.0.0.1:8080/fhir/Practitioner/prac-2",
            patient="pat-1",
            ehr="sandbox",
            resource=None,
            request_id="r-1",
        )
        await audit.append(
            db,
            action=AuditAction.GENERATE,
            outcome="success",
            actor="/Practitioner/prac-2",
            patient="pat-1",
            ehr="sandbox",
            resource=None,
            request_id="r-2",
            entities=[AuditEntity(JOB), AuditEntity("Condition/cond-1", EntityRole.SOURCE)],
            role="clinician",
        )
    async with sessionmaker() as db:
        entries = await audit.entries(db)
        found = await audit.search(db, actor="https://other.example/fhir/Practitioner/prac-2")
        rows = (await db.execute(select(AuditRecord.resource_type).order_by(AuditRecord.seq))).scalars().all()
    assert [entry.actor for entry in entries] == ["Practitioner/prac-2", "Practitioner/prac-2"]
    assert len(found) == 2  # a search by any spelling finds both
    launch, generate = entries
    assert launch.description == "Practitioner/prac-2 launched CareCanvas"
    assert generate.entities == (AuditEntity(JOB), AuditEntity("Condition/cond-1", EntityRole.SOURCE))
    assert generate.resource == JOB  # the first entity is the record's resource
    assert generate.description == f"Practitioner/prac-2 asked for a picture {JOB} from Condition/cond-1"
    assert generate.role == "clinician"
    # Our job is searchable by kind; its id stays sealed; it is never typed as an EHR resource.
    assert rows == [None, "carecanvas:job"]
