"""The `carecanvas` command: demo, serve, worker, migrate, audit, keys, models."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from service.db.migrate_command import add_migrate_parser
from service.settings import EhrSettings, Settings, StaffOidcSettings

DEMO_CLIENT_ID = "carecanvas-demo"
DEMO_FHIR_STATE_FILE = "sandbox-fhir.json"


def _settings() -> Settings:
    return Settings()


def _free_port(preferred: int) -> int:
    """The preferred port when it is free (0 means any), else any free loopback port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve(settings: Settings, *, host: str, port: int) -> None:
    import uvicorn

    from service.app import create_app
    from service.logging import configure_logging

    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_config=None)


def _refuse_without_keys(settings: Settings, *, may_create: bool) -> int | None:
    from service.audit_cli import refuse_without_audit_key
    from service.keys_cli import refuse_without_keys

    refused = refuse_without_keys(settings, may_create=may_create)
    return refused if refused is not None else refuse_without_audit_key(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    if (refused := _refuse_without_keys(settings, may_create=True)) is not None:
        return refused
    _serve(settings, host=args.host, port=args.port)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.logging import configure_logging
    from service.runtime import make_worker
    from service.services import build_services

    settings = _settings()
    if (refused := _refuse_without_keys(settings, may_create=True)) is not None:
        return refused
    configure_logging(settings.log_level)
    from prometheus_client import start_http_server

    # Probes and Prometheus: the exporter answers every path (incl. /healthz) while the process is alive.
    start_http_server(settings.worker_metrics_port, addr=args.metrics_host)

    async def run() -> None:
        services = await build_services(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await make_worker(services).run(stop)
        finally:
            await services.aclose()

    asyncio.run(run())
    return 0


# The demo's portrait reviewers (with_demo_reviewers): a sandbox practitioner and a sandbox staff user.
DEMO_PRACTITIONER_REVIEWER = "Practitioner/prac-3"  # Sofia Lopez
DEMO_STAFF_REVIEWER = "Rosa Alvarez-Test"  # sandbox staff, group portrait-artists


def demo_settings(
    *, data_dir: Path, fhir_base: str, auth_base: str, ehr_origin: str, port: int, ehr_url: str | None = None
) -> Settings:
    """Embedded defaults: SQLite and a key file under the data dir, the tiny model, the sandbox EHR."""
    from service.ehrs import origin_of

    return Settings(
        data_dir=data_dir,
        public_url=f"http://127.0.0.1:{port}",
        ehrs=[
            EhrSettings(
                name="sandbox",
                iss=fhir_base,
                client_id=DEMO_CLIENT_ID,
                client_auth="public",
                frame_origins=(ehr_origin,),
                auth_origins=(origin_of(auth_base),),
                organization_id="org-1",
            )
        ],
        # The sandbox's staff identity provider, so the demo's compliance console can be signed in to.
        staff_oidc=StaffOidcSettings(issuer=f"{auth_base}/staff", client_id="carecanvas-staff"),
        embedded_worker=True,
        demo_ehr_url=ehr_url,
    )


def with_demo_reviewers(settings: Settings) -> Settings:
    """The demo's portrait reviewers, so a newcomer can try the reviewer's queue: the sandbox practitioner
    Sofia Lopez (by her EHR launch) and the sandbox staff user in `portrait-artists`, Rosa Alvarez-Test (by
    staff sign-in at /reviewer), both artists. With reviewers set, a portrait goes to the chart only after
    one of them approved it (education pictures are never held)."""
    from sandbox.staff_oidc import PORTRAIT_ARTIST_GROUP

    staff = settings.staff_oidc
    return settings.model_copy(
        update={
            "portrait_reviewers": {**settings.portrait_reviewers, DEMO_PRACTITIONER_REVIEWER: "artist"},
            "staff_oidc": (
                staff.model_copy(
                    update={"reviewer_roles": {**staff.reviewer_roles, PORTRAIT_ARTIST_GROUP: "artist"}}
                )
                if staff is not None
                else None
            ),
        }
    )


def _announce_when_ready(ready_url: str, announcement: str, *, timeout: float = 600.0) -> None:
    """Print ``announcement`` once ``ready_url`` answers 200 (polled every 0.2 s)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(ready_url, timeout=2.0).status_code == 200:
                print(announcement, flush=True)
                return
        time.sleep(0.2)
    print(f"CareCanvas did not become ready within {timeout:.0f} s; see the log above.", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from sandbox.auth.config import ClientRegistration
    from sandbox.run import SandboxEHR
    from service.demo_ehr import (
        DEMO_BACKEND_CLIENT_ID,
        DEMO_BACKEND_SCOPES,
        with_demo_backend,
        write_demo_ehrs,
    )
    from service.ehrs import origin_of

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = _settings()
    port = _free_port(args.port)
    app_url = f"http://127.0.0.1:{port}"
    # The sandbox's FHIR data lives in the data dir next to CareCanvas's database, so a restart keeps both
    # (never documents in CareCanvas that point at an EHR which forgot them). Synthetic data only.
    base.data_dir.mkdir(parents=True, exist_ok=True)
    with SandboxEHR(
        app_launch_url=f"{app_url}/launch",
        redirect_uris=[f"{app_url}/callback"],
        fhir_state_file=base.data_dir / DEMO_FHIR_STATE_FILE,
    ) as sandbox:
        settings = demo_settings(
            data_dir=base.data_dir,
            fhir_base=sandbox.fhir_base,
            auth_base=sandbox.auth_base,
            ehr_origin=origin_of(sandbox.ehr_url),
            port=port,
            ehr_url=sandbox.ehr_url,
        )
        # A backend client for `carecanvas audit push --ehr sandbox`, and the registration in the data dir
        # so that command (another process) finds this EHR.
        settings, backend_jwks = with_demo_backend(with_demo_reviewers(settings))
        sandbox.register_client(
            ClientRegistration(
                DEMO_BACKEND_CLIENT_ID,
                client_type="confidential-asymmetric",
                jwks=backend_jwks,
                scopes=list(DEMO_BACKEND_SCOPES),
            )
        )
        write_demo_ehrs(settings)
        announcement = (
            f"\nCareCanvas demo is running.\n"
            f"  Sandbox EHR:  {sandbox.ehr_url}   <- open this, pick a patient, press Launch\n"
            f"  CareCanvas:   {app_url}\n"
            f"  Compliance:   {app_url}/compliance   <- staff sign-in at the sandbox identity provider\n"
            f"  Reviewer:     {app_url}/reviewer   <- portrait reviews: sign in as {DEMO_STAFF_REVIEWER}"
            " (or launch as Sofia Lopez)\n"
            f"  FHIR server:  {sandbox.fhir_base}\n"
            f"  Data dir:     {settings.data_dir.resolve()}\n"
            f"The test model has random weights: its pictures are noise. Ctrl-C stops everything.\n"
        )
        # The URLs are printed only once CareCanvas answers /readyz: a newcomer who clicks at once must not
        # get "refused to connect" inside the EHR's frame.
        print(
            "Starting CareCanvas (the sandbox EHR is up; the app and its test model are loading)...",
            flush=True,
        )
        threading.Thread(
            target=_announce_when_ready, args=(f"{app_url}/readyz", announcement), daemon=True
        ).start()
        with contextlib.suppress(KeyboardInterrupt):
            _serve(settings, host="127.0.0.1", port=port)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    # Needs neither the keyring nor the private key, and writes nothing (see service.audit_cli).
    from service.audit_cli import cmd_verify

    return cmd_verify(args)


def cmd_audit_export(args: argparse.Namespace) -> int:
    from service.audit_export import cmd_audit_export as export
    from service.demo_ehr import with_demo_ehrs

    # Read-only commands never create keys (or anything else) when the key file is missing.
    if (refused := _refuse_without_keys(_settings(), may_create=False)) is not None:
        return refused
    return export(args, with_demo_ehrs(_settings()))


def cmd_audit_push(args: argparse.Namespace) -> int:
    from service.audit_push import AuditPushError, push_audit_events
    from service.services import build_services

    # Read-only commands never create keys (or anything else) when the key file is missing.
    if (refused := _refuse_without_keys(_settings(), may_create=False)) is not None:
        return refused

    from service.demo_ehr import with_demo_ehrs

    async def run() -> int:
        # The demo's sandbox EHR lives in the demo's process; its registration file tells us about it.
        services = await build_services(with_demo_ehrs(_settings()))
        try:
            result = await push_audit_events(services, ehr_name=args.ehr, limit=args.limit)
        except AuditPushError as error:
            print(f"audit push failed: {error}", file=sys.stderr)
            return 1
        finally:
            await services.aclose()
        print(
            f"pushed {result.pushed} AuditEvents to EHR {args.ehr!r}; cursor at record {result.through_seq}"
        )
        return 0

    return asyncio.run(run())


def cmd_sessions_sweep(args: argparse.Namespace) -> int:
    """Delete expired sessions and spent launch states now (`carecanvas serve` also sweeps by itself)."""
    from service.sessions import sweep_expired
    from service.stores import open_database

    async def run() -> int:
        engine, sessionmaker = await open_database(_settings())
        try:
            async with sessionmaker() as db:
                swept = await sweep_expired(db)
        finally:
            await engine.dispose()
        print(f"deleted {swept.sessions} expired sessions and {swept.launch_states} spent launch states")
        return 0

    return asyncio.run(run())


def cmd_models(args: argparse.Namespace) -> int:
    from service.generation.models import ModelRegistry, check_model
    from service.generation.tiny import build_tiny_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.models_command == "build-tiny":
        try:
            path = build_tiny_pipeline(Path(args.path), seed=args.seed)
        except FileExistsError as error:
            print(error, file=sys.stderr)
            return 1
        print(f"tiny offline pipeline written to {path}")
        return 0
    settings = _settings()
    try:
        registry = ModelRegistry.from_dicts(settings.model_entries())
    except (OSError, ValueError) as error:
        # A models file that is missing, not JSON, or holds an invalid entry: say which, no traceback.
        print(f"model configuration is invalid: {error}", file=sys.stderr)
        return 2
    if args.models_command == "list":
        for spec in registry:
            default = " [default]" if spec.name == settings.default_model else ""
            marker = " (test model: random weights)" if spec.is_test_model else ""
            print(f"{spec.name}\t{spec.path}\t{spec.pipeline_class}{default}{marker}")
        if settings.default_model not in registry:
            print(f"default model {settings.default_model!r} is not configured", file=sys.stderr)
            return 1
        return 0
    status = 0
    for spec in registry:
        if spec.is_test_model and spec.name == "carecanvas-tiny-test" and not spec.path.exists():
            # Built on first start by the app and the worker; nothing to check until then.
            print(f"{spec.name}: not built yet (built on first start)")
            continue
        check = check_model(spec)
        print(f"{spec.name}: {'ok' if check.ok else 'PROBLEM'} {'; '.join(check.problems)}")
        status |= 0 if check.ok else 1
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carecanvas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="sandbox EHR + CareCanvas + tiny model, all on 127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(func=cmd_demo)
    serve = commands.add_parser("serve", help="the API and web UI")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)
    worker = commands.add_parser("worker", help="a generation worker (one per GPU)")
    worker.add_argument("--metrics-host", default="0.0.0.0")  # noqa: S104 - probes reach it from the kubelet
    worker.set_defaults(func=cmd_worker)
    add_migrate_parser(commands)
    audit = commands.add_parser("audit", help="the audit log").add_subparsers(
        dest="audit_command", required=True
    )
    from service.audit_cli import add_audit_key_parsers, add_verify_arguments

    verify = audit.add_parser("verify", help="check the hash chain and checkpoints")
    add_verify_arguments(verify)
    verify.set_defaults(func=cmd_audit_verify)
    add_audit_key_parsers(audit)
    from service.audit_export import add_export_arguments

    export = audit.add_parser("export", help="filtered records as BALP AuditEvents (NDJSON, Bundle) or CSV")
    add_export_arguments(export)
    export.set_defaults(func=cmd_audit_export)
    push = audit.add_parser("push", help="send new records to an EHR as AuditEvents (SMART Backend Services)")
    push.add_argument("--ehr", required=True, help="the registration's name")
    push.add_argument("--limit", type=int, default=1000, help="at most this many AuditEvents per run")
    push.set_defaults(func=cmd_audit_push)
    sessions = commands.add_parser("sessions", help="web sessions").add_subparsers(
        dest="sessions_command", required=True
    )
    sessions.add_parser("sweep", help="delete expired sessions and spent launch states").set_defaults(
        func=cmd_sessions_sweep
    )
    from service.keys_cli import add_keys_parser

    add_keys_parser(commands)
    from service.jobs_cli import add_jobs_parser

    add_jobs_parser(commands)
    models = commands.add_parser("models", help="diffusion models").add_subparsers(
        dest="models_command", required=True
    )
    build = models.add_parser("build-tiny", help="write the tiny offline test pipeline")
    build.add_argument("path")
    build.add_argument("--seed", type=int, default=0, help="weights seed (another seed, another model)")
    build.set_defaults(func=cmd_models)
    models.add_parser("list").set_defaults(func=cmd_models)
    models.add_parser("check").set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
