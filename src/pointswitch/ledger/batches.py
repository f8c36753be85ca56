"""Terminal batches: settlement closes one, batch upload and its reconciliation follow.

The switch owns each terminal's batch (``terminals.current_batch``): a posting in
any other batch is refused (``decide.terminal_refusal``). A settlement, in one
transaction:

1. asks for the business date first (``business_date_now()``, as every posting
   transaction does before any row lock: lock order);
2. locks the terminal row FOR UPDATE, which conflicts with the KEY SHARE lock
   every posting transaction holds on it: the settlement waits for postings in
   flight, and a posting after it re-reads the row and sees the next batch;
3. adds up the host's totals of the batch from the request log, compares them
   with the terminal's, stores the settlement and its answer, and opens the next
   batch (999999 is followed by 1).

A terminal's newest settlement is "the batch just settled": a retransmitted
settlement (same batch, same trace) is answered from it, and the batch upload
that follows belongs to it. Uploaded card numbers are kept as card index and
masked number only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import date
from typing import Any

import asyncpg
import structlog

from . import gate
from .carddata import mask_card
from .core import _BUSINESS_DATE, LedgerCore, _now
from .model import BatchTotals, EndUpload, Outcome, SettleBatch, Status, UploadBatch

log = structlog.get_logger("pointswitch.ledger")

# Bounds of one settled batch's upload: a terminal reports at most 999 debits and
# 999 credits (counts are n3); anything past these is refused (61), not stored.
MAX_UPLOAD_RECORDS = 2_000
MAX_UPLOAD_MESSAGES = 300

# The settlement rule (docs/integrator.md): what a batch's debits and credits are.
DEBIT_OPERATIONS = ("accrue", "redeem", "cash_out", "insurance")
CREDIT_OPERATIONS = ("void_accrual", "void_redemption", "refund")

# Approved, not reversed, of one terminal and batch: what totals and reconciliation count.
_COUNTED = """
FROM requests r
WHERE r.terminal_id = $1 AND r.batch = $2 AND r.state = 'approved' AND r.reversed_at IS NULL
  AND r.operation = ANY($3::text[] || $4::text[])
"""

_TOTALS = f"""
SELECT coalesce(sum(r.amount_fen) FILTER (WHERE r.operation = ANY($3)), 0) AS debit_fen,
       count(*) FILTER (WHERE r.operation = ANY($3)) AS debit_count,
       coalesce(sum(r.amount_fen) FILTER (WHERE r.operation = ANY($4)), 0) AS credit_fen,
       count(*) FILTER (WHERE r.operation = ANY($4)) AS credit_count
{_COUNTED}
"""

_HOST_LINES = f"""
SELECT r.trace, r.operation, r.amount_fen, r.card_index,
       (SELECT c.pan_display FROM cards c WHERE c.card_index = r.card_index) AS card_display
{_COUNTED}
"""

_TERMINAL = """
SELECT t.current_batch, t.merchant_id, t.status, m.status AS merchant_status
FROM terminals t JOIN merchants m USING (merchant_id)
WHERE t.terminal_id = $1
FOR UPDATE OF t
"""

_LATEST = """
SELECT * FROM batch_settlements WHERE terminal_id = $1 ORDER BY settlement_id DESC LIMIT 1
"""

_INSERT_SETTLEMENT = """
INSERT INTO batch_settlements (terminal_id, merchant_id, batch, trace, business_date,
    terminal_debit_fen, terminal_debit_count, terminal_credit_fen, terminal_credit_count,
    host_debit_fen, host_debit_count, host_credit_fen, host_credit_count, agree, outcome)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
"""


def next_batch(batch: int) -> int:
    """The batch after ``batch``: 999999 is followed by 1."""
    return batch % 999_999 + 1


def _terminal_totals(row: asyncpg.Record) -> BatchTotals:
    return BatchTotals(row["terminal_debit_fen"], row["terminal_debit_count"],
                       row["terminal_credit_fen"], row["terminal_credit_count"])


def reconcile(host: dict[int, dict[str, Any]], uploaded: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per trace of either side. ``host`` and ``uploaded``: trace ->
    {card_index, card_display, amount_fen (, operation)}."""
    lines = []
    for trace in sorted(set(host) | set(uploaded)):
        h, u = host.get(trace), uploaded.get(trace)
        if h is None:
            kind = "terminal_only"
        elif u is None:
            kind = "host_only"
        elif h["card_index"] != u["card_index"]:
            kind = "card_differs"
        elif h["amount_fen"] != u["amount_fen"]:
            kind = "amount_differs"
        else:
            kind = "matched"
        lines.append({
            "trace": trace, "kind": kind, "operation": h["operation"] if h else None,
            "card": (u or h or {}).get("card_display"),
            "terminal_amount_fen": u["amount_fen"] if u else None,
            "host_amount_fen": h["amount_fen"] if h else None,
        })
    return lines


