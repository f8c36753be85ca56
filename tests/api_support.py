"""A client of the JSON API for tests: signs requests as docs/api.md says, and checks
every answer against the OpenAPI description the switch serves."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import jsonschema

from pointswitch.ledger.api import issue_api_key
from pointswitch.web.api.guard import sign
from pointswitch.web.api.openapi import openapi_document

from .conftest import Network, SwitchUnderTest

_DOC = openapi_document()
_keys = itertools.count(1)


def check_against_openapi(method: str, path: str, status: int, body: Any) -> None:
    """The answer is one the OpenAPI description declares, in the declared shape."""
    operation = _DOC["paths"][path.removeprefix("/api/v1").split("?")[0]][method.lower()]
    declared = operation["responses"].get(str(status))
    assert declared is not None, f"{method} {path}: status {status} is not in the OpenAPI description"
    schema = {**declared["content"]["application/json"]["schema"], "components": _DOC["components"]}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(body)


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str:
        return str(self.body.get("code"))


@dataclass
class ApiClient:
    base: str
    terminal_id: str
    key: bytes

    async def call(self, method: str, path: str, body: Any = None, *, idempotency_key: str | None = None,
                   timestamp: int | None = None, signature: str | None = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None, sign_with: bytes | None = None) -> Answer:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        ts = str(int(time.time()) if timestamp is None else timestamp)
        path = f"/api/v1{path}"
        sent = {"Content-Type": "application/json", "X-Terminal": self.terminal_id, "X-Timestamp": ts,
                "X-Signature": signature or sign(sign_with or self.key, method, path, ts, idempotency_key or "",
                                                 data)}
        if idempotency_key is not None:
            sent["Idempotency-Key"] = idempotency_key
        sent.update(headers or {})
        return await request(self.base, method, path, data, sent)

    async def post(self, path: str, body: Any, **kwargs: Any) -> Answer:
        if path not in ("/inquire",) and "idempotency_key" not in kwargs:
            kwargs["idempotency_key"] = f"k-{next(_keys)}"
        return await self.call("POST", path, body, **kwargs)


async def request(base: str, method: str, path: str, data: bytes = b"", headers: dict[str, str] | None = None
                  ) -> Answer:
    async with aiohttp.ClientSession() as http, http.request(method, base + path, data=data,
                                                                 headers=headers or {}) as resp:
        body = await resp.json(content_type=None)
        check_against_openapi(method, path, resp.status, body)
        return Answer(resp.status, body, dict(resp.headers))


def base_url(switch: SwitchUnderTest) -> str:
    host, port = switch.http
    return f"http://{host}:{port}"


async def api_client(switch: SwitchUnderTest, network: Network, n: int = 1) -> ApiClient:
    """The network's cup terminal ``n`` made an API terminal, with a fresh key."""
    con = await asyncpg.connect(switch.dsn)
    try:
        issued = await issue_api_key(con, switch.vault, network.terminal_ids[n])
    finally:
        await con.close()
    return ApiClient(base_url(switch), network.terminal_ids[n], bytes.fromhex(str(issued["api_key"])))


async def postings_of(network: Network, terminal_id: str) -> int:
    con = await network.db()
    try:
        return int(await con.fetchval("SELECT count(*) FROM postings p JOIN requests r USING (request_id)"
                                      " WHERE r.terminal_id = $1", terminal_id))
    finally:
        await con.close()
