"""``pointswitch sim inbox``: a local catcher for the messages the switch sends.

- ``POST /sms``: an SMS gateway that answers as Chinese providers do (JSON
  ``{"code": "OK"}``), taking each ``Idempotency-Key`` once.
- ``POST /webhook/<merchant>``: a merchant's system that checks the signature
  (HMAC-SHA256 of ``<timestamp>.<body>`` under the merchant's secret, the
  timestamp within a window) and refuses (401) what does not verify.
- SMTP (aiosmtpd): a mail server that takes each Message-ID once.
- ``GET /messages``: what was received (also printed, and appended to a JSON
  lines file when given one).

It speaks only the protocols: it shares no code with the switch, so the
signature check here is an independent one. For tests it can be told to fail the
next sends of a channel (``fail_next``) and to run a hook when a message arrives.
"""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

SIGNATURE_WINDOW_S = 300  # a webhook whose timestamp is further from now is refused (replay)
MAX_STORED = 10_000  # received messages kept in memory (the oldest go first)

Hook = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Inbox:
    host: str = "127.0.0.1"
    http_port: int = 0
    smtp_port: int = 0
    secrets: dict[str, bytes] = field(default_factory=dict)  # merchant id -> webhook secret
    out_path: Path | None = None
    echo: bool = False  # print each message received
    received: list[dict[str, Any]] = field(default_factory=list)  # taken, once per key
    refused: list[dict[str, Any]] = field(default_factory=list)  # forged, stale or unknown webhooks
    attempts: dict[str, int] = field(default_factory=dict)  # key -> times it arrived (duplicates included)
    fail_next: dict[str, int] = field(default_factory=dict)  # channel -> sends still to fail (HTTP 503 / SMTP 451)
    on_receive: Hook | None = None  # awaited after a message is stored, before it is answered

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._smtp: asyncio.AbstractServer | None = None
        self.bound_http: tuple[str, int] = (self.host, self.http_port)
        self.bound_smtp: tuple[str, int] = (self.host, self.smtp_port)

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/sms", self._sms)
        app.router.add_post("/webhook/{merchant}", self._webhook)
        app.router.add_get("/messages", self._list)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.http_port)
        await site.start()
        self.bound_http = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        self._smtp = await loop.create_server(lambda: SMTP(_MailHandler(self), hostname="inbox"), self.host,
                                              self.smtp_port)
        self.bound_smtp = self._smtp.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def sms_url(self) -> str:
        return f"http://{self.bound_http[0]}:{self.bound_http[1]}/sms"

    def webhook_url(self, merchant_id: str) -> str:
        return f"http://{self.bound_http[0]}:{self.bound_http[1]}/webhook/{merchant_id}"

    def to(self, address: str) -> list[dict[str, Any]]:
        """What was taken for one phone number, e-mail address or merchant."""
        return [m for m in self.received if m["to"] == address]

    # -- taking a message ---------------------------------------------------------------
    def _fail(self, channel: str) -> bool:
        if self.fail_next.get(channel, 0) > 0:
            self.fail_next[channel] -= 1
            return True
        return False

    async def _take(self, record: dict[str, Any]) -> bool:
        """Store a message once per key; False when its key was taken before."""
        key = record["key"]
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] > 1:
            return False
        record["received_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        self.received.append(record)
        del self.received[:-MAX_STORED]
        line = json.dumps(record, ensure_ascii=False, sort_keys=True)
        if self.echo:
            print(line, flush=True)
        if self.out_path is not None:
            with self.out_path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        if self.on_receive is not None:
            await self.on_receive(record)
        return True

    async def _sms(self, request: web.Request) -> web.Response:
        if self._fail("sms"):
            return web.json_response({"code": "ServiceUnavailable"}, status=503)
        try:
            body = await request.json()
            params = json.loads(body["template_param"])
            record = {"channel": "sms", "to": str(body["phone_numbers"]), "sign_name": body.get("sign_name"),
                      "template": body["template_code"], "params": params, "text": body.get("text", ""),
                      "key": request.headers.get("Idempotency-Key") or body["out_id"]}
        except (ValueError, KeyError, TypeError):
            return web.json_response({"code": "isv.INVALID_PARAMETERS"}, status=400)
        fresh = await self._take(record)
        return web.json_response({"code": "OK", "biz_id": record["key"], "duplicate": not fresh})

    async def _webhook(self, request: web.Request) -> web.Response:
        merchant = request.match_info["merchant"]
        body = await request.read()
        stamp = request.headers.get("X-Pointswitch-Timestamp", "")
        given = request.headers.get("X-Pointswitch-Signature", "")
        why = verify_webhook(self.secrets.get(merchant), stamp, given, body)
        if why:
            self.refused.append({"to": merchant, "reason": why, "key": request.headers.get("Idempotency-Key")})
            return web.json_response({"error": why}, status=401)
        if self._fail("webhook"):
            return web.json_response({"error": "unavailable"}, status=503)
        data = json.loads(body)
        record = {"channel": "webhook", "to": merchant, "key": request.headers.get("Idempotency-Key", data["id"]),
                  "kind": data["kind"], "text": data["text"], "data": data["data"], "signature_ok": True}
        fresh = await self._take(record)
        return web.json_response({"ok": True, "duplicate": not fresh})

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response({"received": self.received, "refused": self.refused})


def verify_webhook(secret: bytes | None, stamp: str, given: str, body: bytes, *, now: float | None = None) -> str:
    """Why a webhook does not verify ("" when it does)."""
    if secret is None:
        return "no secret for this merchant"
    if not stamp.isdigit() or abs((now or time.time()) - int(stamp)) > SIGNATURE_WINDOW_S:
        return "timestamp missing or outside the window"
    expected = "sha256=" + hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given):
        return "signature does not verify"
    return ""


class _MailHandler:
    """aiosmtpd's handler: one stored message per Message-ID."""

    def __init__(self, inbox: Inbox):
        self._inbox = inbox

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._inbox._fail("email"):
            return "451 4.3.0 try again later"
        raw = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        mail = email.message_from_bytes(raw, policy=email.policy.default)
        body = mail.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""  # type: ignore[attr-defined]
        for to in envelope.rcpt_tos:
            await self._inbox._take({"channel": "email", "to": to, "key": str(mail["Message-ID"]),
                                     "subject": str(mail["Subject"]), "text": text.strip()})
        return "250 OK"
