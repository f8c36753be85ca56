"""The operator console in a real browser: Playwright driving the system's headless
Chromium (Debian's ``chromium`` package; Playwright's own browser download is not
used). An operator signs in, finds a card, blocks it, sees a terminal declined 62
over TCP, unblocks it, closes the business day and downloads its clearing file.

Skipped, saying why, where Chromium or the ``playwright`` package is missing.
With ``POINTSWITCH_SCREENSHOTS=DIR`` it leaves a screenshot of each screen there.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
from pathlib import Path

import pytest

from pointswitch.ledger import operators

from .conftest import SwitchUnderTest
from .test_business_day import CARD, day_switch

CHROMIUM = os.environ.get("POINTSWITCH_CHROMIUM", "/usr/bin/chromium")
# No sandbox (tests run as root in containers), no GPU, and nothing that phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery staple"

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install -y chromium)"
           " or point POINTSWITCH_CHROMIUM at one",
)
async_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed"
                                " (it is in the test extra: pip install -e '.[test]')")


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("POINTSWITCH_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def test_an_operator_blocks_a_card_in_the_browser_the_terminal_declines_it_and_the_day_closes(
        switch: SwitchUnderTest, tmp_path: Path) -> None:
    shots = _shots(tmp_path)
    async with day_switch(switch, tmp_path) as day:
        async with day.running.pool.acquire() as con:
            await operators.add_operator(con, "wang.li", "operator", operators.hash_password(PASSWORD))
            await operators.add_operator(con, "chen.admin", "admin", operators.hash_password(PASSWORD))
        async with day.terminal("TDA00001", "MA0000000000001") as shop, \
                day.terminal("TDB00001", "MB0000000000002") as other:
            for amount in (12_800, 5_600, 30_000):
                assert (await shop.accrue(CARD, amount)).rc == "00"
            assert (await other.redeem(CARD, 200)).rc == "00"
        assert day.running.web is not None and day.running.web.bound is not None
        host, port = day.running.web.bound
        base = f"http://{host}:{port}/console"

        async with async_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page(accept_downloads=True, viewport={"width": 1280, "height": 900})
                refused: list[str] = []  # what the browser refused to run or load (CSP, errors)
                page.on("console", lambda m: refused.append(m.text) if m.type == "error" else None)

                await page.goto(base + "/")
                assert page.url == base + "/login"
                await page.screenshot(path=str(shots / "01-login.png"))
                await page.fill("input[name=name]", "wang.li")
                await page.fill("input[name=password]", PASSWORD)
                await page.click("button[type=submit]")
                await page.wait_for_url(base + "/")
                # htmx is loaded and allowed to run: the live part asks for itself again.
                async with page.expect_request(lambda r: r.url.endswith("/overview/live"), timeout=15_000):
                    pass
                await page.screenshot(path=str(shots / "02-overview.png"), full_page=True)

                await page.click("nav >> text=Cards")
                await page.fill("input[name=card_number]", CARD)
                await page.click("button:has-text('Find')")
                await page.wait_for_selector("#card-number")
                assert await page.text_content("#card-number") == f"{CARD[:6]}******{CARD[-4:]}"
                assert CARD not in await page.content()
                await page.click("#block")
                await page.wait_for_selector("text=Card blocked.")
                assert await page.text_content("#card-status") == "blocked"
                await page.screenshot(path=str(shots / "03-card-blocked.png"), full_page=True)
                async with day.terminal("TDA00002", "MA0000000000001") as till:
                    assert (await till.accrue(CARD, 1000)).rc == "62"
                    await page.click("#unblock")
                    await page.wait_for_selector("text=Card unblocked.")
                    assert (await till.accrue(CARD, 1000)).rc == "00"
                    assert (await till.settle()).rc == "00"  # its batch, for the batches screen
                await page.screenshot(path=str(shots / "04-card.png"), full_page=True)

                await page.goto(base + "/merchants/MA0000000000001")
                await page.wait_for_selector("svg.chart")
                await page.screenshot(path=str(shots / "05-merchant.png"), full_page=True)
                await page.click("a:has-text('TDA00001')")
                await page.wait_for_selector("#terminal-status")
                await page.screenshot(path=str(shots / "06-terminal.png"), full_page=True)

                await page.click("nav >> text=Business days")
                await page.click("#close-day")
                await page.wait_for_selector("text=Business day closed.")
                await page.screenshot(path=str(shots / "07-day-closed.png"), full_page=True)
                async with page.expect_download() as info:
                    await page.click("#clearing-csv")
                download = await info.value
                text = await asyncio.to_thread(Path(await download.path()).read_text, encoding="utf-8")
                assert download.suggested_filename.startswith("clearing-")

                for name, path in (("08-days", "/days"), ("09-batches", "/batches"),
                                   ("09-batch", "/batches/TDA00002/1"), ("10-reversals", "/reversals"),
                                   ("11-audit", "/audit"), ("12-merchants", "/merchants")):
                    await page.goto(base + path)
                    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
                await page.click("button:has-text('Sign out')")
                await page.wait_for_url(base + "/login")
                await page.fill("input[name=name]", "chen.admin")  # an admin manages the operators
                await page.fill("input[name=password]", PASSWORD)
                await page.click("button[type=submit]")
                await page.wait_for_url(base + "/")
                await page.click("nav >> text=Operators")
                await page.wait_for_selector("#operators")
                await page.screenshot(path=str(shots / "13-operators.png"), full_page=True)
            finally:
                await browser.close()

    rows = list(csv.DictReader(io.StringIO(text)))
    issuer = next(r for r in rows if r["party"] == "MA0000000000001")
    assert issuer["points_issued"] == str(128 + 56 + 300 + 10)  # the accrual while blocked was declined
    assert rows[-1]["party"] == "TOTAL" and rows[-1]["net_fen"] == "0"
    assert not [m for m in refused if "Content Security Policy" in m or "Refused" in m], refused
