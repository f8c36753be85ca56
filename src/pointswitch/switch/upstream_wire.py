"""What a connector checks and adds on the wire besides the codec. No asyncio here.

- :func:`tls_context`: the client side of TLS to a host (``tls``, ``tls_ca_file``,
  ``tls_cert_file``, ``tls_key_file``), verifying the host's certificate and name;
- :func:`read_mac_key` and :class:`Signer`: the optional X9.19 MAC of a connector.
  A request is signed in field 64, or in field 128 when it has fields above 64
  (a 0400 / 0420 carries 90, so its MAC goes in the secondary bitmap's last field);
  an answer must carry a valid MAC the same way;
- :func:`echo_mismatches`: the fields of an answer that do not echo its request.
"""

from __future__ import annotations

import functools
import hmac
import ssl
from collections.abc import Mapping
from pathlib import Path

from ..codecs import Dialect, Fields, Message, crypto
from ..config import ConfigError, ConnectorConfig

# An answer to a financial request or reversal must repeat these of its request
# (2 only when the request carried it); otherwise it is not that request's answer.
ECHO_REQUIRED = ("2", "4", "11", "37", "41")
# Requests the MAC covers, and the answers that must carry one.
SIGNED_REQUESTS = frozenset({"0200", "0400", "0420"})
SIGNED_ANSWERS = frozenset({"0210", "0410", "0430"})


def tls_context(cfg: ConnectorConfig) -> ssl.SSLContext | None:
    """The connector's TLS client context, or None without ``tls``."""
    if not cfg.tls:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls_ca_file or None)
        if cfg.tls_cert_file:
            context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"connector {cfg.name}: TLS files: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_server_name(cfg: ConnectorConfig) -> str | None:
    return (cfg.tls_server_name or cfg.host) if cfg.tls else None


def read_mac_key(path: str, what: str) -> bytes:
    """A 16-byte X9.19 key from a file of 32 hex digits."""
    try:
        key = bytes.fromhex(Path(path).expanduser().read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: mac_key_file: {exc}") from None
    if len(key) != 16:
        raise ConfigError(f"{what}: an X9.19 MAC key is 16 bytes (32 hex digits)")
    return key


class Signer:
    """X9.19 MAC of one key over iso87 messages (no envelope before the MTI)."""

    def __init__(self, key: bytes, dialect: Dialect):
        assert dialect.envelope_len == 0, "the MAC covers the message from its MTI: iso87 only"
        self._mac = functools.partial(crypto.mac_x919, key)
        self._dialect = dialect

    def encode(self, fields: Mapping[str, str]) -> bytes:
        """``fields`` encoded with the MAC in 64, or in 128 when a field above 64 is present."""
        if not _has_secondary(fields):
            return self._dialect.encode(fields, sign=self._mac)
        body = self._dialect.encode({**fields, "128": "00" * 8})
        data = body[: len(body) - self._dialect.mac_len]
        return data + self._dialect.render_mac(self._mac(data))

    def verify(self, message: Message, frame: bytes) -> bool:
        """Whether ``message`` (decoded from ``frame``) carries a valid MAC."""
        fields = message.fields
        if "128" in fields:
            data, value = frame[: len(frame) - self._dialect.mac_len], fields["128"]
        elif message.mac_data is not None and "64" in fields:
            data, value = message.mac_data, fields["64"]
        else:
            return False
        try:
            given = bytes.fromhex(value)
        except ValueError:
            return False
        return hmac.compare_digest(self._mac(data), given)


def _has_secondary(fields: Mapping[str, str]) -> bool:
    return any(k.isdigit() and int(k) > 64 for k in fields)


def echo_mismatches(request: Fields, answer: Fields) -> list[str]:
    """Fields of ``ECHO_REQUIRED`` that the request carried and the answer does not
    repeat (37 and 41 compared without trailing spaces)."""
    out = []
    for key in ECHO_REQUIRED:
        if key not in request:
            continue
        sent, got = request[key], answer.get(key)
        if key in ("37", "41"):
            sent, got = sent.rstrip(), got.rstrip() if got is not None else None
        if got != sent:
            out.append(key)
    return out
