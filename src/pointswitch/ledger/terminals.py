"""Terminal working keys: sign-on issues them, a verified message promotes them,
sign-off and MAC abuse withdraw them; and what a session is made of.

A sign-on never replaces the keys in use. It issues a *pending* set, kept per
peer address (the newest per peer, at most ``max_pending`` per terminal, none
older than ``pending_ttl_s``); the first message that verifies under a pending
MAK promotes that set and forgets the others. A peer that knows only a terminal
id can therefore create keys nobody uses, and nothing more: the real terminal
keeps working with its keys, or with the ones its own sign-on asked for.

Every key is sealed at rest under the vault; the associated data names the
terminal and key generation, so a sealed key copied elsewhere does not open.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import structlog

from ..codecs import crypto
from . import gate
from .model import (
    DropSession,
    KeyExchange,
    KeyScheme,
    Outcome,
    PromoteKeys,
    Session,
    SignOn,
    Status,
    TerminalAuth,
    TerminalProfile,
    WrappedKey,
)
from .vault import Vault, VaultError

log = structlog.get_logger("pointswitch.ledger")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


_KEY_LENGTHS = {  # scheme -> (PIK, MAK, TDK) lengths in bytes; a double-length MAK doubles the second
    KeyScheme.SINGLE: (8, 8, 0),
    KeyScheme.DOUBLE: (16, 8, 0),
    KeyScheme.DOUBLE_WITH_TRACK: (16, 8, 16),
}

_TERMINAL = """
SELECT t.terminal_id, t.merchant_id, t.status, t.dialect, t.mac_method, t.double_mak, t.single_des_allowed,
       t.session_state, t.key_scheme, t.key_generation, t.pik_sealed, t.mak_sealed, t.tdk_sealed,
       m.status AS merchant_status
