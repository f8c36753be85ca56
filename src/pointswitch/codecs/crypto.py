"""DES/3DES primitives for terminal security (PROTOCOL.md, Security). Pure functions.

- keys: single (8 bytes, DES), double (16 bytes, 3DES K1K2K1) or triple (24 bytes)
- key check value: first 4 bytes of the clear key encrypting eight zero bytes
- MAC, UnionPay POS "ECB" method (cup) and ANSI X9.19 retail MAC (iso87)
- PIN block ISO 9564 format 0
- track data encryption under a TDK (UnionPay convention, see ``encrypt_track``)
"""

from __future__ import annotations

import secrets

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes


class CryptoError(ValueError):
    pass


def _cipher(key: bytes) -> Cipher[modes.ECB]:
    if len(key) == 8:
        full = key * 3
    elif len(key) == 16:
        full = key + key[:8]  # two-key 3DES: K1 K2 K1
    elif len(key) == 24:
        full = key
    else:
        raise CryptoError(f"a DES key is 8, 16 or 24 bytes, not {len(key)}")
    return Cipher(TripleDES(full), modes.ECB())


def encrypt(key: bytes, data: bytes) -> bytes:
    """DES (8-byte key) or 3DES ECB over whole 8-byte blocks."""
    if len(data) % 8:
        raise CryptoError("ECB data must be whole 8-byte blocks")
    enc = _cipher(key).encryptor()
    return enc.update(data) + enc.finalize()


def decrypt(key: bytes, data: bytes) -> bytes:
    if len(data) % 8:
        raise CryptoError("ECB data must be whole 8-byte blocks")
    dec = _cipher(key).decryptor()
    return dec.update(data) + dec.finalize()


def with_odd_parity(key: bytes) -> bytes:
    """DES keys carry odd parity in the low bit of every byte."""
    out = bytearray()
    for b in key:
        b &= 0xFE
        out.append(b | (bin(b).count("1") % 2 == 0))
    return bytes(out)


def generate_key(length: int = 16) -> bytes:
    return with_odd_parity(secrets.token_bytes(length))


def check_value(key: bytes) -> bytes:
    """Key check value: the first 4 bytes of ``key`` encrypting eight zero bytes."""
    return encrypt(key, bytes(8))[:4]


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("XOR of blocks of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _zero_pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def mac_cup_ecb(mak: bytes, data: bytes) -> bytes:
    """UnionPay POS "ECB" MAC: returns the 8 ASCII bytes that travel in field 64.

    XOR all zero-padded 8-byte blocks into R; write R as 16 uppercase hex
    characters; encrypt the first 8 (as ASCII) with the MAK; XOR with the last
    8; encrypt again; the MAC is the first 8 characters of the uppercase hex of
    that block."""
    padded = _zero_pad(data)
    acc = 0
    for i in range(0, len(padded), 8):  # as integers: a message is some 20 blocks
        acc ^= int.from_bytes(padded[i : i + 8], "big")
    r_hex = acc.to_bytes(8, "big").hex().upper().encode("ascii")
    first = encrypt(mak, r_hex[:8])
    second = encrypt(mak, _xor(first, r_hex[8:]))
    return second.hex().upper()[:8].encode("ascii")


def mac_x919(key: bytes, data: bytes) -> bytes:
    """ANSI X9.19 retail MAC (ISO 9797-1 algorithm 3, padding method 1): single-DES
    CBC with K1 over the zero-padded data, then decrypt with K2 and encrypt with K1."""
    if len(key) != 16:
        raise CryptoError("an X9.19 MAC key is 16 bytes")
    k1, k2 = key[:8], key[8:]
    padded = _zero_pad(data) or bytes(8)
    block = bytes(8)
    for i in range(0, len(padded), 8):
        block = encrypt(k1, _xor(block, padded[i : i + 8]))
    return encrypt(k1, decrypt(k2, block))


def _pan_block(pan: str) -> bytes:
    """"0000" + the 12 rightmost digits of the card number without its check digit;
    a shorter number is padded on the left with zeros (ISO 9564-1), so a 12-digit
    card number gives "0" + its first 11 digits."""
    if not pan.isdigit() or not 12 <= len(pan) <= 19:
        raise CryptoError("a PIN block needs the card number (12 to 19 digits)")
    return bytes.fromhex("0000" + pan[:-1][-12:].rjust(12, "0"))


def pin_block_clear(pin: str, pan: str) -> bytes:
    """ISO 9564 format 0: (0, length, PIN, F padding) XOR (0000, 12 rightmost PAN
    digits without the check digit)."""
    if not pin.isdigit() or not 4 <= len(pin) <= 12:
        raise CryptoError("a PIN is 4 to 12 digits")
    pin_field = bytes.fromhex(f"0{len(pin):X}{pin}".ljust(16, "F"))
    return _xor(pin_field, _pan_block(pan))


def encrypt_pin_block(pik: bytes, pin: str, pan: str) -> bytes:
    return encrypt(pik, pin_block_clear(pin, pan))


def decrypt_pin_block(pik: bytes, block: bytes, pan: str) -> str:
    """The PIN inside an encrypted format 0 block; CryptoError if it is not one."""
    if len(block) != 8:
        raise CryptoError("a PIN block is 8 bytes")
    field = _xor(decrypt(pik, block), _pan_block(pan)).hex().upper()
    length = int(field[1], 16)
    pin = field[2 : 2 + length]
    padding = set(field[2 + length :])
    if field[0] != "0" or not 4 <= length <= 12 or not pin.isdigit() or padding - {"F"}:
        raise CryptoError("not an ISO 9564 format 0 PIN block")
    return pin


def encrypt_track(tdk: bytes, track: str) -> str:
    """Track data under a TDK (UnionPay convention): the 16 characters ending just
    before the last character, taken as 8 bytes (BCD, 'D'/'=' as nibble D), are
    replaced by their 3DES encryption in hex. Tracks shorter than 17 travel clear."""
    t = track.replace("=", "D").upper()
    if len(t) < 17:
        return t
    start = len(t) - 17
    block = encrypt(tdk, bytes.fromhex(t[start : start + 16]))
    return t[:start] + block.hex().upper() + t[-1]


def decrypt_track(tdk: bytes, track: str) -> str:
    t = track.upper()
    if len(t) < 17:
        return t
    start = len(t) - 17
    try:
        block = decrypt(tdk, bytes.fromhex(t[start : start + 16]))
    except ValueError as exc:
        raise CryptoError("track data is not hex") from exc
    return t[:start] + block.hex().upper() + t[-1]


def track2_pan(track: str) -> str:
    """The card number of a clear track 2 (digits before the separator)."""
    for sep in ("D", "="):
        if sep in track:
            return track.split(sep, 1)[0]
    return track
