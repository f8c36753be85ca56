"""The operator console over real HTTP, as a browser uses it: sign-in, lockout, form
tokens, roles, masked card numbers, the audit trail, and every screen with real data
(the switch, its database and terminals over TCP are the real ones)."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import itertools
import json
import re
import secrets
from typing import Any

import aiohttp
import asyncpg

from pointswitch.ledger import contacts, operators
from pointswitch.web.console import charts
from pointswitch.web.console.security import Keys

from .conftest import Network, SwitchUnderTest
from .test_business_day import CARD as DAY_CARD
from .test_business_day import day_switch
from .test_cli import _cli

_names = itertools.count(1)
PASSWORD = "correct horse battery staple"


async def add_operator(dsn: str, role: str, password: str = PASSWORD) -> str:
    name = f"{role[:4]}{next(_names)}-{secrets.token_hex(3)}"
    con = await asyncpg.connect(dsn)
    try:
        await operators.add_operator(con, name, role, await asyncio.to_thread(operators.hash_password, password))
    finally:
        await con.close()
    return name


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        return await con.fetch(sql, *args)
    finally:
        await con.close()


class Console:
    """A browser without JavaScript: cookies, forms and their tokens."""

    def __init__(self, address: tuple[str, int]):
        self.base = f"http://{address[0]}:{address[1]}/console"
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def __aenter__(self) -> Console:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def get(self, path: str, status: int = 200) -> str:
        async with self.http.get(self.base + path, allow_redirects=False) as resp:
            body = await resp.text()
            assert resp.status == status, f"GET {path}: {resp.status} {body[:300]}"
            return body

    async def token(self, path: str = "/") -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', await self.get(path))
        assert found, f"no form token on {path}"
        return found.group(1)

    async def post(self, path: str, data: dict[str, str] | None = None, *, token: str | None = "fetch",
                   status: int = 303) -> aiohttp.ClientResponse:
        form = dict(data or {})
        if token == "fetch":
            token = await self.token()
        if token is not None:
            form["csrf_token"] = token
        async with self.http.post(self.base + path, data=form, allow_redirects=False) as resp:
            await resp.read()
            assert resp.status == status, f"POST {path}: {resp.status} {(await resp.text())[:300]}"
            return resp

    async def login(self, name: str, password: str = PASSWORD, status: int = 303) -> aiohttp.ClientResponse:
        return await self.post("/login", {"name": name, "password": password}, token=await self.token("/login"),
                               status=status)

    async def find_card(self, number: str) -> str:
        """The card's page address (by its card index), found by its number in a form."""
        resp = await self.post("/cards/find", {"card_number": number})
        location = resp.headers["Location"]
        assert re.fullmatch(r"/console/cards/[0-9a-f]{64}", location), location
        return location.removeprefix("/console")