FROM terminals t JOIN merchants m USING (merchant_id)
WHERE t.terminal_id = $1
"""

_PENDING = """
SELECT generation, key_scheme, pik_sealed, mak_sealed, tdk_sealed FROM terminal_pending_keys
WHERE terminal_id = $1 AND created_at > now() - make_interval(secs => $2)
ORDER BY generation DESC
"""


class TerminalKeys:
    def __init__(self, pool: asyncpg.Pool, vault: Vault, *, max_pending: int = 4, pending_ttl_s: float = 300.0,
                 acquire_timeout_s: float = 10.0):
        self._pool = pool
        self._vault = vault
        self.max_pending = max_pending
        self.pending_ttl_s = pending_ttl_s
        self.acquire_timeout_s = acquire_timeout_s

    # -- reading -----------------------------------------------------------------
    async def load(self, terminal_id: str) -> TerminalAuth | None:
        """A terminal's status, profile and unsealed keys (in use and pending); None
        when there is no such terminal."""
        # One snapshot: a promotion committing between the two reads must not hide both sets.
        async with self._pool.acquire() as con, con.transaction(isolation="repeatable_read", readonly=True):
            row = await con.fetchrow(_TERMINAL, terminal_id)
            if row is None:
                return None
            pending_rows = await con.fetch(_PENDING, terminal_id, self.pending_ttl_s)
        profile = TerminalProfile(row["dialect"], row["mac_method"], row["double_mak"], row["single_des_allowed"])
        current = None
        if row["session_state"] == "signed_on" and row["mak_sealed"] is not None:
            current = self._open(terminal_id, row["key_generation"], row["key_scheme"], row, pending=False)
        pending = tuple(
            s for s in (self._open(terminal_id, p["generation"], p["key_scheme"], p, pending=True)
                        for p in pending_rows) if s is not None
        )
        return TerminalAuth(
            terminal_id, row["merchant_id"], row["status"] == "active", row["merchant_status"] == "active",
            profile, current, pending,
        )

    def _open(self, terminal_id: str, generation: int, scheme: str, row: asyncpg.Record, *, pending: bool
              ) -> Session | None:
        def unseal(kind: str) -> bytes:
            return self._vault.open(row[f"{kind}_sealed"], f"{kind}:{terminal_id}:{generation}")

        try:
            return Session(KeyScheme(scheme), generation, unseal("pik"), unseal("mak"),
                           unseal("tdk") if row["tdk_sealed"] is not None else None, pending=pending)
        except VaultError:
            log.error("working keys do not open under the master key", terminal=terminal_id, generation=generation)
            return None

    # -- sign-on -----------------------------------------------------------------
    async def sign_on(self, cmd: SignOn) -> Outcome:
        """Issue fresh working keys, sealed at rest, wrapped under the TMK for the terminal."""
        async with gate.transaction(self._pool, acquire_timeout_s=self.acquire_timeout_s) as con:
            row = await con.fetchrow(
                "SELECT tmk_sealed, keys_issued, current_batch, double_mak FROM terminals"
                " WHERE terminal_id = $1 FOR UPDATE", cmd.terminal_id,
            )
            if row is None:
                return Outcome(Status.UNKNOWN_TERMINAL, host_time=_now())
            if row["tmk_sealed"] is None:
                log.warning("sign-on refused: terminal has no master key", terminal=cmd.terminal_id)
                return Outcome(Status.NO_MASTER_KEY, host_time=_now())
            tmk = self._vault.open(row["tmk_sealed"], f"tmk:{cmd.terminal_id}")
            generation = row["keys_issued"] + 1
            pik_len, mak_len, tdk_len = _KEY_LENGTHS[cmd.scheme]
            if row["double_mak"] and cmd.scheme is not KeyScheme.SINGLE:
                mak_len = 16
            keys = {"pik": crypto.generate_key(pik_len), "mak": crypto.generate_key(mak_len)}
            if tdk_len:
                keys["tdk"] = crypto.generate_key(tdk_len)
            sealed = {k: self._vault.seal(v, f"{k}:{cmd.terminal_id}:{generation}") for k, v in keys.items()}
            await con.execute("UPDATE terminals SET keys_issued = $2 WHERE terminal_id = $1",
                              cmd.terminal_id, generation)
            if cmd.activate:
                await self._make_current(con, cmd.terminal_id, generation, cmd.scheme.value,
                                         sealed["pik"], sealed["mak"], sealed.get("tdk"))
            else:
                await self._add_pending(con, cmd, generation, sealed)

        def wrap(key: bytes) -> WrappedKey:
            return WrappedKey(crypto.encrypt(tmk, key), crypto.check_value(key))

        exchange = KeyExchange(
            cmd.scheme, wrap(keys["pik"]), wrap(keys["mak"]), wrap(keys["tdk"]) if "tdk" in keys else None
        )
        log.info("terminal signed on", terminal=cmd.terminal_id, generation=generation, scheme=cmd.scheme.value,
                 pending=not cmd.activate, peer=cmd.peer)
        return Outcome(Status.APPROVED, batch=row["current_batch"], host_time=_now(), key_exchange=exchange)

    async def _add_pending(self, con: asyncpg.Connection, cmd: SignOn, generation: int,
                           sealed: dict[str, bytes]) -> None:
        """The newest set per peer; at most ``max_pending`` per terminal; none past its time."""
        await con.execute(
            "DELETE FROM terminal_pending_keys WHERE terminal_id = $1"
            " AND (peer = $2 OR created_at <= now() - make_interval(secs => $3))",
            cmd.terminal_id, cmd.peer, self.pending_ttl_s,
        )
        await con.execute(
            "INSERT INTO terminal_pending_keys (terminal_id, generation, peer, key_scheme, pik_sealed, mak_sealed,"
            " tdk_sealed) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            cmd.terminal_id, generation, cmd.peer, cmd.scheme.value, sealed["pik"], sealed["mak"], sealed.get("tdk"),
        )
        await con.execute(
            "DELETE FROM terminal_pending_keys WHERE terminal_id = $1 AND generation NOT IN ("
            " SELECT generation FROM terminal_pending_keys WHERE terminal_id = $1"
            " ORDER BY generation DESC LIMIT $2)",
            cmd.terminal_id, self.max_pending,
        )

    @staticmethod
    async def _make_current(con: asyncpg.Connection, terminal_id: str, generation: int, scheme: str,
                            pik: bytes, mak: bytes, tdk: bytes | None) -> None:
        await con.execute(
            "UPDATE terminals SET pik_sealed = $2, mak_sealed = $3, tdk_sealed = $4, key_scheme = $5,"
            " key_generation = $6, session_state = 'signed_on', signed_on_at = now()"
            " WHERE terminal_id = $1",
            terminal_id, pik, mak, tdk, scheme, generation,
        )
        await con.execute("DELETE FROM terminal_pending_keys WHERE terminal_id = $1 AND generation <= $2",
                          terminal_id, generation)

    @contextlib.asynccontextmanager
    async def _session_transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """Promoting or withdrawing keys is not the request's own write: it is neither
        refused nor counted by the request's write gate (its answer does not depend on it)."""
        async with self._pool.acquire(timeout=self.acquire_timeout_s) as con, con.transaction():
            yield con

    async def promote(self, cmd: PromoteKeys) -> Outcome:
        """Pending keys a message verified under become the keys in use. A set that is
        gone meanwhile (promoted by another process, or past its time) is not revived."""
        async with self._session_transaction() as con:
            row = await con.fetchrow(
                "DELETE FROM terminal_pending_keys WHERE terminal_id = $1 AND generation = $2"
                " RETURNING key_scheme, pik_sealed, mak_sealed, tdk_sealed", cmd.terminal_id, cmd.generation,
            )
            if row is None:
                current = await con.fetchval("SELECT key_generation FROM terminals WHERE terminal_id = $1"
                                             " AND session_state = 'signed_on'", cmd.terminal_id)
                ok = current == cmd.generation
                return Outcome(Status.APPROVED if ok else Status.NOT_SIGNED_ON, host_time=_now())
            await self._make_current(con, cmd.terminal_id, cmd.generation, row["key_scheme"],
                                     row["pik_sealed"], row["mak_sealed"], row["tdk_sealed"])
        log.info("working keys in use", terminal=cmd.terminal_id, generation=cmd.generation)
        return Outcome(Status.APPROVED, host_time=_now())

    async def drop(self, cmd: DropSession) -> Outcome:
        async with self._session_transaction() as con:
            await con.execute(
                "UPDATE terminals SET signed_off_at = now(), session_state = 'signed_off',"
                " pik_sealed = NULL, mak_sealed = NULL, tdk_sealed = NULL WHERE terminal_id = $1",
                cmd.terminal_id,
            )
            await con.execute("DELETE FROM terminal_pending_keys WHERE terminal_id = $1", cmd.terminal_id)
        log.info("working keys withdrawn", terminal=cmd.terminal_id, reason=cmd.reason)
        return Outcome(Status.APPROVED, host_time=_now())
