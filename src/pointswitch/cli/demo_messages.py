"""The demo's messages: a local catcher (``simulators.inbox``) stands in for the SMS
gateway, the mail server and the merchants' systems; the demo member and merchants
subscribe; at the end the demo prints what each of them received."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from ..config import Config
from ..simulators.inbox import Inbox

DEMO_PHONE = "13800000000"
DEMO_EMAIL = "li.lei@example.com"


async def start_inbox(cfg: Config, merchant_ids: list[str]) -> tuple[Inbox, dict[str, str]]:
    """The catcher, started, and ``cfg.messages`` pointed at it; the merchants' webhook secrets."""
    hook_secrets = {mid: secrets.token_hex(16) for mid in merchant_ids}
    inbox = Inbox(secrets={mid: s.encode() for mid, s in hook_secrets.items()})
    await inbox.start()
    m = cfg.messages
    m.enabled, m.sms_url, m.webhook = True, inbox.sms_url, True
    m.smtp_host, m.smtp_port = inbox.bound_smtp
    m.quiet_hours_start = m.quiet_hours_end = "00:00"  # the demo runs at any hour: no quiet hours
    m.poll_interval_s = 0.2
    return inbox, hook_secrets


async def subscribe(con: Any, vault: Any, card: str, inbox: Inbox, hook_secrets: dict[str, str]) -> None:
    """The member by SMS (Chinese) and e-mail (English); each merchant by signed webhook."""
    from ..ledger import contacts

    await contacts.add_card_contact(con, vault, card, "sms", DEMO_PHONE, "zh-CN")
    await contacts.add_card_contact(con, vault, card, "email", DEMO_EMAIL, "en")
    for mid, secret in hook_secrets.items():
        await contacts.add_merchant_contact(con, vault, mid, "webhook", inbox.webhook_url(mid), secret, "zh-CN")


async def print_received(pool: Any, inbox: Inbox, wait_s: float = 10.0) -> None:
    """Wait until the outbox is delivered (or ``wait_s``), then print what the catcher took."""
    from ..ledger import outbox

    for _ in range(int(wait_s / 0.1)):
        async with pool.acquire() as con:
            if not await outbox.waiting(con):
                break
        await asyncio.sleep(0.1)
    print("\nmessages received (caught by the local inbox: SMS gateway, mail server, merchants' webhooks):")
    member = [r for r in inbox.received if r["channel"] in ("sms", "email")]
    print(f"  the member ({len(member)}):")
    for r in member:
        to = "***" + r["to"][-4:] if r["channel"] == "sms" else r["to"]
        print(f"    {r['channel']:<5} {to:<20} {r['text']}")
    merchants = [r for r in inbox.received if r["channel"] == "webhook"]
    print(f"  the merchants ({len(merchants)}, every signature verified: {all(r['signature_ok'] for r in merchants)}):")
    for r in merchants:
        print(f"    webhook {r['to']:<16} {r['text']}")
    if inbox.refused:
        print(f"  refused webhooks: {len(inbox.refused)}")
