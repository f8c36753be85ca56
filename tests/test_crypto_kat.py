"""Known-answer tests for the terminal security primitives (PROTOCOL.md, Security).

Every expected value here is computed from the algorithms' definitions, not from the
``cryptography`` library that ``pointswitch.codecs.crypto`` uses: a small pure-Python
DES built from the FIPS 46-3 tables (checked first against published vectors), 2-key
3DES-EDE on top of it, and the MAC, PIN block, check value, track and field 62 rules
written out step by step from their text.
"""

from __future__ import annotations

import random

import pytest

from pointswitch.codecs import crypto
from pointswitch.codecs.subfields import KeyBlock, parse_62, render_62

# -- reference DES (FIPS 46-3) ------------------------------------------------------
# Bit positions are numbered 1..n from the most significant bit, as in the standard.
IP = [58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
      62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
      57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
      61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7]  # fmt: skip
FP = [40, 8, 48, 16, 56, 24, 64, 32, 39, 7, 47, 15, 55, 23, 63, 31,
      38, 6, 46, 14, 54, 22, 62, 30, 37, 5, 45, 13, 53, 21, 61, 29,
      36, 4, 44, 12, 52, 20, 60, 28, 35, 3, 43, 11, 51, 19, 59, 27,
      34, 2, 42, 10, 50, 18, 58, 26, 33, 1, 41, 9, 49, 17, 57, 25]  # fmt: skip
E = [32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9,
     8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17,
     16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25,
     24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1]  # fmt: skip
P = [16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
     2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25]  # fmt: skip
PC1 = [57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18,
       10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
       63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
       14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4]  # fmt: skip
PC2 = [14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10,
       23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
       41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48,
       44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32]  # fmt: skip
SHIFTS = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1]
# S1..S8, each 4 rows of 16 written as one string of hex digits per row.
SBOXES = [
    ["E4D12FB83A6C5907", "0F74E2D1A6CB9538", "41E8D62BFC973A50", "FC8249175B3EA06D"],
    ["F18E6B34972DC05A", "3D47F28EC01A69B5", "0E7BA4D158C6932F", "D8A13F42B67C05E9"],
    ["A09E63F51DC7B428", "D709346A285ECBF1", "D6498F30B12C5AE7", "1AD069874FE3B52C"],
    ["7DE3069A1285BC4F", "D8B56F03472C1AE9", "A690CB7DF13E5284", "3F06A1D8945BC72E"],
    ["2C417AB6853FD0E9", "EB2C47D150FA3986", "421BAD78F9C5630E", "B8C71E2D6F09A453"],
    ["C1AF92680D34E75B", "AF427C9561DE0B38", "9EF528C3704A1DB6", "432C95FABE17608D"],
    ["4B2EF08D3C975A61", "D0B7491AE35C2F86", "14BDC37EAF680592", "6BD814A7950FE23C"],
    ["D2846FB1A93E50C7", "1FD8A374C56B0E92", "7B419CE206ADF358", "21E74A8DFC90356B"],
]
_S = [[int(c, 16) for row in box for c in row] for box in SBOXES]


def _permute(value: int, table: list[int], width: int) -> int:
    out = 0
    for pos in table:
        out = (out << 1) | ((value >> (width - pos)) & 1)
    return out


def _subkeys(key: bytes) -> list[int]:
    cd = _permute(int.from_bytes(key, "big"), PC1, 64)
    c, d = cd >> 28, cd & 0xFFFFFFF
    keys = []
    for s in SHIFTS:
        c = ((c << s) | (c >> (28 - s))) & 0xFFFFFFF
        d = ((d << s) | (d >> (28 - s))) & 0xFFFFFFF
        keys.append(_permute((c << 28) | d, PC2, 56))
    return keys


def _f(r: int, k: int) -> int:
    x = _permute(r, E, 32) ^ k
    out = 0
    for i in range(8):
        six = (x >> (42 - 6 * i)) & 0x3F
        row = ((six >> 4) & 2) | (six & 1)
        col = (six >> 1) & 0xF
        out = (out << 4) | _S[i][row * 16 + col]
    return _permute(out, P, 32)


