"""TLS and an X9.19 MAC per connector, against a bank simulator that serves TLS and
signs its answers. Certificates are made here, for the test's life only."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pointswitch.codecs import crypto

from .conftest import SwitchUnderTest
from .test_upstream import BANK_CARD, world_of

HOST_NAME = "bank.test"  # the only name in the host's certificate; the switch dials 127.0.0.1


class _Authority:
    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (_builder(subject, subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(ski, critical=False)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, folder: Path, name: str, usage: x509.ObjectIdentifier) -> tuple[str, str]:
        """A certificate for ``name`` and its key, as PEM files in ``folder``."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (_builder(subject, self.cert.subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_path), str(key_path)

    def save(self, path: Path) -> str:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return str(path)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1)))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = _Authority("Test Bank CA"), _Authority("Someone Else's CA")
    host_cert, host_key = ca.issue(folder, HOST_NAME, ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = ca.issue(folder, "pointswitch", ExtendedKeyUsageOID.CLIENT_AUTH)
    return {"ca": ca.save(folder / "ca.crt"), "other_ca": other.save(folder / "other.crt"),
            "host_cert": host_cert, "host_key": host_key, "client_cert": client_cert, "client_key": client_key}


def _tls_bank(pki: dict[str, str]) -> dict[str, str]:
    return {"tls_cert": pki["host_cert"], "tls_key": pki["host_key"], "tls_client_ca": pki["ca"]}


async def test_cash_out_over_tls_checks_the_hosts_certificate_and_name(switch: SwitchUnderTest, pki):
    connector = {"tls": True, "tls_ca_file": pki["ca"], "tls_server_name": HOST_NAME,
                 "tls_cert_file": pki["client_cert"], "tls_key_file": pki["client_key"]}
    async with world_of(switch, bank_options=_tls_bank(pki), bank_only=connector) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        async with w.terminal() as term:
            approved = await term.cash_out(card, 400, BANK_CARD)
            reversed_ = await term.reverse(approved.request)
        assert (approved.rc, reversed_.rc) == ("00", "00")
        await w.drained()
        assert await w.net.balance(card) == 1000
        assert [f["t"] for f in w.bank.received if f["t"] != "0800"] == ["0200", "0400"]
        assert w.running.connectors["bank"].state()["tls"] is True


@pytest.mark.parametrize("wrong", ["another CA", "another name"])
async def test_a_host_whose_certificate_does_not_check_out_is_never_used(switch: SwitchUnderTest, pki, wrong: str):
    connector = {"tls": True, "tls_ca_file": pki["other_ca"] if wrong == "another CA" else pki["ca"],
                 "tls_server_name": "other.test" if wrong == "another name" else HOST_NAME,
                 "tls_cert_file": pki["client_cert"], "tls_key_file": pki["client_key"]}
    async with world_of(switch, bank_options=_tls_bank(pki), bank_only=connector, wait_links=False) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        bank = w.running.connectors["bank"]
        for _ in range(60):  # let it try (and fail) to connect
            if "certificate verify failed" in bank.state()["last_error"].lower():
                break
            await asyncio.sleep(0.05)
        assert "certificate verify failed" in bank.state()["last_error"].lower(), bank.state()["last_error"]
        async with w.terminal() as term:
            reply = await term.cash_out(card, 400, BANK_CARD)
        assert reply.rc == "91"
        assert bank.state()["links_up"] == 0
        held = await w.fetch("SELECT count(*) AS n FROM requests WHERE terminal_id = ANY($1::text[])"
                             " AND operation = 'cash_out'", w.net.terminal_ids)
        assert held[0]["n"] == 0, "nothing held"
        assert await w.net.balance(card) == 1000
        assert w.bank.received == [], "not a byte of ISO 8583 reached the host"


@pytest.fixture
def mac_key(tmp_path: Path) -> tuple[bytes, str]:
    key = crypto.generate_key(16)
    path = tmp_path / "bank-mac.key"
    path.write_text(key.hex().upper() + "\n")
    return key, str(path)


async def test_requests_and_answers_are_signed_in_64_or_128(switch: SwitchUnderTest, mac_key):
    key, path = mac_key
    async with world_of(switch, bank_options={"mac_key": key}, bank_only={"mac_key_file": path}) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        async with w.terminal() as term:
            approved = await term.cash_out(card, 400, BANK_CARD)
            assert approved.rc == "00", "the host's signed answer is accepted"
            assert (await term.reverse(approved.request)).rc == "00"
        await w.drained()
        [credit] = w.bank.requests("0200")
        [reversal] = w.bank.requests("0400")
        assert "64" in credit, "0200: MAC in 64"
        assert "128" in reversal and "64" not in reversal, "0400 carries 90, so its MAC is in 128"
        assert w.bank.mac_failures == 0, "the host found every MAC valid"
        assert await w.net.balance(card) == 1000 and w.bank.net_fen() == 0
        assert w.running.connectors["bank"].state()["mismatched"] == 0


async def test_an_answer_with_a_wrong_mac_is_not_accepted(switch: SwitchUnderTest, mac_key):
    key, path = mac_key
    async with world_of(switch, bank_options={"mac_key": key, "corrupt_field": "64"},
                        bank_only={"mac_key_file": path}) as w:
        card = w.net.cards[0]
        await w.earn(card, 1000)
        async with w.terminal() as term:
            reply = await term.cash_out(card, 400, BANK_CARD)
        assert reply.rc == "98", "the approval with a wrong MAC is not taken: timed out and reversed"
        assert w.bank.net_fen() == 400, "the host did credit"
        assert w.running.connectors["bank"].state()["mismatched"] >= 1
        await asyncio.sleep(1.0)
        assert [r["state"] for r in await w.reversals()] == ["pending"], "its reversal's answer is refused too"
        w.bank.corrupt_field = None
        await w.drained()
        assert await w.net.balance(card) == 1000 and w.bank.net_fen() == 0
