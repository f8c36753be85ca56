"""Operators manage contacts and messages from the command line (each command its
own process, as an operator runs it); the catcher refuses forged webhooks; and
``sim inbox`` runs as a process of its own."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import aiohttp

from pointswitch.messages import signature

from .messaging import CARDS, MERCHANT, PHONES, messaging_switch, until
from .test_cli import PS, _cli, _free_port

SECRET = "cli-webhook-secret-000000001"


async def test_an_operator_subscribes_a_member_and_a_merchant_lists_and_retries_messages(switch, tmp_path):
    async with messaging_switch(switch, tmp_path, max_attempts=1) as ms:
        env = {"POINTSWITCH_MASTER_KEY": ms.master_key_hex}

        async def cli(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(_cli, "admin", *args, "--dsn", ms.dsn, env=env, stdin=stdin, check=check)

        added = json.loads((await cli("card", "contact", "add", CARDS[0], "--sms", PHONES[0], "--lang", "en",
                                      "--json")).stdout)
        assert added["address"] == "***0017" and added["language"] == "en" and added["opt_in"]
        refused = await cli("merchant", "contact", "add", MERCHANT, "--webhook", "https://shop.example/hook",
                            "--secret", SECRET, check=False)
        assert refused.returncode == 2 and SECRET not in refused.stdout + refused.stderr
        await cli("merchant", "contact", "add", MERCHANT, "--webhook", "https://shop.example/hook", "--secret", "-",
                  stdin=SECRET + "\n")
        listed = json.loads((await cli("merchant", "contact", "list", MERCHANT, "--json")).stdout)
        assert [(c["channel"], c["address"]) for c in listed] == [("webhook", "https://shop.example/...")]
        audit = await ms.fetch("SELECT action, target, details::text AS details FROM audit_log"
                               " WHERE action LIKE '%contact%' ORDER BY audit_id")
        assert [(a["action"], a["target"]) for a in audit] == [
            ("card.contact_add", "628866******0017"), ("merchant.contact_add", MERCHANT)]
        assert all(PHONES[0] not in a["details"] and SECRET not in a["details"] for a in audit)

        ms.inbox.fail_next["sms"] = 1  # one attempt allowed: the message fails
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved

        async def failed():
            rows = json.loads((await cli("messages", "list", "--failed", "--json")).stdout)
            return rows

        [message] = await until(failed, what="a failed message", timeout_s=30)
        assert message["recipient"] == "628866******0017" and message["kind"] == "accrual"
        text = (await cli("messages", "list")).stdout
        assert "failed" in text and CARDS[0] not in text and PHONES[0] not in text
        await cli("messages", "retry", str(message["message_id"]))
        await until(lambda: ms.inbox.to(PHONES[0]), what="the retried message")
        assert (await cli("messages", "retry", str(message["message_id"]), check=False)).returncode == 1

        await cli("card", "contact", "opt-out", CARDS[0], "--channel", "sms")
        async with ms.terminal() as t:
            assert (await t.accrue(CARDS[0], 1_000)).approved
        assert len(await ms.outbox()) == 1  # the opted-out member's second accrual queued nothing


async def test_the_catcher_takes_a_signed_webhook_once_and_refuses_a_forged_stale_or_altered_one(switch, tmp_path):
    async with messaging_switch(switch, tmp_path, secrets={MERCHANT: SECRET.encode()}) as ms:
        url = ms.inbox.webhook_url(MERCHANT)
        body = json.dumps({"id": "k1", "kind": "clearing_statement", "text": "t", "data": {"net_fen": 1}}).encode()

        async def post(data: bytes, secret: bytes, stamp: str, key: str = "k1") -> int:
            headers = {"X-Pointswitch-Timestamp": stamp, "Idempotency-Key": key,
                       "X-Pointswitch-Signature": signature(secret, stamp, body)}
            async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as resp:
                return resp.status

        now = str(int(time.time()))
        assert await post(body, b"not-the-merchants-secret", now) == 401
        assert await post(body, SECRET.encode(), str(int(time.time()) - 3600)) == 401  # a replay, an hour late
        assert await post(body.replace(b'"net_fen": 1', b'"net_fen": 9'), SECRET.encode(), now) == 401
        assert [r["reason"] for r in ms.inbox.refused] == [
            "signature does not verify", "timestamp missing or outside the window", "signature does not verify"]
        assert await post(body, SECRET.encode(), now) == 200
        assert await post(body, SECRET.encode(), now) == 200  # the same key again: answered, not taken twice
        assert len(ms.inbox.to(MERCHANT)) == 1 and ms.inbox.attempts["k1"] == 2


async def test_sim_inbox_runs_as_a_process_and_writes_what_it_takes_as_json_lines(tmp_path):
    http_port, smtp_port, out = _free_port(), _free_port(), tmp_path / "inbox.jsonl"
    proc = await asyncio.create_subprocess_exec(
        *PS, "sim", "inbox", "--http-port", str(http_port), "--smtp-port", str(smtp_port), "--out", str(out),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        sms = {"phone_numbers": "13700000000", "sign_name": "积分联盟", "template_code": "accrual",
               "template_param": json.dumps({"card": "628866******0017"}), "out_id": "key-1"}
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.post(f"http://127.0.0.1:{http_port}/sms", json=sms) as resp:
                        assert (await resp.json())["code"] == "OK"
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("sim inbox did not start")
        [line] = out.read_text(encoding="utf-8").splitlines()
        record = json.loads(line)
        assert (record["to"], record["key"], record["params"]["card"]) == ("13700000000", "key-1", "628866******0017")
    finally:
        proc.terminate()
        out_bytes, err_bytes = await asyncio.wait_for(proc.communicate(), 10)
    stdout, stderr = out_bytes.decode(), err_bytes.decode()
    assert proc.returncode == 0, stderr
    assert '"key-1"' in stdout and f"SMTP 127.0.0.1:{smtp_port}" in stderr


def test_the_messages_section_is_read_from_the_file_and_the_environment_and_checked(tmp_path):
    from pointswitch.config import ConfigError, load

    path = tmp_path / "pointswitch.toml"
    path.write_text('[messages]\nsms_url = "https://sms.example/send"\nquiet_hours_start = "21:30"\n'
                    'sms_template_ids = { accrual = "SMS_1001", clearing_statement = "SMS_1007" }\n', encoding="utf-8")
    cfg = load(path, env={"POINTSWITCH_MESSAGES_RATE_LIMIT_PER_HOUR": "5"})
    m = cfg.messages
    assert (m.sms_url, m.quiet_hours_start, m.quiet_hours_end, m.rate_limit_per_hour) == (
        "https://sms.example/send", "21:30", "08:00", 5)
    assert m.sms_template_ids == {"accrual": "SMS_1001", "clearing_statement": "SMS_1007"}
    for bad in ('quiet_hours_end = "25:00"', 'sms_template_ids = { birthday = "SMS_9" }', "max_attempts = 0",
                'sms_url = "ftp://sms.example"', "backoff_max_s = 1.0\nbackoff_initial_s = 2.0", "surprise = 1"):
        path.write_text(f"[messages]\n{bad}\n", encoding="utf-8")
        try:
            load(path, env={})
        except ConfigError:
            continue
        raise AssertionError(f"accepted: {bad}")
