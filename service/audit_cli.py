"""`carecanvas audit verify|keygen|public-key`: check the chain and its checkpoints; make the signing key.

`audit verify` needs no keyring and no private key: the database (read only), the checkpoint file and the
public key. Exit status: 0 the chain is intact and anchored by at least one valid signed checkpoint (records
appended since the last checkpoint are stated, not an error); 1 BROKEN (a bad record, a checkpoint that
contradicts the chain, or any malformed or wrongly signed checkpoint line); 2 the chain is intact but no valid
checkpoint anchors any of it (so a deleted tail would go unnoticed), or verify could not run at all.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from service.audit.checkpoints import CheckpointError, FileCheckpointSink
from service.audit.signing_key import (
    SigningKeyError,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    public_key_pem,
)
from service.audit.verify import VerifyResult, verify_chain
from service.db.engine import make_engine, make_read_sessionmaker, normalise_url
from service.settings import Settings
from service.stores import audit_signing_key_problem, checkpoint_sink

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_UNANCHORED = 2
EXIT_UNAVAILABLE = 2


class VerifySetupError(Exception):
    """Verify cannot run (no database, no readable key); the message is for the operator."""


def add_audit_key_parsers(audit: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`verify` options and the `keygen` / `public-key` commands, wired in by service.cli."""
    keygen = audit.add_parser(
        "keygen", help="create the Ed25519 checkpoint signing key (CARECANVAS_AUDIT_SIGNING_KEY_FILE)"
    )
    keygen.add_argument("--public-out", type=Path, help="also write the public key (PEM) to this file")
    keygen.set_defaults(func=cmd_keygen)
    public = audit.add_parser("public-key", help="print the checkpoint verification key (PEM) for auditors")
    public.set_defaults(func=cmd_public_key)


def add_verify_arguments(verify: argparse.ArgumentParser) -> None:
    verify.add_argument(
        "--public-key",
        type=Path,
        help="PEM public key to check checkpoint signatures with (default: CARECANVAS_AUDIT_VERIFY_KEY_FILE, "
        "else the public half of CARECANVAS_AUDIT_SIGNING_KEY_FILE)",
    )
    verify.add_argument(
        "--checkpoints", type=Path, help="checkpoint file (default: CARECANVAS_AUDIT_CHECKPOINT_PATH)"
    )
    verify.epilog = (
        "exit status: 0 intact and anchored; 1 BROKEN; 2 intact but not anchored by any checkpoint, "
        "or verify could not run"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    settings = Settings()
    try:
        result = asyncio.run(
            verify_installation(settings, public_key=args.public_key, checkpoints=args.checkpoints)
        )
    except VerifySetupError as error:
        print(f"audit verify: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return report(result)


async def verify_installation(
    settings: Settings, *, public_key: Path | None = None, checkpoints: Path | None = None
) -> VerifyResult:
    """Verify the configured database against the checkpoint file, opening nothing for writing."""
    verify_key = _verify_key(settings, public_key)
    sink = FileCheckpointSink(checkpoints or settings.resolved_checkpoint_path)
    engine = make_engine(_existing_database_url(settings))
    try:
        async with make_read_sessionmaker(engine)() as session:
            return await verify_chain(session, await sink.read(), verify_key)
    except SQLAlchemyError as error:
        raise VerifySetupError(
            f"cannot read the audit records ({type(error).__name__}: is the database migrated and reachable?)"
        ) from None
    finally:
        await engine.dispose()


def _existing_database_url(settings: Settings) -> str:
    url = normalise_url(settings.resolved_database_url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists():
        # Connecting would create an empty database file; say what is missing instead.
        raise VerifySetupError(f"no database at {parsed.database}")
    return url


def _verify_key(settings: Settings, public_key: Path | None) -> Ed25519PublicKey | None:
    path = public_key or settings.audit_verify_key_file
    if path is None and settings.resolved_audit_signing_key_file.exists():
        path = settings.resolved_audit_signing_key_file
    if path is None:
        return None  # reported by verify when there are checkpoints to check
    try:
        return load_verify_key(path)
    except SigningKeyError as error:
        raise VerifySetupError(str(error)) from None


def report(result: VerifyResult) -> int:
    """Print the verdict, every checkpoint problem with its line, and how far checkpoints anchor the chain."""
    statement = result.anchor_statement()
    if result.ok and result.anchored_seq == 0 and result.count > 0:
        print(f"audit chain NOT ANCHORED: {statement}", file=sys.stderr)
        print(f"checkpoints: none valid in {result.checkpoint_source}", file=sys.stderr)
        return EXIT_UNANCHORED
    if result.ok:
        print(f"audit chain OK: {statement}")
        print(f"checkpoints: {result.checkpoints_checked} valid in {result.checkpoint_source}")
        return EXIT_OK
    if not result.chain_intact:
        print(f"audit chain BROKEN at record {result.first_bad_seq}: {result.reason}", file=sys.stderr)
    else:
        count = len(result.problems)
        print(
            f"audit chain BROKEN: {count} bad checkpoint{'s' if count != 1 else ''} in "
            f"{result.checkpoint_source}",
            file=sys.stderr,
        )
    for problem in result.problems:
        where = "" if problem.line is None else f" line {problem.line}:"
        print(f"checkpoint BROKEN{where} {problem.reason}", file=sys.stderr)
    print(f"anchoring: {statement}", file=sys.stderr)
    return EXIT_BROKEN


def refuse_without_audit_key(settings: Settings) -> int | None:
    """Where opening the audit log would fail (`serve`, `worker`, commands that append): rc 2 and why."""
    problem = audit_signing_key_problem(settings)
    if problem is None and settings.resolved_audit_signing_key_file.exists():
        try:
            load_signing_key(settings.resolved_audit_signing_key_file)
        except SigningKeyError as error:
            problem = str(error)
    if problem is None:
        try:
            checkpoint_sink(settings)
        except CheckpointError as error:
            problem = str(error)
    if problem is None:
        return None
    print(f"carecanvas: {problem}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Settings().resolved_audit_signing_key_file
    try:
        key = generate_signing_key(path)
    except (SigningKeyError, OSError) as error:
        print(f"audit keygen: {error}", file=sys.stderr)
        return EXIT_BROKEN
    pem = public_key_pem(key)
    if args.public_out is not None:
        try:
            args.public_out.write_text(pem)
        except OSError as error:
            print(f"audit keygen: cannot write {args.public_out}: {error.strerror}", file=sys.stderr)
            return EXIT_BROKEN
    print(f"wrote a new audit signing key to {path}; give auditors this public key:", file=sys.stderr)
    sys.stdout.write(pem)
    return EXIT_OK


def cmd_public_key(args: argparse.Namespace) -> int:
    path = Settings().resolved_audit_signing_key_file
    try:
        sys.stdout.write(public_key_pem(load_signing_key(path)))
    except SigningKeyError as error:
        print(f"audit public-key: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK
