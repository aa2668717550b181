"""`carecanvas keys …`: generate, list, add, promote, reencrypt, retire, rotate; every change is audited.

Safety rules (issue 9, "Keys that cannot lose data"): a key is retired only when the database holds nothing
it wraps and every process has had time to stop encrypting with it; re-encryption is resumable and safe
while the API and workers run (service.crypto.rotation); refused and failed operations are audited too.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import AuditAction, AuditLog
from service.audit.log import AuditOutcome
from service.crypto import Keyring, KeyringError, LocalKeyFileProvider, ManagedKeyProvider
from service.crypto.keyring import PROPAGATION_SECONDS, KeyMaterial, KeyUsage, check_retirable
from service.crypto.rotation import (
    DEFAULT_BATCH_SIZE,
    ReencryptProgress,
    ReencryptReport,
    encrypted_columns,
    key_usage,
    not_on_primary,
    reencrypt,
)
from service.settings import Settings
from service.stores import existing_data, key_provider, missing_keys_problem, open_database

EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 2
EXIT_INTERRUPTED = 130


class KeyCommandError(Exception):
    """A key command cannot go on; the message is for the operator (no key material, no patient data)."""

    def __init__(self, message: str, *, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def refuse_without_keys(settings: Settings, *, may_create: bool) -> int | None:
    """For `serve`, `worker` and the audit commands: a clear message and rc 2 instead of a start without keys.

    ``may_create=False`` (read-only commands) also guarantees nothing is created: this runs before anything
    opens the database or the data directory.
    """
    try:
        problem = missing_keys_problem(settings, may_create=may_create)
        provider = key_provider(settings)
        about_to_create = isinstance(provider, LocalKeyFileProvider) and not provider.path.exists()
        if problem is None and not about_to_create:
            provider.load()  # a missing Secret, a malformed or unsafe key file: reported here, no traceback
    except KeyringError as error:
        problem = str(error)
    if problem is None:
        return None
    print(f"carecanvas: {problem}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def run(args: argparse.Namespace) -> int:
    """Entry point from service.cli for every `keys` subcommand."""
    from service.logging import configure_logging

    settings = Settings()
    configure_logging("WARNING")  # warnings as JSON on stderr; stdout keeps the command's own output
    try:
        if args.keys_command == "list":
            return _list(settings)
        if args.keys_command == "generate":
            return asyncio.run(_generate(settings))
        return asyncio.run(_managed_command(settings, args))
    except KeyCommandError as error:
        print(f"carecanvas keys {args.keys_command}: {error}", file=sys.stderr)
        return error.code
    except KeyringError as error:
        print(f"carecanvas keys {args.keys_command}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        # Every committed batch stays re-wrapped; a new run selects only what is not on the primary yet.
        print(f"carecanvas keys {args.keys_command}: interrupted; run it again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _list(settings: Settings) -> int:
    """Read-only: prints the keyring's ids (never key material) and writes nothing."""
    problem = missing_keys_problem(settings, may_create=False)
    if problem is not None:
        raise KeyCommandError(problem, code=EXIT_UNAVAILABLE)
    provider = key_provider(settings)
    material = provider.load()
    summary = {
        "source": provider.description,
        "primary": material.primary_kek_id,
        "promoted_at": None if material.promoted_at is None else material.promoted_at.isoformat(),
        "keys": sorted(material.keks),
        "retired": [dict(entry) for entry in material.retired],
    }
    print(json.dumps(summary, indent=2))
    return 0


