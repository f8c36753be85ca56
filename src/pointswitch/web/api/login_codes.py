"""How a member's one-time login code reaches the member: one small seam.

:class:`SmsCodes` sends it at once through the messages module's SMS gateway
(``[messages] sms_url``) to the phone the member registered for messages: not
through the outbox, since a login code must not wait for quiet hours, be retried
after it expired, or lie in a table in clear. Without a gateway,
:class:`StoredCodes` keeps each code sealed under the master key in
``member_code_deliveries`` until it expires, where the demo and the tests read it
(``ledger.members.delivered_code``). ``WebServices.extra["code_sender"]`` replaces
either. A code is never logged, and never stored in clear.
"""

from __future__ import annotations

import datetime
import secrets
from typing import Protocol

import structlog

from ...ledger.members import MemberCards
from ...ledger.outbox import Message
from ...messages.channels import Outgoing, SendError, SmsGateway

log = structlog.get_logger("pointswitch.web.api")

KIND = "login_code"  # the SMS template id unless [messages] sms_template_ids names another
TEXTS = {"zh-CN": "您的积分联盟登录验证码为${code}，${minutes}分钟内有效。请勿告诉他人。",
         "en": "Your points login code is ${code}, valid for ${minutes} minutes. Do not share it."}


class CodeSender(Protocol):
    async def send(self, card_index: str, code: str) -> None:
        """Deliver ``code`` to the holder of the card (by its card index)."""
        ...


class StoredCodes:
    """No channel configured: the code kept sealed for a local reader."""

    def __init__(self, members: MemberCards):
        self._members = members

    async def send(self, card_index: str, code: str) -> None:
        await self._members.store_delivery(card_index, code)


class SmsCodes:
    """The code by SMS to the member's registered phone; nothing when there is none."""

    def __init__(self, members: MemberCards, gateway: SmsGateway, ttl_s: float):
        self._members = members
        self._gateway = gateway
        self._minutes = str(max(1, round(ttl_s / 60)))

    async def send(self, card_index: str, code: str) -> None:
        contact = await self._members.sms_contact(card_index)
        if contact is None:
            log.info("login code not sent: the member registered no phone for messages")
            return
        phone, language = contact
        values = {"code": code, "minutes": self._minutes}
        text = TEXTS.get(language, TEXTS["en"])
        for name, value in values.items():
            text = text.replace("${" + name + "}", value)
        message = Message(0, KIND, "member", card_index, "sms", f"login-{secrets.token_hex(12)}", {}, language,
                          datetime.datetime.now(datetime.UTC), 0, True, phone, None)
        try:
            await self._gateway.send(Outgoing(message, "", text, values))
        except SendError as exc:  # the member asks again; the reason never holds the code or the phone
            log.warning("login code not sent", reason=str(exc)[:120])