class BatchSteps(LedgerCore):
    async def _settle(self, cmd: SettleBatch) -> Outcome:
        async with self._transaction() as con:
            day: date = await con.fetchval(_BUSINESS_DATE)  # first, as every posting transaction: lock order
            terminal = await con.fetchrow(_TERMINAL, cmd.terminal_id)
            bad = self._refusal(terminal, cmd.merchant_id)
            if bad:
                return Outcome(bad, host_time=_now())
            assert terminal is not None
            if cmd.batch != terminal["current_batch"]:
                return await self._settled_already(con, cmd, terminal["current_batch"])
            gate.current().key_checked = True  # no earlier attempt of this settlement committed
            host = await self.batch_totals(con, cmd.terminal_id, cmd.batch)
            agree = host == cmd.totals
            outcome = Outcome(Status.APPROVED, batch=cmd.batch, host_time=_now(), business_date=day.isoformat(),
                              extra={"agree": agree, "host_totals": asdict(host)})
            t, h = cmd.totals, host
            await con.execute(
                _INSERT_SETTLEMENT, cmd.terminal_id, cmd.merchant_id, cmd.batch, cmd.trace, day,
                t.debit_amount_fen, t.debit_count, t.credit_amount_fen, t.credit_count,
                h.debit_amount_fen, h.debit_count, h.credit_amount_fen, h.credit_count, agree, outcome.to_json(),
            )
            await con.execute("UPDATE terminals SET current_batch = $2 WHERE terminal_id = $1",
                              cmd.terminal_id, next_batch(cmd.batch))
        log.info("batch settled", terminal=cmd.terminal_id, batch=cmd.batch, agree=agree,
                 business_date=day.isoformat(), next_batch=next_batch(cmd.batch))
        return outcome

    @staticmethod
    def _refusal(terminal: asyncpg.Record | None, merchant_id: str) -> Status | None:
        if terminal is None:
            return Status.UNKNOWN_TERMINAL
        if terminal["merchant_id"] != merchant_id or terminal["merchant_status"] != "active":
            return Status.WRONG_MERCHANT
        if terminal["status"] != "active":
            return Status.TERMINAL_DISABLED
        return None

    async def _settled_already(self, con: asyncpg.Connection, cmd: SettleBatch, current: int) -> Outcome:
        """A settlement of a batch that is not open: the retransmission of the one just
        made gets its answer again; anything else is a batch mismatch."""
        last = await con.fetchrow(_LATEST, cmd.terminal_id)
        gate.current().key_checked = True
        if last is None or last["batch"] != cmd.batch or last["trace"] != cmd.trace:
            log.warning("settlement of a batch that is not open", terminal=cmd.terminal_id, batch=cmd.batch,
                        current_batch=current)
            return Outcome(Status.BATCH_MISMATCH, host_time=_now())
        if _terminal_totals(last) != cmd.totals:
            return Outcome(Status.DUPLICATE_KEY, host_time=_now())
        return Outcome.from_json(last["outcome"])

    @staticmethod
    async def batch_totals(con: asyncpg.Connection, terminal_id: str, batch: int) -> BatchTotals:
        row = await con.fetchrow(_TOTALS, terminal_id, batch, list(DEBIT_OPERATIONS), list(CREDIT_OPERATIONS))
        return BatchTotals(int(row["debit_fen"]), int(row["debit_count"]), int(row["credit_fen"]),
                           int(row["credit_count"]))

    # -- batch upload ------------------------------------------------------------------
    async def _upload_message(self, con: asyncpg.Connection, cmd: UploadBatch | EndUpload, kind: str,
                              fingerprint: bytes) -> tuple[asyncpg.Record | None, Outcome | None]:
        """The settlement an upload message belongs to (locked), or the answer when there
        is nothing to do: not the batch just settled (77), or a retransmission."""
        settlement = await con.fetchrow(_LATEST + " FOR UPDATE", cmd.terminal_id)
        if settlement is None or settlement["batch"] != cmd.batch or settlement["merchant_id"] != cmd.merchant_id:
            return None, Outcome(Status.BATCH_MISMATCH, host_time=_now())
        seen = await con.fetchrow(
            "SELECT kind, fingerprint, outcome FROM batch_upload_messages WHERE settlement_id = $1 AND trace = $2",
            settlement["settlement_id"], cmd.trace,
        )
        gate.current().key_checked = True
        if seen is not None:
            same = seen["kind"] == kind and bytes(seen["fingerprint"]) == fingerprint
            return None, Outcome.from_json(seen["outcome"]) if same else Outcome(Status.DUPLICATE_KEY, host_time=_now())
        return settlement, None

    async def _remember(self, con: asyncpg.Connection, settlement_id: int, cmd: UploadBatch | EndUpload, kind: str,
                        fingerprint: bytes, outcome: Outcome) -> None:
        await con.execute(
            "INSERT INTO batch_upload_messages (settlement_id, trace, kind, fingerprint, outcome)"
            " VALUES ($1, $2, $3, $4, $5)", settlement_id, cmd.trace, kind, fingerprint, outcome.to_json(),
        )

    async def _upload(self, cmd: UploadBatch) -> Outcome:
        indexed = [(r.trace, r.card_organisation, self._vault.card_index(r.card_number), mask_card(r.card_number),
                    r.amount_fen) for r in cmd.records]
        fingerprint = self._vault.fingerprint(hashlib.sha256(json.dumps(
            [(t, org, index, amount) for t, org, index, _shown, amount in indexed]).encode()).digest())
        async with self._transaction() as con:
            settlement, answer = await self._upload_message(con, cmd, "records", fingerprint)
            if answer is not None:
                return answer
            assert settlement is not None
            if settlement["upload_ended_at"] is not None:
                return Outcome(Status.ORIGINAL_NOT_ELIGIBLE, host_time=_now())  # the upload is over
            if (settlement["upload_messages"] >= MAX_UPLOAD_MESSAGES
                    or settlement["upload_records"] + len(indexed) > MAX_UPLOAD_RECORDS):
                log.warning("batch upload past its bounds", terminal=cmd.terminal_id, batch=cmd.batch)
                return Outcome(Status.LIMIT_EXCEEDED, host_time=_now())
            sid = settlement["settlement_id"]
            stored = await con.fetchval(
                "WITH added AS (INSERT INTO batch_upload_records (settlement_id, trace, card_organisation,"
                " card_index, card_display, amount_fen) SELECT $1, * FROM unnest($2::int[], $3::text[], $4::text[],"
                " $5::text[], $6::bigint[]) ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM added",
                sid, *[list(column) for column in zip(*indexed, strict=True)] if indexed else ([],) * 5,
            )
            await con.execute(
                "UPDATE batch_settlements SET upload_messages = upload_messages + 1,"
                " upload_records = upload_records + $2 WHERE settlement_id = $1", sid, stored,
            )
            outcome = Outcome(Status.APPROVED, batch=cmd.batch, host_time=_now(), extra={"records_stored": stored})
            await self._remember(con, sid, cmd, "records", fingerprint, outcome)
        return outcome

    async def _end_upload(self, cmd: EndUpload) -> Outcome:
        fingerprint = self._vault.fingerprint(f"end:{cmd.records_sent}:{cmd.terminal_agreed}".encode())
        async with self._transaction() as con:
            settlement, answer = await self._upload_message(con, cmd, "end", fingerprint)
            if answer is not None:
                return answer
            assert settlement is not None
            sid = settlement["settlement_id"]
            if settlement["upload_ended_at"] is not None:  # reconciled once; a later end changes nothing
                outcome = Outcome(Status.APPROVED, batch=cmd.batch, host_time=_now(),
                                  extra={"reconciliation": json.loads(settlement["reconciliation"])})
                await self._remember(con, sid, cmd, "end", fingerprint, outcome)
                return outcome
            lines = await self._reconcile(con, sid, cmd)
            counts = {kind: sum(1 for line in lines if line["kind"] == kind)
                      for kind in ("matched", "terminal_only", "host_only", "amount_differs", "card_differs")}
            await con.executemany(
                "INSERT INTO batch_reconciliation (settlement_id, trace, kind, operation, card_display,"
                " terminal_amount_fen, host_amount_fen) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                [(sid, line["trace"], line["kind"], line["operation"], line["card"], line["terminal_amount_fen"],
                  line["host_amount_fen"]) for line in lines],
            )
            await con.execute(
                "UPDATE batch_settlements SET upload_ended_at = now(), upload_records_sent = $2, terminal_agreed = $3,"
                " reconciliation = $4 WHERE settlement_id = $1",
                sid, cmd.records_sent, cmd.terminal_agreed, json.dumps(counts),
            )
            outcome = Outcome(Status.APPROVED, batch=cmd.batch, host_time=_now(), extra={"reconciliation": counts})
            await self._remember(con, sid, cmd, "end", fingerprint, outcome)
        log.info("batch upload reconciled", terminal=cmd.terminal_id, batch=cmd.batch,
                 records_sent=cmd.records_sent, records_received=settlement["upload_records"], **counts)
        return outcome

    async def _reconcile(self, con: asyncpg.Connection, settlement_id: int, cmd: EndUpload) -> list[dict[str, Any]]:
        host_rows = await con.fetch(_HOST_LINES, cmd.terminal_id, cmd.batch, list(DEBIT_OPERATIONS),
                                    list(CREDIT_OPERATIONS))
        uploaded_rows = await con.fetch(
            "SELECT trace, card_index, card_display, amount_fen FROM batch_upload_records WHERE settlement_id = $1",
            settlement_id,
        )
        return reconcile({r["trace"]: dict(r) for r in host_rows}, {r["trace"]: dict(r) for r in uploaded_rows})