def des_block(key: bytes, block: bytes, decrypt: bool = False) -> bytes:
    assert len(key) == 8 and len(block) == 8
    keys = _subkeys(key)
    if decrypt:
        keys.reverse()
    b = _permute(int.from_bytes(block, "big"), IP, 64)
    left, right = b >> 32, b & 0xFFFFFFFF
    for k in keys:
        left, right = right, left ^ _f(right, k)
    return _permute((right << 32) | left, FP, 64).to_bytes(8, "big")


def ref_des(key: bytes, data: bytes, decrypt: bool = False) -> bytes:
    """Single DES, ECB over whole blocks."""
    return b"".join(des_block(key, data[i : i + 8], decrypt) for i in range(0, len(data), 8))


def ref_tdes(key: bytes, data: bytes, decrypt: bool = False) -> bytes:
    """3DES-EDE, ECB. 8-byte key: single DES; 16 bytes: K1 K2 K1; 24 bytes: K1 K2 K3."""
    if len(key) == 8:
        return ref_des(key, data, decrypt)
    k1, k2 = key[:8], key[8:16]
    k3 = key[16:24] if len(key) == 24 else k1
    if decrypt:
        return ref_des(k1, ref_des(k2, ref_des(k3, data, True)), True)
    return ref_des(k3, ref_des(k2, ref_des(k1, data), True))


def xor(a: bytes, b: bytes) -> bytes:
    assert len(a) == len(b)
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


H = bytes.fromhex


# -- the reference itself, on published vectors -----------------------------------
@pytest.mark.parametrize(
    ("key", "plain", "cipher"),
    [
        # the classic worked example (J. Orlin Grabbe, "The DES Algorithm Illustrated")
        ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),
        # FIPS 81 (NBS) ECB example: "Now is the time for all "
        ("0123456789ABCDEF", "4E6F772069732074", "3FA40E8A984D4815"),
        ("0123456789ABCDEF", "68652074696D6520", "6A271787AB8883F9"),
        ("0123456789ABCDEF", "666F7220616C6C20", "893D51EC4B563B53"),
        # all-zero and all-one keys
        ("0000000000000000", "0000000000000000", "8CA64DE9C1B123A7"),
        ("FFFFFFFFFFFFFFFF", "FFFFFFFFFFFFFFFF", "7359B2163E4EDC58"),
    ],
)
def test_reference_des_matches_published_vectors(key: str, plain: str, cipher: str) -> None:
    assert des_block(H(key), H(plain)).hex().upper() == cipher
    assert des_block(H(key), H(cipher), decrypt=True).hex().upper() == plain


def test_reference_sboxes_are_permutations() -> None:
    for box in _S:
        for row in range(4):
            assert sorted(box[16 * row : 16 * row + 16]) == list(range(16))


def test_reference_tdes_with_k1_equal_k2_is_single_des() -> None:
    # E(K) D(K) E(K) = E(K): a sanity check of the EDE composition.
    key = H("0123456789ABCDEF")
    assert ref_tdes(key + key, H("4E6F772069732074")) == H("3FA40E8A984D4815")


