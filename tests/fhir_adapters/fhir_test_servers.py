"""Real loopback HTTP servers for the fhir_adapters tests: scripted replies, or a small FHIR server."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/fhir+json"
    delay: float = 0.0


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 whose answers come from `handle(request) -> Reply`."""

    def __init__(self) -> None:
        self.handle: Callable[[Request], Reply] = lambda request: Reply(404)
        self.requests: list[Request] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                owner.requests.append(request)
                reply = owner.handle(request)
                if reply.delay:
                    time.sleep(reply.delay)
                if isinstance(reply.body, bytes):
                    payload = reply.body
                elif reply.body is None:
                    payload = b""
                else:
                    payload = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                if payload or reply.content_type:
                    self.send_header("Content-Type", reply.content_type)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _dispatch

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


class MiniFhir:
    """Just enough of a FHIR server for the write strategy: CRUD, conditional create, two searches,
    transactions with urn:uuid resolution, and a fault switch that commits a write and then answers 503."""

    def __init__(self, *, transactions: bool) -> None:
        self.transactions = transactions
        self.store: dict[str, dict[str, dict[str, Any]]] = {}
        self.fail_after_commit: set[str] = set()  # resource types (or "transaction") to fail once
        self.reject_content_types: set[str] = set()

    def resources(self, resource_type: str) -> list[dict[str, Any]]:
        return list(self.store.get(resource_type, {}).values())

    def _matches(self, resource_type: str, query: str) -> list[dict[str, Any]]:
        params = parse_qs(query)
        found = []
        for resource in self.resources(resource_type):
            ok = True
            for key, values in params.items():
                value = values[0]
                if key == "identifier":
                    system, _, code = value.partition("|")
                    ok &= any(
                        i.get("system") == system and i.get("value") == code
                        for i in resource.get("identifier", [])
                    )
                elif key == "target":
                    ok &= any(t.get("reference") == value for t in resource.get("target", []))
                else:
                    ok = False
            if ok:
                found.append(resource)
        return found

    def _create(self, resource: dict[str, Any], if_none_exist: str | None) -> tuple[int, dict[str, Any]]:
        resource_type = resource["resourceType"]
        if if_none_exist:
            existing = self._matches(resource_type, if_none_exist)
            if len(existing) > 1:
                return 412, outcome("multiple matches")
            if existing:
                return 200, existing[0]
        for item in resource.get("content", []):
            if item.get("attachment", {}).get("contentType") in self.reject_content_types:
                return 422, outcome("content type not accepted")
        stored = {
            **resource,
            "id": uuid.uuid4().hex[:12],
            "meta": {**resource.get("meta", {}), "versionId": "1"},
        }
        self.store.setdefault(resource_type, {})[stored["id"]] = stored
        return 201, stored

    def _location(self, resource: dict[str, Any]) -> str:
        return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"

    def _fault(self, key: str) -> bool:
        if key in self.fail_after_commit:
            self.fail_after_commit.discard(key)
            return True
        return False

    def __call__(self, request: Request) -> Reply:
        parts = urlsplit(request.path)
        path = parts.path.removeprefix("/fhir").strip("/")
        segments = path.split("/") if path else []
        if request.method == "GET" and segments == ["metadata"]:
            interaction = [{"code": "transaction"}] if self.transactions else []
            return Reply(
                body={
                    "resourceType": "CapabilityStatement",
                    "rest": [{"mode": "server", "interaction": interaction}],
                }
            )
        if request.method == "GET" and len(segments) == 1:
            matches = self._matches(segments[0], parts.query)
            entries = [{"resource": r, "search": {"mode": "match"}} for r in matches]
            return Reply(body={"resourceType": "Bundle", "type": "searchset", "entry": entries})
        if request.method == "GET" and len(segments) == 2:
            resource = self.store.get(segments[0], {}).get(segments[1])
            return Reply(body=resource) if resource else Reply(404, outcome("not found"))
        if request.method == "POST" and len(segments) == 1:
            status, body = self._create(request.json, request.headers.get("if-none-exist"))
            if self._fault(segments[0]) and status == 201:
                return Reply(503, outcome("try later"))
            headers = {"Location": self._location(body)} if status in (200, 201) else {}
            return Reply(status, body, headers=headers)
        if request.method == "PUT" and len(segments) == 2:
            current = self.store.get(segments[0], {}).get(segments[1])
            if current is None:
                return Reply(404, outcome("not found"))
            if_match = request.headers.get("if-match")
            if if_match and if_match != f'W/"{current["meta"]["versionId"]}"':
                return Reply(412, outcome("version conflict"))
            version = str(int(current["meta"]["versionId"]) + 1)
            stored = {**request.json, "meta": {**request.json.get("meta", {}), "versionId": version}}
            self.store[segments[0]][segments[1]] = stored
            return Reply(200, stored)
        if request.method == "POST" and not segments:
            return self._transaction(request.json)
        return Reply(400, outcome("unsupported"))

    def _transaction(self, bundle: dict[str, Any]) -> Reply:
        if not self.transactions:
            return Reply(400, outcome("transactions not supported"))
        text = json.dumps(bundle)
        responses = []
        for index, entry in enumerate(json.loads(text)["entry"]):
            resource = json.loads(text)["entry"][index]["resource"]
            status, stored = self._create(resource, entry["request"].get("ifNoneExist"))
            if status >= 400:
                return Reply(status, stored)
            # Resolve this entry's placeholder in every later entry, as FHIR transactions do.
            text = text.replace(entry["fullUrl"], f"{stored['resourceType']}/{stored['id']}")
            responses.append({"response": {"status": f"{status}", "location": self._location(stored)}})
        if self._fault("transaction"):
            return Reply(503, outcome("try later"))
        return Reply(body={"resourceType": "Bundle", "type": "transaction-response", "entry": responses})