# -- operators' queries (no SQL outside the ledger) -----------------------------------------
def _settlement_view(row: asyncpg.Record) -> dict[str, Any]:
    def totals(side: str) -> dict[str, int]:
        return {"debit_amount_fen": row[f"{side}_debit_fen"], "debit_count": row[f"{side}_debit_count"],
                "credit_amount_fen": row[f"{side}_credit_fen"], "credit_count": row[f"{side}_credit_count"]}

    return {
        "terminal": row["terminal_id"], "merchant": row["merchant_id"], "batch": row["batch"],
        "trace": row["trace"], "business_date": row["business_date"].isoformat(),
        "settled_at": row["settled_at"].isoformat(timespec="seconds"),
        "terminal_totals": totals("terminal"), "host_totals": totals("host"), "agree": row["agree"],
        "upload": {
            "messages": row["upload_messages"], "records": row["upload_records"],
            "ended_at": row["upload_ended_at"].isoformat(timespec="seconds") if row["upload_ended_at"] else None,
            "records_sent": row["upload_records_sent"], "terminal_agreed": row["terminal_agreed"],
            "reconciliation": json.loads(row["reconciliation"]) if row["reconciliation"] else None,
        },
    }


async def list_settlements(con: asyncpg.Connection, *, terminal_id: str | None = None,
                           business_date: date | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Settlements, newest first, of one terminal and/or one business date."""
    rows = await con.fetch(
        "SELECT * FROM batch_settlements WHERE ($1::text IS NULL OR terminal_id = $1)"
        " AND ($2::date IS NULL OR business_date = $2) ORDER BY settlement_id DESC LIMIT $3",
        terminal_id, business_date, limit,
    )
    return [_settlement_view(r) for r in rows]


async def show_settlement(con: asyncpg.Connection, terminal_id: str, batch: int) -> dict[str, Any] | None:
    """A terminal's newest settlement of ``batch``, with its reconciliation lines (masked cards)."""
    row = await con.fetchrow(
        "SELECT * FROM batch_settlements WHERE terminal_id = $1 AND batch = $2 ORDER BY settlement_id DESC LIMIT 1",
        terminal_id, batch,
    )
    if row is None:
        return None
    view = _settlement_view(row)
    lines = await con.fetch(
        "SELECT trace, kind, operation, card_display, terminal_amount_fen, host_amount_fen"
        " FROM batch_reconciliation WHERE settlement_id = $1 ORDER BY trace", row["settlement_id"],
    )
    view["lines"] = [{"trace": r["trace"], "kind": r["kind"], "operation": r["operation"], "card": r["card_display"],
                      "terminal_amount_fen": r["terminal_amount_fen"], "host_amount_fen": r["host_amount_fen"]}
                     for r in lines]
    return view
