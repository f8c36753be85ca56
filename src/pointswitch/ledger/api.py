"""The ledger's side of the JSON API (``web.api``): API terminals' keys and the
mapping of an ``Idempotency-Key`` onto the ledger's own request key.

An API terminal is a terminal row whose dialect is ``api`` (no ISO listener
admits it, so its trace numbers are the API's alone). Its key is random, shown
once, and kept sealed under the master key: the switch needs it in clear to
verify a signature, so it cannot be a one-way hash.

An ``Idempotency-Key`` is mapped, the first time it is seen, to a fresh trace
number of the terminal's open batch (table ``api_requests``). The request is
then an ordinary :class:`~.model.Posting` under ``RequestKey(terminal, batch,
trace)``: the request log's unique key and fingerprint decide, exactly as for an
ISO retransmission, whether it is the same request (answered from the log), a
different one under a taken key (94), or new. Two concurrent first requests
under one key draw the same mapping (the loser of the insert reads the winner's).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import asyncpg

from . import audit
from .errors import AdminError
from .model import Operation, RequestKey
from .vault import Vault

API_DIALECT = "api"
KEY_BYTES = 32
MAX_TRACE = 999_999

_MAPPED = "SELECT batch, trace FROM api_requests WHERE terminal_id = $1 AND idempotency_key = $2"

# One round trip: the key's mapping if it has one; else the next trace of the
# terminal's open batch is drawn (the api_traces row lock serialises the terminal's
# draws) and mapped to it. A concurrent first request under the same key waits for
# the other's insert and maps nothing (its drawn trace stays unused): the caller
# reads the winner's mapping. A trace past MAX_TRACE is drawn but not mapped ("full").
#
# The mapping commits asynchronously (synchronous_commit off for this transaction
# only): a posting made under it commits later, synchronously, and flushing the
# WAL up to that commit flushes the mapping too; so a crash can lose a mapping only
# together with everything posted under it, and then a retry draws a new one.
_MAP = """
WITH commit_mode AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS setting),
known AS (
    SELECT batch, trace FROM api_requests WHERE terminal_id = $1 AND idempotency_key = $2
), drawn AS (
    INSERT INTO api_traces (terminal_id, batch, last_trace)
    SELECT terminal_id, current_batch, 1 FROM terminals, commit_mode
    WHERE terminal_id = $1 AND NOT EXISTS (SELECT 1 FROM known)
    ON CONFLICT (terminal_id, batch) DO UPDATE SET last_trace = api_traces.last_trace + 1
    RETURNING batch, last_trace
), mapped AS (
    INSERT INTO api_requests (terminal_id, idempotency_key, batch, trace)
    SELECT $1, $2, batch, last_trace FROM drawn WHERE last_trace <= $3
    ON CONFLICT (terminal_id, idempotency_key) DO NOTHING
    RETURNING batch, trace
)
SELECT batch, trace, false AS full FROM known
UNION ALL SELECT batch, trace, false FROM mapped
UNION ALL SELECT batch, last_trace, true FROM drawn WHERE last_trace > $3
"""

_ORIGINAL = """
SELECT a.batch, a.trace, r.operation, r.state
FROM api_requests a
LEFT JOIN requests r ON r.request_key = a.terminal_id || ':' || lpad(a.batch::text, 6, '0') || ':'
                                        || lpad(a.trace::text, 6, '0')
WHERE a.terminal_id = $1 AND a.idempotency_key = $2
"""


class TracesExhausted(Exception):
    """The terminal's open batch has used every trace number: nothing can be posted in it."""


@dataclass(frozen=True)
class Original:
    """An earlier API request of the same terminal, found by its Idempotency-Key."""

    key: RequestKey
    operation: Operation | None  # None: mapped but never logged (nothing was posted under it)


def key_context(terminal_id: str, generation: int) -> str:
    return f"api-key:{terminal_id}:{generation}"


async def issue_api_key(con: asyncpg.Connection, vault: Vault, terminal_id: str) -> dict[str, object]:
    """Issue (or rotate) a terminal's API key and make it an API terminal. The key is
    returned once, here; the previous key stops working at once in the database (and
    within ``[api] key_cache_s`` in a running switch)."""
    async with con.transaction():
        row = await con.fetchrow("SELECT t.terminal_id, t.merchant_id, k.generation FROM terminals t"
                                 " LEFT JOIN api_keys k USING (terminal_id) WHERE t.terminal_id = $1 FOR UPDATE OF t",
                                 terminal_id)
        if row is None:
            raise AdminError(f"no terminal {terminal_id}")
        generation = (row["generation"] or 0) + 1
        key = secrets.token_bytes(KEY_BYTES)
        await con.execute(
            "INSERT INTO api_keys (terminal_id, generation, key_sealed) VALUES ($1, $2, $3)"
            " ON CONFLICT (terminal_id) DO UPDATE SET generation = $2, key_sealed = $3, issued_at = now()",
            terminal_id, generation, vault.seal(key, key_context(terminal_id, generation)))
        # Its ISO working keys are withdrawn: it speaks only the API from now on.
        await con.execute(
            "UPDATE terminals SET dialect = $2, mac_method = 'off', session_state = 'none', pik_sealed = NULL,"
            " mak_sealed = NULL, tdk_sealed = NULL WHERE terminal_id = $1", terminal_id, API_DIALECT)
        await con.execute("DELETE FROM terminal_pending_keys WHERE terminal_id = $1", terminal_id)
        await audit.record(con, "terminal.api_key", terminal_id, {"generation": generation})
    return {"terminal_id": terminal_id, "merchant_id": row["merchant_id"], "generation": generation,
            "api_key": key.hex()}


class ApiTerminals:
    """API terminals' keys and idempotency keys, for the web layer (no SQL there)."""

    def __init__(self, pool: asyncpg.Pool, vault: Vault, *, acquire_timeout_s: float = 10.0):
        self._pool = pool
        self._vault = vault
        self._acquire_timeout_s = acquire_timeout_s

    async def key(self, terminal_id: str) -> bytes | None:
        """The terminal's API key in clear (memory only), or None when it has none."""
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as con:
            row = await con.fetchrow("SELECT generation, key_sealed FROM api_keys WHERE terminal_id = $1",
                                     terminal_id)
        if row is None:
            return None
        return self._vault.open(row["key_sealed"], key_context(terminal_id, row["generation"]))

    async def request_key(self, terminal_id: str, idempotency_key: str) -> RequestKey:
        """The ledger request key an Idempotency-Key stands for: drawn the first time."""
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as con:
            row = await con.fetchrow(_MAP, terminal_id, idempotency_key, MAX_TRACE)
            if row is None:  # a concurrent request under the same key mapped it first (or no such terminal)
                row = await con.fetchrow(_MAPPED, terminal_id, idempotency_key)
        if row is None:
            raise AdminError(f"no terminal {terminal_id}")
        if row.get("full"):
            raise TracesExhausted(terminal_id)
        return RequestKey(terminal_id, row["batch"], row["trace"])

    async def original(self, terminal_id: str, idempotency_key: str) -> Original | None:
        """The request an earlier Idempotency-Key of this terminal was posted under."""
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as con:
            row = await con.fetchrow(_ORIGINAL, terminal_id, idempotency_key)
        if row is None:
            return None
        operation = Operation(row["operation"]) if row["operation"] in Operation._value2member_map_ else None
        return Original(RequestKey(terminal_id, row["batch"], row["trace"]), operation)
