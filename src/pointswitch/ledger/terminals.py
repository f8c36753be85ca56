"""Terminal working keys: sign-on issues them, sign-off withdraws them, a session reads them.

Every key is sealed at rest under the vault; the associated data names the
terminal and key generation, so a sealed key copied elsewhere does not open.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
import structlog

from ..codecs import crypto
from .model import (
    Command,
    GetSession,
    KeyExchange,
    KeyScheme,
    Outcome,
    Session,
    SignOff,
    SignOn,
    Status,
    WrappedKey,
)
from .vault import Vault, VaultError

log = structlog.get_logger("pointswitch.ledger")

ContextFn = Callable[[asyncpg.Connection, Command, str | None], Awaitable[asyncpg.Record | Outcome]]


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


_KEY_LENGTHS = {  # scheme -> (PIK, MAK, TDK) lengths in bytes
    KeyScheme.SINGLE: (8, 8, 0),
    KeyScheme.DOUBLE: (16, 8, 0),
    KeyScheme.DOUBLE_WITH_TRACK: (16, 8, 16),
}



class TerminalKeys:
    def __init__(self, pool: asyncpg.Pool, vault: Vault, context: ContextFn):
        self._pool = pool
        self._vault = vault
        self._context = context

    async def sign_on(self, cmd: SignOn) -> Outcome:
        """Issue fresh working keys, sealed at rest, wrapped under the TMK for the terminal."""
        pik_len, mak_len, tdk_len = _KEY_LENGTHS[cmd.scheme]
        async with self._pool.acquire() as con, con.transaction():
            ctx = await self._context(con, cmd, None)
            if isinstance(ctx, Outcome):
                return ctx
            row = await con.fetchrow(
                "SELECT tmk_sealed, key_generation FROM terminals WHERE terminal_id = $1 FOR UPDATE",
                cmd.terminal_id,
            )
            if row["tmk_sealed"] is None:
                log.warning("sign-on refused: terminal has no master key", terminal=cmd.terminal_id)
                return Outcome(Status.NO_MASTER_KEY, host_time=_now())
            tmk = self._vault.open(row["tmk_sealed"], f"tmk:{cmd.terminal_id}")
            generation = row["key_generation"] + 1
            keys = {"pik": crypto.generate_key(pik_len), "mak": crypto.generate_key(mak_len)}
            if tdk_len:
                keys["tdk"] = crypto.generate_key(tdk_len)
            sealed = {k: self._vault.seal(v, f"{k}:{cmd.terminal_id}:{generation}") for k, v in keys.items()}
            batch = await con.fetchval(
                "UPDATE terminals SET pik_sealed = $2, mak_sealed = $3, tdk_sealed = $4, key_scheme = $5,"
                " key_generation = $6, session_state = 'signed_on', signed_on_at = now()"
                " WHERE terminal_id = $1 RETURNING current_batch",
                cmd.terminal_id, sealed["pik"], sealed["mak"], sealed.get("tdk"), cmd.scheme.value, generation,
            )

        def wrap(key: bytes) -> WrappedKey:
            return WrappedKey(crypto.encrypt(tmk, key), crypto.check_value(key))

        exchange = KeyExchange(
            cmd.scheme, wrap(keys["pik"]), wrap(keys["mak"]), wrap(keys["tdk"]) if "tdk" in keys else None
        )
        log.info("terminal signed on", terminal=cmd.terminal_id, generation=generation, scheme=cmd.scheme.value)
        return Outcome(Status.APPROVED, batch=batch, host_time=_now(), key_exchange=exchange)

    async def sign_off(self, cmd: SignOff) -> Outcome:
        async with self._pool.acquire() as con:
            ctx = await self._context(con, cmd, None)
            if isinstance(ctx, Outcome):
                return ctx
            await con.execute(
                "UPDATE terminals SET signed_off_at = now(), session_state = 'signed_off',"
                " pik_sealed = NULL, mak_sealed = NULL, tdk_sealed = NULL WHERE terminal_id = $1",
                cmd.terminal_id,
            )
        return Outcome(Status.APPROVED, host_time=_now())

    async def session(self, cmd: GetSession) -> Outcome:
        async with self._pool.acquire() as con:
            ctx = await self._context(con, cmd, None)
        if isinstance(ctx, Outcome):
            return ctx
        if ctx["session_state"] != "signed_on" or ctx["mak_sealed"] is None:
            return Outcome(Status.NOT_SIGNED_ON, host_time=_now())
        generation = ctx["key_generation"]

        def unseal(kind: str) -> bytes:
            return self._vault.open(ctx[f"{kind}_sealed"], f"{kind}:{cmd.terminal_id}:{generation}")

        try:
            session = Session(
                KeyScheme(ctx["key_scheme"]), generation, unseal("pik"), unseal("mak"),
                unseal("tdk") if ctx["tdk_sealed"] is not None else None,
            )
        except VaultError:
            log.error("working keys do not open under the master key", terminal=cmd.terminal_id)
            return Outcome(Status.NOT_SIGNED_ON, host_time=_now())
        return Outcome(Status.APPROVED, host_time=_now(), session=session)