# -- crypto.encrypt / decrypt -------------------------------------------------------
def _random_cases(n: int, key_len: int, seed: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    return [(rng.randbytes(key_len), rng.randbytes(8 * rng.randint(1, 3))) for _ in range(n)]


@pytest.mark.parametrize("key_len", [8, 16, 24])
def test_encrypt_and_decrypt_equal_the_reference(key_len: int) -> None:
    for key, data in _random_cases(24, key_len, seed=key_len):
        expected = ref_tdes(key, data)
        assert crypto.encrypt(key, data) == expected
        assert crypto.decrypt(key, expected) == data
        assert ref_tdes(key, expected, decrypt=True) == data


def test_encrypt_with_a_double_length_key_is_k1_k2_k1() -> None:
    k1, k2 = H("0123456789ABCDEF"), H("FEDCBA9876543210")
    block = H("4E6F772069732074")
    by_hand = des_block(k1, des_block(k2, des_block(k1, block), decrypt=True))
    assert crypto.encrypt(k1 + k2, block) == by_hand


def test_encrypt_rejects_bad_key_and_data_lengths() -> None:
    with pytest.raises(crypto.CryptoError):
        crypto.encrypt(bytes(12), bytes(8))
    with pytest.raises(crypto.CryptoError):
        crypto.encrypt(bytes(16), bytes(7))
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt(bytes(16), bytes(9))


# -- key check value ------------------------------------------------------------------
# PROTOCOL.md: "the first 4 bytes of the clear key encrypting eight zero bytes".
@pytest.mark.parametrize(
    "key_hex",
    ["0123456789ABCDEF", "0123456789ABCDEFFEDCBA9876543210", "404142434445464748494A4B4C4D4E4F"],
)
def test_check_value_is_first_four_bytes_of_zero_block_encrypted(key_hex: str) -> None:
    key = H(key_hex)
    assert crypto.check_value(key) == ref_tdes(key, bytes(8))[:4]
    assert len(crypto.check_value(key)) == 4


def test_check_value_of_single_length_key_is_plain_des() -> None:
    # DES(0123456789ABCDEF, 0000000000000000) = D5D44FF720683D0D
    assert des_block(H("0123456789ABCDEF"), bytes(8)) == H("D5D44FF720683D0D")
    assert crypto.check_value(H("0123456789ABCDEF")) == H("D5D44FF7")


# -- cup MAC ("ECB" method of UnionPay POS) --------------------------------------------
def cup_mac_by_the_text(mak: bytes, data: bytes) -> bytes:
    """PROTOCOL.md, Security, one sentence per line."""
    padded = data + bytes(-len(data) % 8)  # pad with zero bytes to a multiple of 8
    r = bytes(8)
    for i in range(0, len(padded), 8):  # XOR all 8-byte blocks into one block R
        r = xor(r, padded[i : i + 8])
    r_hex = r.hex().upper().encode("ascii")  # R as 16 uppercase hex characters
    first = ref_tdes(mak, r_hex[:8])  # encrypt the first 8 (as ASCII bytes) with the MAK
    second = ref_tdes(mak, xor(first, r_hex[8:]))  # XOR with the last 8; encrypt again
    return second.hex().upper()[:8].encode("ascii")  # first 8 hex characters, as ASCII


# A purchase-shaped cup message from the MTI up to field 64 (bit 64 already set in the
# bitmap): MTI 0200, bitmap 3020000000000001 (fields 3, 4, 11, 64), field 3 000000,
# field 4 000000001000, field 11 000123 -- 22 bytes, so two zero bytes of padding.
CUP_MSG = H("0200 3020000000000001 000000 000000001000 000123")
CUP_MAK = H("0123456789ABCDEF")  # single length, as field 62 delivers it


def test_cup_mac_fully_worked_vector() -> None:
    # MAK            0123456789ABCDEF  (DES)
    # data (22 bytes) 02003020000000000001000000000000001000000123
    # padded, 3 blocks:
    #   0200302000000000
    #   0001000000000000
    #   0010000001230000  (last two bytes are padding)
    # R = XOR of the blocks            0211302001230000
    # R as hex characters              "0211302001230000"
    #   first 8 as ASCII               3032313133303230  ("02113020")
    #   last 8 as ASCII                3031323330303030  ("01230000")
    # DES(MAK, first 8)                82BB8891BF6192B5
    # XOR last 8                       B28ABAA28F51A285
    # DES(MAK, that)                   92E6826421119838
    # MAC = first 8 hex characters     "92E68264" = 3932453638323634 in field 64
    assert len(CUP_MSG) == 22
    padded = CUP_MSG + bytes(2)
    blocks = [padded[0:8], padded[8:16], padded[16:24]]
    assert [b.hex().upper() for b in blocks] == ["0200302000000000", "0001000000000000", "0010000001230000"]
    r = xor(xor(blocks[0], blocks[1]), blocks[2])
    assert r == H("0211302001230000")
    assert des_block(CUP_MAK, b"02113020") == H("82BB8891BF6192B5")
    assert xor(H("82BB8891BF6192B5"), b"01230000") == H("B28ABAA28F51A285")
    assert des_block(CUP_MAK, H("B28ABAA28F51A285")) == H("92E6826421119838")
    assert cup_mac_by_the_text(CUP_MAK, CUP_MSG) == b"92E68264"

    assert crypto.mac_cup_ecb(CUP_MAK, CUP_MSG) == b"92E68264"
    assert crypto.mac_cup_ecb(CUP_MAK, CUP_MSG).hex().upper() == "3932453638323634"


@pytest.mark.parametrize(
    "data_hex",
    [
        "",  # nothing: R is eight zero bytes
        "0800",  # shorter than a block
        "0200302000000000 0001000000000000",  # a multiple of 8: no padding at all
        "0200702406C020C0981900000000000000000000000001000000123456",  # 29 bytes, 3 of padding
        "0200 3020000000000001 000000 000000001000 000123 00",  # 23 bytes
    ],
)
def test_cup_mac_equals_the_protocol_text(data_hex: str) -> None:
    data = H(data_hex)
    expected = cup_mac_by_the_text(CUP_MAK, data)
    mac = crypto.mac_cup_ecb(CUP_MAK, data)
    assert mac == expected
    assert len(mac) == 8 and mac.decode("ascii") == mac.decode("ascii").upper()
    assert all(c in b"0123456789ABCDEF" for c in mac)


def test_cup_mac_zero_padding_is_implicit() -> None:
    # Padding with zero bytes means trailing zero bytes do not change the MAC.
    assert crypto.mac_cup_ecb(CUP_MAK, CUP_MSG) == crypto.mac_cup_ecb(CUP_MAK, CUP_MSG + bytes(2))


def test_cup_mac_depends_on_every_block() -> None:
    for i in range(len(CUP_MSG)):
        tampered = bytearray(CUP_MSG)
        tampered[i] ^= 0x01
        assert crypto.mac_cup_ecb(CUP_MAK, bytes(tampered)) != b"92E68264"


def test_cup_mac_with_a_double_length_mak_uses_3des() -> None:
    # Not in PROTOCOL.md (the MAK is single length there): the implementation passes a
    # 16-byte MAK to 3DES (K1 K2 K1) in both encrypt steps.
    mak = H("0123456789ABCDEFFEDCBA9876543210")
    assert crypto.mac_cup_ecb(mak, CUP_MSG) == cup_mac_by_the_text(mak, CUP_MSG)


# -- ANSI X9.19 retail MAC (iso87) -----------------------------------------------------
def x919_by_hand(key: bytes, data: bytes) -> bytes:
    k1, k2 = key[:8], key[8:]
    padded = data + bytes(-len(data) % 8) or bytes(8)  # zero padding; empty data is one zero block
    block = bytes(8)
    for i in range(0, len(padded), 8):  # single-DES CBC under K1, zero IV
        block = des_block(k1, xor(block, padded[i : i + 8]))
    return des_block(k1, des_block(k2, block, decrypt=True))  # last block: D(K2), then E(K1)


@pytest.mark.parametrize(
    ("key", "data", "mac"),
    [
        # ISO/IEC 9797-1 example key and data, MAC algorithm 3, padding method 1
        ("0123456789ABCDEFFEDCBA9876543210", b"Now is the time for all ", "A1C72E74EA3FA9B6"),
        # third-party vectors (Bouncy Castle ISO9797Alg3MacTest; pyemv mac_iso9797_3, padding 1)
        ("7CA110454A1A6E570131D9619DC1376E", b"Hello World !!!!", "F09B856213BAB83B"),
        ("AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBB", b"hello world", "78DA3D3DEB48FD4D"),
    ],
)
def test_x919_published_vectors(key: str, data: bytes, mac: str) -> None:
    assert x919_by_hand(H(key), data).hex().upper() == mac
    assert crypto.mac_x919(H(key), data).hex().upper() == mac


def test_x919_equals_the_reference_on_many_lengths() -> None:
    rng = random.Random(919)
    key = rng.randbytes(16)
    for n in [0, 1, 7, 8, 9, 15, 16, 17, 40, 63]:
        data = rng.randbytes(n)
        assert crypto.mac_x919(key, data) == x919_by_hand(key, data), n


def test_x919_with_k1_equal_k2_is_plain_cbc_mac() -> None:
    # With K1 = K2 the final D(K2)/E(K1) cancels: the result is the single-DES CBC-MAC.
    k = H("0123456789ABCDEF")
    data = b"Now is the time for all "
    block = bytes(8)
    for i in range(0, 24, 8):
        block = des_block(k, xor(block, data[i : i + 8]))
    assert block == H("70A30640CC76DD8B")  # FIPS 113 / ISO 9797-1 algorithm 1 example
    assert crypto.mac_x919(k + k, data) == block


def test_x919_needs_a_double_length_key() -> None:
    with pytest.raises(crypto.CryptoError):
        crypto.mac_x919(bytes(8), b"data")
    with pytest.raises(crypto.CryptoError):
        crypto.mac_x919(bytes(24), b"data")


# -- PIN block, ISO 9564 format 0 ------------------------------------------------------
PIK = H("0123456789ABCDEFFEDCBA9876543210")


def test_pin_block_fully_worked_vector() -> None:
    # PIN 1234, PAN 4111111111111111
    # PIN field: 0, length 4, PIN, F padding          041234FFFFFFFFFF
    # PAN field: 0000 + 12 rightmost digits without
    #            the check digit ("111111111111")     0000111111111111
    # clear PIN block = PIN field XOR PAN field       041225EEEEEEEEEE
    # PIK = 0123456789ABCDEFFEDCBA9876543210 (K1 = 0123456789ABCDEF, K2 = FEDCBA9876543210)
    # DES encrypt with K1                             C30C31411AA3D043
    # DES decrypt with K2                             D3264CDE6F005A09
    # DES encrypt with K1 = field 52                  2A3D408A1977DDE9
    pin_field, pan_field = H("041234FFFFFFFFFF"), H("0000111111111111")
    assert xor(pin_field, pan_field) == H("041225EEEEEEEEEE")
    assert crypto.pin_block_clear("1234", "4111111111111111") == H("041225EEEEEEEEEE")

    k1, k2 = PIK[:8], PIK[8:]
    step1 = des_block(k1, H("041225EEEEEEEEEE"))
    assert step1 == H("C30C31411AA3D043")
    step2 = des_block(k2, step1, decrypt=True)
    assert step2 == H("D3264CDE6F005A09")
    assert des_block(k1, step2) == H("2A3D408A1977DDE9")
    assert crypto.encrypt_pin_block(PIK, "1234", "4111111111111111") == H("2A3D408A1977DDE9")
    assert crypto.decrypt_pin_block(PIK, H("2A3D408A1977DDE9"), "4111111111111111") == "1234"


def test_pin_block_six_digits_nineteen_digit_pan() -> None:
    # PIN field 06123456FFFFFFFF; PAN 6222021234567890123 -> 12 digits "123456789012"
    # PAN field 0000123456789012; XOR -> 06122662A9876FED
    assert xor(H("06123456FFFFFFFF"), H("0000123456789012")) == H("06122662A9876FED")
    assert crypto.pin_block_clear("123456", "6222021234567890123") == H("06122662A9876FED")
    encrypted = crypto.encrypt_pin_block(PIK, "123456", "6222021234567890123")
    assert encrypted == ref_tdes(PIK, H("06122662A9876FED"))
    assert crypto.decrypt_pin_block(PIK, encrypted, "6222021234567890123") == "123456"


@pytest.mark.parametrize("pik_hex", ["0123456789ABCDEF", "0123456789ABCDEFFEDCBA9876543210"])
@pytest.mark.parametrize(
    ("pin", "pan"), [("1234", "4111111111111111"), ("987654321098", "6222021234567890123"), ("0000", "1234567890123")]
)
def test_pin_block_under_single_and_double_length_pik(pik_hex: str, pin: str, pan: str) -> None:
    pik = H(pik_hex)
    pin_field = H(f"0{len(pin):X}{pin}".ljust(16, "F"))
    pan_field = H("0000" + pan[-13:-1])
    expected = ref_tdes(pik, xor(pin_field, pan_field))
    assert crypto.encrypt_pin_block(pik, pin, pan) == expected
    assert crypto.decrypt_pin_block(pik, expected, pan) == pin


PAN = "4111111111111111"
PAN_FIELD = H("0000111111111111")


@pytest.mark.parametrize(
    "pin_field_hex",
    [
        "141234FFFFFFFFFF",  # format 1, not 0
        "031234FFFFFFFFFF",  # PIN length 3
        "0D1234567890123F",  # PIN length 13
        "041234FFFFFFFFFE",  # padding not all F
        "04123AFFFFFFFFFF",  # PIN not digits
        "041234FF00FFFFFF",  # zeros inside the padding
    ],
)
def test_decrypt_pin_block_rejects_a_malformed_block(pin_field_hex: str) -> None:
    block = ref_tdes(PIK, xor(H(pin_field_hex), PAN_FIELD))
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt_pin_block(PIK, block, PAN)


def test_decrypt_pin_block_rejects_wrong_length_and_wrong_pan() -> None:
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt_pin_block(PIK, H("2A3D408A1977DD"), PAN)
    # Under another PAN the field comes out as 041225EEEEEEEEEE: E padding, not F.
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt_pin_block(PIK, H("2A3D408A1977DDE9"), "4000000000000002")


@pytest.mark.parametrize(
    ("pin", "pan"),
    [("123", PAN), ("1234567890123", PAN), ("12a4", PAN), ("1234", "41111111111"), ("1234", "41111111111x1111"),
     ("1234", "41111111111111111111")],
)
def test_pin_block_clear_rejects_bad_pin_or_pan(pin: str, pan: str) -> None:
    with pytest.raises(crypto.CryptoError):
        crypto.pin_block_clear(pin, pan)


def test_a_12_digit_card_number_is_padded_on_the_left_in_the_pan_field() -> None:
    """ISO 9564-1 format 0: the 12 rightmost digits without the check digit, padded
    on the left with zeros when there are fewer: "0" + the first 11 digits."""
    # PIN field 041234FFFFFFFFFF XOR PAN field 0000041234567890 (PAN 412345678901, check digit 1 dropped)
    assert crypto.pin_block_clear("1234", "412345678901") == H("041230EDCBA9876F")
    block = crypto.encrypt_pin_block(PIK, "1234", "412345678901")
    assert crypto.decrypt_pin_block(PIK, block, "412345678901") == "1234"


# -- track data under the TDK ----------------------------------------------------------
# PROTOCOL.md does not describe track encryption; this follows the UnionPay convention
# documented on crypto.encrypt_track: the 16 characters ending just before the last
# character ('=' written as nibble D) are replaced by their 3DES encryption in hex.
TDK = H("404142434445464748494A4B4C4D4E4F")


def test_track2_encryption_by_hand() -> None:
    track = "6222021234567890123=2512101123456789"  # 36 characters
    t = track.replace("=", "D")
    assert len(t) == 36
    head, clear16, last = t[:19], t[19:35], t[35]
    assert (head, clear16, last) == ("6222021234567890123", "D251210112345678", "9")
    encrypted = ref_tdes(TDK, H(clear16)).hex().upper()
    assert crypto.encrypt_track(TDK, track) == head + encrypted + last
    assert crypto.decrypt_track(TDK, head + encrypted + last) == t


def test_track2_encryption_of_a_short_track_covers_part_of_the_pan() -> None:
    track = "4111111111111111D2512101"  # 24 characters: the block starts inside the PAN
    start = len(track) - 17
    encrypted = track[:start] + ref_tdes(TDK, H(track[start : start + 16])).hex().upper() + track[-1]
    assert crypto.encrypt_track(TDK, track.replace("D", "=")) == encrypted
    assert crypto.decrypt_track(TDK, encrypted) == track
    assert crypto.track2_pan(crypto.decrypt_track(TDK, encrypted)) == "4111111111111111"


def test_track2_of_exactly_17_characters_encrypts_all_but_the_last() -> None:
    track = "12345678901234567"
    assert crypto.encrypt_track(TDK, track) == ref_tdes(TDK, H(track[:16])).hex().upper() + "7"


def test_track2_shorter_than_17_travels_clear() -> None:
    assert crypto.encrypt_track(TDK, "1234567890123=25") == "1234567890123D25"
    assert crypto.decrypt_track(TDK, "1234567890123D25") == "1234567890123D25"


def test_decrypt_track_rejects_non_hex() -> None:
    with pytest.raises(crypto.CryptoError):
        crypto.decrypt_track(TDK, "6222021234567890123XYZ1210112345678")


@pytest.mark.parametrize(
    ("track", "pan"),
    [
        ("6222021234567890123=2512101123456789", "6222021234567890123"),
        ("4111111111111111D2512101", "4111111111111111"),
        ("4111111111111111", "4111111111111111"),
    ],
)
def test_track2_pan(track: str, pan: str) -> None:
    assert crypto.track2_pan(track) == pan


# -- field 62: working keys in the sign-on response --------------------------------------
TMK = H("0123456789ABCDEFFEDCBA9876543210")
CLEAR_PIK8 = H("1C1C1C1C1C1C1C1C")
CLEAR_PIK16 = H("1C1C1C1C1C1C1C1C2A2A2A2A2A2A2A2A")
CLEAR_MAK = H("3D3D3D3D3D3D3D3D")
CLEAR_TDK = H("4C4C4C4C4C4C4C4C5D5D5D5D5D5D5D5D")


def wrapped(key: bytes) -> tuple[bytes, bytes]:
    """(key under the TMK with 3DES-ECB, check value of the clear key)."""
    return ref_tdes(TMK, key), ref_tdes(key, bytes(8))[:4]


def block_of(key: bytes) -> KeyBlock:
    under, check = wrapped(key)
    return KeyBlock(under, check)


def test_key_wrapping_under_the_tmk_equals_the_reference() -> None:
    for key in (CLEAR_PIK8, CLEAR_PIK16, CLEAR_MAK, CLEAR_TDK):
        under, check = wrapped(key)
        assert crypto.encrypt(TMK, key) == under
        assert crypto.decrypt(TMK, under) == key
        assert crypto.check_value(key) == check


def test_field_62_layout_001() -> None:
    # PIK (8) + check (4) + MAK (8) + check (4) = 24 bytes
    pik_under, pik_check = wrapped(CLEAR_PIK8)
    mak_under, mak_check = wrapped(CLEAR_MAK)
    expected = pik_under + pik_check + mak_under + mak_check
    assert len(expected) == 24
    # TMK 0123456789ABCDEFFEDCBA9876543210, PIK 1C1C1C1C1C1C1C1C, MAK 3D3D3D3D3D3D3D3D
    assert expected == H("0988B74AD3BE6469 77800CBA 667500C1075ADBE9 46D327DA")
    assert render_62("001", block_of(CLEAR_PIK8), block_of(CLEAR_MAK)) == expected
    pik, mak, tdk = parse_62("001", expected)
    assert (pik.under_tmk, pik.check_value) == (pik_under, pik_check)
    assert (mak.under_tmk, mak.check_value) == (mak_under, mak_check)
    assert tdk is None
    assert ref_tdes(TMK, pik.under_tmk, decrypt=True) == CLEAR_PIK8
    assert ref_tdes(TMK, mak.under_tmk, decrypt=True) == CLEAR_MAK


def test_field_62_layout_003() -> None:
    # PIK (16) + check (4) + MAK (8) + eight zero bytes + check (4) = 40 bytes
    pik_under, pik_check = wrapped(CLEAR_PIK16)
    mak_under, mak_check = wrapped(CLEAR_MAK)
    expected = pik_under + pik_check + mak_under + bytes(8) + mak_check
    assert len(expected) == 40
    # PIK 1C1C1C1C1C1C1C1C2A2A2A2A2A2A2A2A, MAK 3D3D3D3D3D3D3D3D
    assert expected == H("0988B74AD3BE646978CB827313F316ED B2924360 667500C1075ADBE9 0000000000000000 46D327DA")
    assert expected[28:36] == bytes(8)
    assert render_62("003", block_of(CLEAR_PIK16), block_of(CLEAR_MAK)) == expected
    pik, mak, tdk = parse_62("003", expected)
    assert (pik.under_tmk, pik.check_value) == (pik_under, pik_check)
    assert (mak.under_tmk, mak.check_value) == (mak_under, mak_check)
    assert tdk is None
    assert crypto.check_value(ref_tdes(TMK, pik.under_tmk, decrypt=True)) == pik.check_value
    assert crypto.check_value(ref_tdes(TMK, mak.under_tmk, decrypt=True)) == mak.check_value


def test_field_62_layout_004() -> None:
    # PROTOCOL.md only says "004 double-length + track key"; the layout below is the one
    # documented in subfields.py: as 003, then TDK (16) + check (4) = 60 bytes.
    pik_under, pik_check = wrapped(CLEAR_PIK16)
    mak_under, mak_check = wrapped(CLEAR_MAK)
    tdk_under, tdk_check = wrapped(CLEAR_TDK)
    expected = pik_under + pik_check + mak_under + bytes(8) + mak_check + tdk_under + tdk_check
    assert len(expected) == 60
    # TDK 4C4C4C4C4C4C4C4C5D5D5D5D5D5D5D5D
    assert expected[40:] == H("F5B4525600550D0A696764B156D50717 3FEA8205")
    assert render_62("004", block_of(CLEAR_PIK16), block_of(CLEAR_MAK), block_of(CLEAR_TDK)) == expected
    pik, mak, tdk = parse_62("004", expected)
    assert (pik.under_tmk, pik.check_value) == (pik_under, pik_check)
    assert (mak.under_tmk, mak.check_value) == (mak_under, mak_check)
    assert tdk is not None and (tdk.under_tmk, tdk.check_value) == (tdk_under, tdk_check)
    assert ref_tdes(TMK, tdk.under_tmk, decrypt=True) == CLEAR_TDK


def test_check_value_of_the_classic_double_length_test_key() -> None:
    # 3DES(0123456789ABCDEFFEDCBA9876543210, 0000000000000000) = 08D7B4FB629D0885
    assert ref_tdes(TMK, bytes(8)) == H("08D7B4FB629D0885")
    assert crypto.check_value(TMK) == H("08D7B4FB")


@pytest.mark.parametrize(("code", "size"), [("001", 24), ("003", 40), ("004", 60)])
def test_parse_62_rejects_the_wrong_length(code: str, size: int) -> None:
    for n in (size - 1, size + 1, 0):
        with pytest.raises(ValueError):
            parse_62(code, bytes(n))


def test_render_62_for_004_needs_a_tdk() -> None:
    with pytest.raises(ValueError):
        render_62("004", block_of(CLEAR_PIK16), block_of(CLEAR_MAK))