@dataclass
class _Stores:
    """What a key command needs: the database, a keyring that follows the key file, the audit log."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    keyring: Keyring
    audit: AuditLog

    async def record(self, action: AuditAction, outcome: AuditOutcome, detail: Mapping[str, Any]) -> None:
        self.keyring.refresh()  # audit records are wrapped by the primary as it is after the operation
        async with self.sessionmaker() as db:
            await self.audit.append(
                db,
                action=action,
                outcome=outcome,
                actor=_operator(),
                patient=None,
                ehr=None,
                resource=None,
                request_id=None,
                detail=dict(detail),
            )
            await db.commit()


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return "cli"


async def _open_stores(settings: Settings) -> _Stores:
    problem = missing_keys_problem(settings, may_create=False)
    if problem is not None:
        raise KeyCommandError(problem, code=EXIT_UNAVAILABLE)
    keyring = Keyring.from_provider(key_provider(settings))
    try:
        engine, sessionmaker = await open_database(settings)
    except (SQLAlchemyError, OSError) as error:
        raise KeyCommandError(_database_problem(error), code=EXIT_UNAVAILABLE) from None
    # Key commands only append; checkpoints (and their signing key) stay with the running service.
    return _Stores(engine, sessionmaker, keyring, AuditLog(keyring))


INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL SQLSTATE


def _database_problem(error: Exception) -> str:
    # The driver's text may quote SQL parameters (ciphertexts); the class name and a hint are enough.
    if getattr(getattr(error, "orig", None), "sqlstate", None) == INSUFFICIENT_PRIVILEGE:
        return (
            "the database role may not do this: re-wrapping audit records is an UPDATE only the owner role "
            "may make. Set CARECANVAS_DATABASE_URL to the owner role's URL and run it again (what was "
            "committed stays done)"
        )
    return (
        f"cannot use the database ({type(error).__name__}); check CARECANVAS_DATABASE_URL and that "
        "`carecanvas migrate` has run"
    )


async def _managed_command(settings: Settings, args: argparse.Namespace) -> int:
    stores = await _open_stores(settings)
    try:
        command = args.keys_command
        if command == "add":
            return await _add(stores)
        if command == "promote":
            return await _promote(stores, args.kid)
        if command == "reencrypt":
            return await _reencrypt(stores, batch_size=args.batch_size)
        if command == "retire":
            return await _retire(stores, args.kid)
        if command == "rotate":
            return await _rotate(stores, batch_size=args.batch_size)
        raise KeyCommandError(f"unknown keys command {command!r}")
    except SQLAlchemyError as error:
        raise KeyCommandError(_database_problem(error), code=EXIT_UNAVAILABLE) from None
    finally:
        await stores.engine.dispose()


def _managed(stores: _Stores) -> ManagedKeyProvider:
    provider = stores.keyring.provider
    if not isinstance(provider, ManagedKeyProvider):
        raise KeyringError("this key source cannot be changed by the key commands")
    return provider


async def _denied(stores: _Stores, action: AuditAction, error: Exception, detail: Mapping[str, Any]) -> None:
    await stores.record(action, AuditOutcome.DENIED, {**detail, "reason": str(error)})


async def _add(stores: _Stores) -> int:
    try:
        kid = _managed(stores).add_key()
    except KeyringError as error:
        await _denied(stores, AuditAction.KEY_ADD, error, {})
        raise
    await stores.record(AuditAction.KEY_ADD, AuditOutcome.SUCCESS, {"kid": kid})
    print(kid)
    return 0


async def _promote(stores: _Stores, kid: str) -> int:
    previous = stores.keyring.material.primary_kek_id
    try:
        _managed(stores).promote(kid)
    except KeyringError as error:
        await _denied(stores, AuditAction.KEY_PROMOTE, error, {"kid": kid})
        raise
    await stores.record(
        AuditAction.KEY_PROMOTE, AuditOutcome.SUCCESS, {"kid": kid, "previous_primary": previous}
    )
    print(
        f"{kid} is the primary key; next: `carecanvas keys reencrypt`, "
        f"then `carecanvas keys retire {previous}`"
    )
    return 0


def _settle_seconds(material: KeyMaterial) -> float:
    """How much longer processes may still encrypt under the previous primary."""
    since = material.seconds_since_promotion()
    return 0.0 if since is None else max(0.0, PROPAGATION_SECONDS - since)


def _print_progress(progress: ReencryptProgress) -> None:
    print(f"pass {progress.pass_number}: {progress.kind}: {progress.done}/{progress.total}", flush=True)


def _report_detail(report: ReencryptReport) -> dict[str, Any]:
    return {
        "kid": report.primary,
        "rewrapped": report.rewrapped,
        "remaining": report.remaining,
        "undecryptable": report.undecryptable,
        "lost_races": report.lost_races,
        "passes": report.passes,
    }


async def _run_reencrypt(stores: _Stores, *, batch_size: int, settle_seconds: float) -> ReencryptReport:
    stores.keyring.refresh()
    primary = stores.keyring.primary_kek_id
    total = await _count_all(stores)
    todo = sum((await not_on_primary(stores.sessionmaker, primary)).values())
    print(f"{todo} of {total} stored ciphertexts to re-wrap onto {primary}", flush=True)
    if settle_seconds > 0:
        print(f"a final pass follows in {settle_seconds:.0f}s, once every process uses {primary}", flush=True)
    try:
        report = await reencrypt(
            stores.sessionmaker,
            stores.keyring,
            batch_size=batch_size,
            settle_seconds=settle_seconds,
            progress=_print_progress,
        )
    except KeyringError as error:
        await stores.record(
            AuditAction.KEY_REENCRYPT, AuditOutcome.FAILURE, {"kid": primary, "reason": str(error)}
        )
        raise
    except SQLAlchemyError as error:
        reason = _database_problem(error)
        await stores.record(
            AuditAction.KEY_REENCRYPT, AuditOutcome.FAILURE, {"kid": primary, "reason": reason}
        )
        raise KeyCommandError(reason, code=EXIT_UNAVAILABLE) from None
    outcome = AuditOutcome.SUCCESS if report.complete else AuditOutcome.FAILURE
    await stores.record(AuditAction.KEY_REENCRYPT, outcome, _report_detail(report))
    print(f"re-wrapped {report.total_rewrapped} ciphertexts onto {primary} in {report.passes} passes")
    if not report.complete:
        left = ", ".join(f"{count} {kind}" for kind, count in report.remaining.items() if count)
        print(
            f"not on {primary} yet: {left} (undecryptable: {sum(report.undecryptable.values())}); "
            "run `carecanvas keys reencrypt` again",
            file=sys.stderr,
        )
    return report


async def _count_all(stores: _Stores) -> int:
    total = 0
    async with stores.sessionmaker() as session:
        for column in encrypted_columns():
            total += int((await session.execute(select(func.count()).select_from(column.model))).scalar_one())
    return total


async def _reencrypt(stores: _Stores, *, batch_size: int) -> int:
    settle = _settle_seconds(stores.keyring.material)
    report = await _run_reencrypt(stores, batch_size=batch_size, settle_seconds=settle)
    return 0 if report.complete else EXIT_REFUSED


async def _retire(stores: _Stores, kid: str) -> int:
    try:
        provider = _managed(stores)
        material = provider.load()
        check_retirable(material, kid, KeyUsage(kid=kid, counts={}))  # primary or unknown: no need to count
    except KeyringError as error:
        await _denied(stores, AuditAction.KEY_RETIRE, error, {"kid": kid})
        raise
    usage = await key_usage(stores.sessionmaker, kid)
    settle = _settle_seconds(material)
    if usage.total == 0 and settle > 0:
        # Count again once no process can still be encrypting with it (it was primary a moment ago).
        print(f"waiting {settle:.0f}s until no process still encrypts with {kid}", flush=True)
        await asyncio.sleep(settle)
        usage = await key_usage(stores.sessionmaker, kid)
    try:
        provider.retire(kid, usage=usage)
    except KeyringError as error:
        await _denied(
            stores, AuditAction.KEY_RETIRE, error, {"kid": kid, "still_wrapped": dict(usage.counts)}
        )
        raise
    await stores.record(AuditAction.KEY_RETIRE, AuditOutcome.SUCCESS, {"kid": kid})
    print(f"retired {kid}: nothing stored was wrapped by it")
    return 0


async def _rotate(stores: _Stores, *, batch_size: int) -> int:
    """Add, promote, re-wrap everything, retire the previous primary; each step is its own audit record."""
    previous = stores.keyring.material.primary_kek_id
    detail: dict[str, Any] = {"previous_primary": previous}
    try:
        await _add_and_promote(stores, detail)
        report = await _run_reencrypt(stores, batch_size=batch_size, settle_seconds=PROPAGATION_SECONDS)
        detail["rewrapped"] = report.total_rewrapped
        if not report.complete:
            raise KeyCommandError(f"some ciphertexts are not re-wrapped yet; {previous} is kept")
        await _retire(stores, previous)
    except (KeyCommandError, KeyringError) as error:
        await stores.record(AuditAction.KEY_ROTATE, AuditOutcome.FAILURE, {**detail, "reason": str(error)})
        raise
    await stores.record(AuditAction.KEY_ROTATE, AuditOutcome.SUCCESS, detail)
    print(f"rotated: {detail['kid']} is the primary key, {previous} is retired")
    return 0


async def _add_and_promote(stores: _Stores, detail: dict[str, Any]) -> None:
    provider = _managed(stores)
    previous = detail["previous_primary"]
    try:
        kid = provider.add_key()
    except KeyringError as error:
        await _denied(stores, AuditAction.KEY_ADD, error, {})
        raise
    detail["kid"] = kid
    await stores.record(AuditAction.KEY_ADD, AuditOutcome.SUCCESS, {"kid": kid})
    provider.promote(kid)
    await stores.record(
        AuditAction.KEY_PROMOTE, AuditOutcome.SUCCESS, {"kid": kid, "previous_primary": previous}
    )


async def _generate(settings: Settings) -> int:
    """New keys for a new installation; refuses to overwrite keys or to orphan data that exists already."""
    provider = key_provider(settings)
    if not isinstance(provider, LocalKeyFileProvider):
        raise KeyCommandError(
            f"the keys come from the {provider.description}; generate them on a trusted machine with "
            "CARECANVAS_KEK_FILE and put the file in the Secret"
        )
    if provider.path.exists():
        raise KeyCommandError(f"{provider.path} exists; refusing to overwrite keys")
    # An explicit key file and no database: a keyring made for another installation (docs/deploying.md).
    offline = settings.kek_file is not None and settings.database_url is None
    if not offline:
        await _refuse_if_data_exists(settings)
    provider.path.parent.mkdir(parents=True, exist_ok=True)
    LocalKeyFileProvider.generate(provider.path)
    kid = provider.load().primary_kek_id
    print(f"wrote a new keyring to {provider.path} (primary {kid})")
    if offline:
        print("no database configured (CARECANVAS_DATABASE_URL), so no audit record was written here")
        return 0
    stores = await _open_stores(settings)
    try:
        await stores.record(AuditAction.KEY_GENERATE, AuditOutcome.SUCCESS, {"kid": kid})
    except SQLAlchemyError as error:
        raise KeyCommandError(_database_problem(error), code=EXIT_UNAVAILABLE) from None
    finally:
        await stores.engine.dispose()
    return 0


async def _refuse_if_data_exists(settings: Settings) -> None:
    if settings.database_url is None:
        holder = existing_data(settings)
    else:
        holder = await _external_data(settings)
    if holder is not None:
        raise KeyCommandError(
            f"{holder} already holds encrypted data that new keys could not read; restore the key file "
            "from your backup instead"
        )


async def _external_data(settings: Settings) -> str | None:
    try:
        engine, sessionmaker = await open_database(settings)
    except (SQLAlchemyError, OSError) as error:
        raise KeyCommandError(_database_problem(error), code=EXIT_UNAVAILABLE) from None
    try:
        async with sessionmaker() as session:
            for column in encrypted_columns():
                query = select(column.key).select_from(column.model).limit(1)
                if (await session.execute(query)).first() is not None:
                    return "the configured database"
    except SQLAlchemyError as error:
        raise KeyCommandError(_database_problem(error), code=EXIT_UNAVAILABLE) from None
    finally:
        await engine.dispose()
    return None


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def add_keys_parser(commands: Any) -> None:
    """The `keys` subcommands (wired into service.cli's parser)."""
    keys = commands.add_parser("keys", help="key-encryption keys").add_subparsers(
        dest="keys_command", required=True
    )
    keys.add_parser("generate", help="new keys for a new installation").set_defaults(func=run)
    keys.add_parser("list", help="key ids and the primary (read-only)").set_defaults(func=run)
    keys.add_parser("add", help="add a key (not yet primary)").set_defaults(func=run)
    promote = keys.add_parser("promote", help="make a key the primary")
    promote.add_argument("kid")
    promote.set_defaults(func=run)
    retire = keys.add_parser("retire", help="delete a key nothing stored is wrapped by any more")
    retire.add_argument("kid")
    retire.set_defaults(func=run)
    for name, text in (
        ("reencrypt", "re-wrap every stored ciphertext onto the primary (resumable, safe while running)"),
        ("rotate", "add + promote + reencrypt + retire the previous primary"),
    ):
        sub = keys.add_parser(name, help=text)
        sub.add_argument(
            "--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="rows per transaction"
        )
        sub.set_defaults(func=run)
