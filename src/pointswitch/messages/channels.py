"""The channels a message goes out on, behind one small interface: ``send`` a
rendered message or raise :class:`SendError` (``permanent``: do not try again).

- ``sms``: an HTTP SMS gateway (JSON: phone, signature, template id and the
  template's variables, as Chinese providers expect), with the message's
  idempotency key as ``Idempotency-Key`` and ``out_id``.
- ``email``: SMTP (the standard library's smtplib, in a thread); the key is the
  Message-ID, so a receiver that de-duplicates on it takes the message once.
- ``webhook``: a merchant's own system; the body is signed with HMAC-SHA256
  under the merchant's secret (see :func:`signature`), with a timestamp and the
  ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import smtplib
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from ..config import MessagesConfig
from ..ledger.outbox import Message

SIGNATURE_HEADER = "X-Pointswitch-Signature"
TIMESTAMP_HEADER = "X-Pointswitch-Timestamp"
KEY_HEADER = "Idempotency-Key"


class SendError(Exception):
    """A send that did not go through; ``permanent`` when trying again cannot help."""

    def __init__(self, reason: str, *, permanent: bool = False):
        super().__init__(reason)
        self.permanent = permanent


@dataclass(frozen=True)
class Outgoing:
    """A message ready for a channel: the claimed row, its text and its variables."""

    message: Message
    subject: str
    text: str
    variables: dict[str, str]


class Channel(Protocol):
    name: str

    async def send(self, out: Outgoing) -> None: ...


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The webhook signature: ``sha256=`` + hex HMAC-SHA256 of ``<timestamp>.<body>``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _http_failure(status: int, what: str) -> SendError:
    # Refused for good: a 4xx other than timeout and too-many-requests.
    return SendError(f"{what} answered HTTP {status}", permanent=400 <= status < 500 and status not in (408, 429))


class SmsGateway:
    name = "sms"

    def __init__(self, session: aiohttp.ClientSession, settings: MessagesConfig):
        self._session = session
        self._url = settings.sms_url
        self._sign_name = settings.sms_sign_name
        self._template_ids = settings.sms_template_ids
        self._timeout = aiohttp.ClientTimeout(total=settings.send_timeout_s)

    async def send(self, out: Outgoing) -> None:
        m = out.message
        body = {"phone_numbers": m.address, "sign_name": self._sign_name,
                "template_code": self._template_ids.get(m.kind, m.kind),
                "template_param": json.dumps(out.variables, ensure_ascii=False), "out_id": m.idempotency_key,
                "language": m.language, "text": out.text}
        try:
            async with self._session.post(self._url, json=body, headers={KEY_HEADER: m.idempotency_key},
                                          timeout=self._timeout) as resp:
                if resp.status >= 300:
                    raise _http_failure(resp.status, "the SMS gateway")
                answer: Any = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SendError(f"the SMS gateway: {type(exc).__name__}") from None
        code = answer.get("code", "OK") if isinstance(answer, dict) else "OK"
        if code != "OK":  # providers answer 200 with their own code for refusals and their rate limits
            raise SendError(f"the SMS gateway refused: {str(code)[:60]}")


class Webhook:
    name = "webhook"

    def __init__(self, session: aiohttp.ClientSession, settings: MessagesConfig):
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=settings.send_timeout_s)

    @staticmethod
    def body(out: Outgoing) -> bytes:
        m = out.message
        return json.dumps({"id": m.idempotency_key, "kind": m.kind, "language": m.language, "subject": out.subject,
                           "text": out.text, "data": m.payload}, ensure_ascii=False, sort_keys=True).encode()

    async def send(self, out: Outgoing) -> None:
        m = out.message
        if m.secret is None:
            raise SendError("the webhook has no signing secret", permanent=True)
        body = self.body(out)
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: stamp, KEY_HEADER: m.idempotency_key,
                   SIGNATURE_HEADER: signature(m.secret, stamp, body)}
        try:
            async with self._session.post(m.address, data=body, headers=headers, timeout=self._timeout,
                                          allow_redirects=False) as resp:
                if resp.status >= 300:
                    raise _http_failure(resp.status, "the webhook")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SendError(f"the webhook: {type(exc).__name__}") from None


class SmtpMail:
    name = "email"

    def __init__(self, settings: MessagesConfig):
        self._s = settings
        self._password = (Path(settings.smtp_password_file).expanduser().read_text().strip()
                          if settings.smtp_password_file else "")

    def _message(self, out: Outgoing) -> EmailMessage:
        m = out.message
        mail = EmailMessage()
        mail["From"] = self._s.smtp_from
        mail["To"] = m.address
        mail["Subject"] = out.subject
        mail["Date"] = formatdate(localtime=True)
        mail["Message-ID"] = f"<{m.idempotency_key.replace(':', '.')}@pointswitch>"
        mail[KEY_HEADER] = m.idempotency_key
        mail.set_content(out.text)
        return mail

    def _send_blocking(self, mail: EmailMessage) -> None:
        s = self._s
        with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.send_timeout_s) as smtp:
            if s.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_user:
                smtp.login(s.smtp_user, self._password)
            smtp.send_message(mail)

    async def send(self, out: Outgoing) -> None:
        mail = self._message(out)
        try:
            await asyncio.wait_for(asyncio.to_thread(self._send_blocking, mail), self._s.send_timeout_s + 1)
        except smtplib.SMTPRecipientsRefused:
            raise SendError("the mail server refused the recipient", permanent=True) from None
        except smtplib.SMTPResponseException as exc:
            raise SendError(f"the mail server answered {exc.smtp_code}", permanent=500 <= exc.smtp_code < 600) from None
        except (smtplib.SMTPException, OSError, TimeoutError) as exc:
            raise SendError(f"the mail server: {type(exc).__name__}") from None


def build_channels(settings: MessagesConfig, session: aiohttp.ClientSession) -> dict[str, Channel]:
    """The channels the settings turn on (an SMS gateway with a URL, SMTP with a host)."""
    channels: dict[str, Channel] = {}
    if settings.sms_url:
        channels["sms"] = SmsGateway(session, settings)
    if settings.smtp_host:
        channels["email"] = SmtpMail(settings)
    if settings.webhook:
        channels["webhook"] = Webhook(session, settings)
    return channels