async def test_sign_in_shows_the_overview_and_a_wrong_password_does_not(switch: SwitchUnderTest) -> None:
    name = await add_operator(switch.dsn, "viewer")
    async with Console(switch.http) as browser:
        async with browser.http.get(browser.base + "/", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/console/login"  # not signed in
        async with browser.http.get(browser.base, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] in ("/console/", "/console/login")
        async with browser.http.get(browser.base + "/overview/live", headers={"HX-Request": "true"}) as resp:
            assert resp.status == 401 and resp.headers["HX-Redirect"] == "/console/login"
        page = await browser.login(name, "not the password", status=401)
        assert page.cookies.get("ps_session") is None
        await browser.get("/", status=303)
        resp = await browser.login(name)
        cookie = resp.cookies["ps_session"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"
        overview = await browser.get("/")
        async with browser.http.get(browser.base + "/") as resp:
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["Cache-Control"] == "no-store"
    assert name in overview and "<svg" in overview and "Open business day" in overview
    entries = await fetch(switch.dsn, "SELECT action FROM audit_log WHERE target = $1 ORDER BY audit_id", name)
    assert [e["action"] for e in entries] == ["operator.add", "operator.login_failed", "operator.login"]


async def test_an_account_locks_after_too_many_wrong_passwords_and_a_new_password_unlocks_it(
        switch: SwitchUnderTest) -> None:
    name = await add_operator(switch.dsn, "operator")
    limit = switch.config.console.max_failed_logins
    async with Console(switch.http) as browser:
        for _ in range(limit):
            await browser.login(name, "wrong password!", status=401)
        await browser.login(name, status=401)  # the right password, refused while locked
        await browser.get("/", status=303)
    row = (await fetch(switch.dsn, "SELECT locked_until > now() AS locked FROM operators WHERE name = $1", name))[0]
    assert row["locked"]
    actions = [r["action"] for r in await fetch(
        switch.dsn, "SELECT action FROM audit_log WHERE target = $1 ORDER BY audit_id", name)]
    assert actions.count("operator.login_failed") == limit - 1 and "operator.locked" in actions
    assert actions[-1] == "operator.login_refused"
    con = await asyncpg.connect(switch.dsn)
    try:
        await operators.set_password(con, name, operators.hash_password(PASSWORD + "!"))
    finally:
        await con.close()
    async with Console(switch.http) as browser:
        await browser.login(name, PASSWORD + "!")
        await browser.get("/")


async def test_an_unknown_name_gets_the_same_answer_as_a_wrong_password(switch: SwitchUnderTest) -> None:
    name = await add_operator(switch.dsn, "viewer")
    async with Console(switch.http) as browser:
        async with browser.http.post(browser.base + "/login", allow_redirects=False, data={
                "name": name, "password": "wrong password!", "csrf_token": await browser.token("/login")}) as resp:
            wrong = await resp.text()
        async with browser.http.post(browser.base + "/login", allow_redirects=False, data={
                "name": "nobody-" + name, "password": PASSWORD, "csrf_token": await browser.token("/login")}) as resp:
            unknown = await resp.text()
    assert wrong == unknown


async def test_a_post_without_the_sessions_form_token_is_refused(switch: SwitchUnderTest,
                                                                 network: Network) -> None:
    name = await add_operator(switch.dsn, "operator")
    async with Console(switch.http) as other:  # another session's token does not fit this one
        await other.login(await add_operator(switch.dsn, "operator"))
        foreign = await other.token()
    async with Console(switch.http) as browser:
        await browser.post("/login", {"name": name, "password": PASSWORD}, token=None, status=403)
        await browser.login(name)
        card = await browser.find_card(network.cards[0])
        await browser.post(f"{card}/block", token=None, status=403)
        await browser.post(f"{card}/block", token="forged", status=403)
        await browser.post(f"{card}/block", token=foreign, status=403)
        await browser.post(f"/terminals/{network.terminal_ids[0]}/disable", token=None, status=403)
        assert 'id="card-status">active' in await browser.get(card)
    async with Console(switch.http) as stranger:  # no session at all
        await stranger.post(f"{card}/block", token=None, status=401)


async def test_a_viewer_reads_every_screen_with_card_numbers_masked_and_may_change_nothing(
        switch: SwitchUnderTest, network: Network) -> None:
    number = network.cards[0]
    async with network.terminal(0) as term:
        assert (await term.accrue(number, 12_300)).rc == "00"
    name = await add_operator(switch.dsn, "viewer")
    async with Console(switch.http) as browser:
        await browser.login(name)
        card = await browser.find_card(number)
        page = await browser.get(card)
        assert number not in page and f"{number[:6]}******{number[-4:]}" in page
        assert 'id="balance">123<' in page and "Block card" not in page
        refused = [f"{card}/block", f"{card}/unblock", f"{card}/unlock-pin", f"{card}/reveal",
                   f"/terminals/{network.terminal_ids[0]}/disable", f"/merchants/{network.merchant_id}/rates",
                   "/days/close", "/reversals/1/retry", "/reversals/1/resolve", "/operators"]
        for path in refused:  # a valid form token does not make a viewer an operator
            await browser.post(path, {"earn_rate": "9", "outcome": "kept", "name": "x", "role": "admin"},
                               status=403)
        await browser.get("/operators", status=403)
        for path in ("/", "/cards", f"/merchants/{network.merchant_id}", f"/terminals/{network.terminal_ids[0]}",
                     "/batches", "/days", "/reversals", "/audit", "/merchants"):
            assert number not in await browser.get(path)
    assert await network.balance(number) == 123
    rows = await fetch(switch.dsn, "SELECT status FROM cards WHERE card_index = $1", network.card_index(number))
    assert rows[0]["status"] == "active"


async def test_an_operator_blocks_a_card_the_terminal_declines_it_62_and_the_audit_names_the_operator(
        switch: SwitchUnderTest, network: Network) -> None:
    number = network.cards[1]
    name = await add_operator(switch.dsn, "operator")
    async with Console(switch.http) as browser:
        await browser.login(name)
        card = await browser.find_card(number)
        resp = await browser.post(f"{card}/block")
        assert resp.headers["Location"] == f"/console{card}?done=blocked"
        assert 'id="card-status">blocked' in await browser.get(card)
        async with network.terminal(0) as term:
            assert (await term.accrue(number, 1000)).rc == "62"
            await browser.post(f"{card}/unblock")
            assert (await term.accrue(number, 1000)).rc == "00"
            # A PIN locked by wrong tries, unlocked in the console.
            assert [(await term.redeem(number, 5, pin="999999")).rc for _ in range(3)] == ["55", "55", "75"]
            assert (await term.redeem(number, 5)).rc == "75"
            assert 'id="unlock-pin"' in await browser.get(card)
            await browser.post(f"{card}/unlock-pin")
            assert (await term.redeem(number, 5)).rc == "00"
        revealed = await (await browser.http.post(browser.base + f"{card}/reveal",
                                                  data={"csrf_token": await browser.token()})).text()
        assert number in revealed
        audit = await browser.get(f"/audit?actor={name}")
    assert number not in audit
    rows = await fetch(switch.dsn, "SELECT actor, action, target, origin FROM audit_log WHERE actor = $1"
                                   " AND action LIKE 'card.%' ORDER BY audit_id", name)
    assert [r["action"] for r in rows] == ["card.block", "card.unblock", "card.unlock_pin", "card.reveal"]
    assert all(r["target"] == f"{number[:6]}******{number[-4:]}" and r["origin"].startswith("console 127.0.0.1")
               for r in rows)


async def test_an_operator_disables_a_terminal_and_edits_a_merchants_rates(
        switch: SwitchUnderTest, network: Network) -> None:
    name = await add_operator(switch.dsn, "operator")
    tid = network.terminal_ids[1]
    async with Console(switch.http) as browser:
        await browser.login(name)
        await browser.post(f"/terminals/{tid}/disable")
        assert 'id="terminal-status">disabled' in await browser.get(f"/terminals/{tid}")
        async with network.terminal(1) as term:
            assert (await term.accrue(network.cards[2], 1000)).rc == "58"
        await browser.post(f"/terminals/{tid}/enable")
        await browser.post(f"/merchants/{network.merchant_id}/rates", {"earn_rate": "3", "issue_price": "",
                                                                        "redeem_value": ""})
        before = await network.balance(network.cards[2])
        async with network.terminal(1) as term:
            assert (await term.accrue(network.cards[2], 1000)).rc == "00"
        assert await network.balance(network.cards[2]) - before == 30  # 10 yuan at 3 points per yuan
        refused = await browser.post(f"/merchants/{network.merchant_id}/rates", {"earn_rate": "lots"},
                                     status=409)
        assert refused.status == 409
    actions = [r["action"] for r in await fetch(switch.dsn, "SELECT action FROM audit_log WHERE actor = $1"
                                                                        " ORDER BY audit_id", name)]
    assert actions == ["operator.login", "terminal.disable", "terminal.enable", "merchant.update"]


async def test_each_screen_renders_with_real_data(switch: SwitchUnderTest, network: Network) -> None:
    number = network.cards[0]
    con = await asyncpg.connect(switch.dsn)
    try:  # the member is subscribed: the accrual and the redemption queue a message each
        await contacts.add_card_contact(con, switch.vault, number, "sms", "13800138000")
    finally:
        await con.close()
    async with network.terminal(0) as term:
        assert (await term.accrue(number, 50_000)).rc == "00"
        assert (await term.redeem(number, 100)).rc == "00"
    name = await add_operator(switch.dsn, "admin")
    async with Console(switch.http) as browser:
        await browser.login(name)
        overview = await browser.get("/")
        assert overview.count("<rect class=\"bar\"") >= 1 and "00 approved" in overview
        live = await browser.get("/overview/live")
        assert "<svg" in live and "<html" not in live
        card = await browser.get(await browser.find_card(number))
        assert 'id="balance">400<' in card and "<td>redeem</td>" in card and "never" in card
        messages = card[card.index('id="messages"'):]
        assert messages.count("<td>sms</td>") == 2 and "***8000" in messages and "13800138000" not in card
        merchant = await browser.get(f"/merchants/{network.merchant_id}")
        assert "points issued and redeemed per business day" in merchant and network.terminal_ids[0] in merchant
        assert "<title>" in merchant and "issued: 500" in merchant
        terminal = await browser.get(f"/terminals/{network.terminal_ids[0]}")
        assert "Last sign-on" in terminal and "<td>accrue</td>" in terminal and f"{number[:6]}******" in terminal
        async with network.terminal(0) as term:
            assert (await term.settle()).rc in ("00", "95")  # 95: this connection's totals are not the host's
        batches = await browser.get(f"/batches?terminal={network.terminal_ids[0]}")
        assert network.terminal_ids[0] in batches
        for path in ("/days", "/reversals", "/audit", "/operators", "/merchants", "/cards"):
            assert "<h1>" in await browser.get(path)
        assert name in await browser.get("/operators")
        await browser.post("/cards/find", {"card_number": "6288"}, status=400)
        await browser.post("/cards/find", {"card_number": "6299999999999999"}, status=404)
        await browser.get("/cards/" + "0" * 64, status=404)
        await browser.get("/merchants/NOSUCHMERCHANT", status=404)
        await browser.get("/terminals/NOSUCH", status=404)
        async with browser.http.get(browser.base + "/static/htmx.min.js") as resp:
            assert resp.status == 200 and "htmx" in await resp.text()


async def test_signing_out_ends_the_session_and_a_changed_cookie_is_refused(switch: SwitchUnderTest) -> None:
    name = await add_operator(switch.dsn, "viewer")
    async with Console(switch.http) as browser:
        resp = await browser.login(name)
        cookie = resp.cookies["ps_session"].value
        payload, signature = cookie.split(".")
        async with aiohttp.ClientSession(cookies={"ps_session": payload[:-2] + "xx." + signature}) as forged:
            async with forged.get(browser.base + "/", allow_redirects=False) as r:
                assert r.status == 303
        await browser.post("/logout")
        await browser.get("/", status=303)
    async with aiohttp.ClientSession(cookies={"ps_session": cookie}) as replay:  # the old cookie, replayed
        async with replay.get(browser.base + "/", allow_redirects=False) as r:
            assert r.status == 303


async def test_an_admin_adds_an_operator_and_changes_roles_which_ends_their_sessions(
        switch: SwitchUnderTest) -> None:
    admin_name, new = await add_operator(switch.dsn, "admin"), f"new{next(_names)}-{secrets.token_hex(3)}"
    async with Console(switch.http) as admin, Console(switch.http) as newcomer:
        await admin.login(admin_name)
        await admin.post("/operators", {"name": new, "role": "viewer", "password": "short"}, status=409)
        await admin.post("/operators", {"name": new, "role": "viewer", "password": PASSWORD})
        await newcomer.login(new)
        await newcomer.get("/operators", status=403)
        await admin.post(f"/operators/{new}", {"role": "operator"})
        await newcomer.get("/", status=303)  # a new role: sign in again
        await newcomer.login(new)
        await admin.post(f"/operators/{admin_name}", {"role": "viewer"}, status=409)  # not one's own
        await admin.post(f"/operators/{new}", {"disabled": "true"})
        await newcomer.get("/", status=303)
        await newcomer.login(new, status=401)
    rows = await fetch(switch.dsn, "SELECT action, actor FROM audit_log WHERE target = $1 AND action LIKE"
                                   " 'operator.%' AND action NOT LIKE 'operator.login%' ORDER BY audit_id", new)
    assert [(r["action"], r["actor"]) for r in rows] == [
        ("operator.add", admin_name), ("operator.role", admin_name), ("operator.disable", admin_name)]


async def test_an_operator_closes_the_day_and_downloads_its_clearing_file(switch: SwitchUnderTest, tmp_path) -> None:
    async with day_switch(switch, tmp_path) as day:
        async with day.terminal("TDA00001", "MA0000000000001") as term:
            assert (await term.accrue(DAY_CARD, 10_000)).rc == "00"
        async with day.running.pool.acquire() as con:
            await operators.add_operator(con, "closer", "operator", operators.hash_password(PASSWORD))
        assert day.running.web is not None and day.running.web.bound is not None
        async with Console(day.running.web.bound) as browser:
            await browser.login("closer")
            resp = await browser.post("/days/close")
            day_page = resp.headers["Location"].split("?")[0].removeprefix("/console")
            page = await browser.get(day_page)
            assert "closed" in page and "by closer" in page
            async with browser.http.get(browser.base + day_page + "/clearing.csv") as r:
                assert r.status == 200 and r.headers["Content-Disposition"].startswith("attachment")
                rows = list(csv.DictReader(io.StringIO(await r.text())))
            await browser.get("/days/2001-01-01/clearing.csv", status=404)
        shop = next(r for r in rows if r["party"] == "MA0000000000001")
        assert shop["points_issued"] == "100" and rows[-1]["party"] == "TOTAL" and rows[-1]["net_fen"] == "0"
        audit = await day.fetch("SELECT actor FROM audit_log WHERE action = 'day.close'")
        assert [r["actor"] for r in audit] == ["closer"]


def test_operator_commands_read_the_password_from_standard_input_never_the_command_line(switch) -> None:
    env = {"POINTSWITCH_MASTER_KEY": switch.master_key_hex}
    name = f"cli{next(_names)}-{secrets.token_hex(3)}"
    db = ["--dsn", switch.dsn]
    literal = _cli("admin", "operator", "add", name, "--role", "admin", "--password", PASSWORD, *db, env=env,
                   check=False)
    assert literal.returncode != 0 and PASSWORD not in literal.stdout
    short = _cli("admin", "operator", "add", name, "--role", "admin", *db, env=env, stdin="short\n", check=False)
    assert short.returncode == 1 and "at least" in short.stderr
    _cli("admin", "operator", "add", name, "--role", "admin", *db, env=env, stdin=PASSWORD + "\n")
    listed = _cli("admin", "operator", "list", *db, env=env).stdout
    assert name in listed and PASSWORD not in listed
    _cli("admin", "operator", "disable", name, *db, env=env)
    stored = asyncio.run(fetch(switch.dsn, "SELECT password_hash, disabled FROM operators WHERE name = $1", name))[0]
    assert stored["disabled"] and stored["password_hash"].startswith("scrypt$") and PASSWORD not in stored[0]
    assert operators.password_matches(PASSWORD, stored["password_hash"])


def test_a_session_cookie_holds_only_while_its_signature_and_time_hold() -> None:
    keys, other = Keys(b"k" * 32), Keys(b"o" * 32)
    cookie = keys.issue(7, 3, expires_at=2_000.0)
    session = keys.session(cookie, now=1_000.0)
    assert session is not None and (session.operator_id, session.generation) == (7, 3)
    assert keys.session(cookie, now=2_000.0) is None, "expired"
    assert other.session(cookie, now=1_000.0) is None, "another key"
    payload, signature = cookie.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"o": 1, "g": 3, "e": 9_999, "n": "x"}).encode()).decode()
    assert keys.session(f"{forged.rstrip('=')}.{signature}", now=1_000.0) is None
    assert keys.token_valid(session.nonce, keys.form_token(session.nonce))
    assert not keys.token_valid(session.nonce, keys.form_token("another session"))
    assert not keys.token_valid(None, keys.form_token(session.nonce))


def test_charts_are_svg_with_escaped_labels() -> None:
    svg = charts.bars(["<b>", "b"], {"x": [3, 0]}, title="t & u")
    assert svg.startswith("<svg") and "&lt;b&gt;" in svg and "t &amp; u" in svg and svg.count("<rect") == 2
    assert "<svg" in charts.share({}, title="none") and "none" in charts.share({}, title="none")
