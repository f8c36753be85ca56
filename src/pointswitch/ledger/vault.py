"""Keys at rest: sealed with AES-256-GCM under the operator's master key.

The associated data names what a blob is ("tmk:T0000001", "mak:T0000001:7"),
so a sealed key copied to another row or column does not open.

Below the master key sit the data keys (table ``vault_keys``): random 32-byte
keys, each sealed under the master key, created on first use and unsealed at
start-up. ``card_index`` keys the HMAC that turns a card number into the
database's lookup key, ``fingerprint`` the HMAC of request fingerprints, ``pvk``
is the PIN verification key, ``console_session`` signs the web console's session
cookies. Changing the master key therefore means
re-sealing these few rows (and the terminals' keys), never re-indexing cards.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_CHECK = b"pointswitch vault check"

# The data keys every database has: HMAC key of the card index, HMAC key of
# request fingerprints, PIN verification key, HMAC key of the console's session
# cookies and form tokens.
DATA_KEYS = ("card_index", "fingerprint", "pvk", "console_session")
_DATA_KEY_BYTES = 32


class VaultError(ValueError):
    """A master key that is missing, malformed or not the database's."""


class DataKeysNotLoaded(RuntimeError):
    """A data key was asked for before :meth:`Vault.load_data_keys` ran: a wiring bug."""


class Vault:
    def __init__(self, master_key: bytes):
        if len(master_key) not in (16, 32):
            raise VaultError("the master key is 16 or 32 bytes (32 or 64 hex digits)")
        self._aead = AESGCM(master_key)
        self._data_keys: dict[str, bytes] = {}

    def __repr__(self) -> str:  # never show the key
        return "Vault(<sealed>)"

    def seal(self, secret: bytes, context: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, secret, context.encode())

    def open(self, blob: bytes, context: str) -> bytes:
        try:
            return self._aead.decrypt(bytes(blob[:12]), bytes(blob[12:]), context.encode())
        except InvalidTag:
            raise VaultError(f"sealed value for {context.split(':')[0]} does not open under this master key") from None

    async def check_database(self, con: asyncpg.Connection) -> None:
        """Refuse a master key other than the one the database's keys are sealed under."""
        sealed = await con.fetchval("SELECT sealed FROM vault_check WHERE id = 1")
        if sealed is None:
            await con.execute(
                "INSERT INTO vault_check (id, sealed) VALUES (1, $1) ON CONFLICT DO NOTHING",
                self.seal(_CHECK, "vault-check"),
            )
            return
        try:
            ok = self.open(sealed, "vault-check") == _CHECK
        except VaultError:
            ok = False
        if not ok:
            raise VaultError("the master key is not the one this database's keys are sealed under")

    # -- data keys -------------------------------------------------------------
    async def load_data_keys(self, con: asyncpg.Connection) -> None:
        """Unseal the database's data keys, creating (and sealing) those it lacks.

        Safe when several processes start at once: the first insert wins and
        every process reads the winner's key back."""
        rows = {r["name"]: r["sealed"] for r in await con.fetch("SELECT name, sealed FROM vault_keys")}
        for name in DATA_KEYS:
            if name not in rows:
                await con.execute(
                    "INSERT INTO vault_keys (name, sealed) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                    name, self.seal(secrets.token_bytes(_DATA_KEY_BYTES), f"data-key:{name}"),
                )
                rows[name] = await con.fetchval("SELECT sealed FROM vault_keys WHERE name = $1", name)
        keys = {name: self.open(rows[name], f"data-key:{name}") for name in DATA_KEYS}
        if self._data_keys and self._data_keys != keys:
            # One vault serves one database: card indexes of two databases must not mix.
            raise VaultError("this vault already holds the data keys of another database")
        self._data_keys = keys

    def data_key(self, name: str) -> bytes:
        try:
            return self._data_keys[name]
        except KeyError:
            if name not in DATA_KEYS:
                raise KeyError(f"no data key {name!r}; the data keys are {', '.join(DATA_KEYS)}") from None
            raise DataKeysNotLoaded(
                "the vault's data keys are not loaded: call `await vault.load_data_keys(con)` after"
                " `vault.check_database(con)` (app.database does both)"
            ) from None

    def card_index(self, pan: str) -> str:
        """The card's lookup key in the database: HMAC-SHA256 of the card number, hex.

        Deterministic (so it can be looked up), and without the key not
        invertible even by trying every card number of a BIN."""
        return hmac.new(self.data_key("card_index"), pan.encode(), hashlib.sha256).hexdigest()

    def fingerprint(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the fingerprint key: what the request log stores."""
        return hmac.new(self.data_key("fingerprint"), data, hashlib.sha256).digest()


def parse_master_key(text: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise VaultError("the master key must be hex (32 or 64 hex digits)") from None
    if len(key) not in (16, 32):
        raise VaultError("the master key is 16 or 32 bytes (32 or 64 hex digits)")
    return key


def read_key_file(path: Path) -> bytes:
    try:
        return parse_master_key(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        raise VaultError(f"master key file {path} not found") from None


def generate_key_file(path: Path) -> bytes:
    """Write a new random 32-byte master key (hex) readable by its owner only."""
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
    return key
