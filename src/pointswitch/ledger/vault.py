"""Keys at rest: sealed with AES-256-GCM under the operator's master key.

The associated data names what a blob is ("tmk:T0000001", "mak:T0000001:7"),
so a sealed key copied to another row or column does not open.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_CHECK = b"pointswitch vault check"


class VaultError(ValueError):
    """A master key that is missing, malformed or not the database's."""


class Vault:
    def __init__(self, master_key: bytes):
        if len(master_key) not in (16, 32):
            raise VaultError("the master key is 16 or 32 bytes (32 or 64 hex digits)")
        self._aead = AESGCM(master_key)

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
