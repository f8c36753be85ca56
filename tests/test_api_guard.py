"""The API's guards on their own (pure: a clock of the test's): rates per key,
replayed signatures, members' tokens."""

from __future__ import annotations

from pointswitch.web.api.guard import ReplayGuard, TokenBuckets, sign, signature_matches, timestamp_fresh
from pointswitch.web.api.tokens import TokenSigner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_burst_then_its_rate():
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=2, burst=3, max_clients=10, clock=clock)
    assert [buckets.allow("T1") for _ in range(4)] == [True, True, True, False]
    assert buckets.allow("T2")  # another key has its own bucket
    clock.now += 0.5
    assert buckets.allow("T1") and not buckets.allow("T1")


def test_tracked_clients_are_bounded():
    buckets = TokenBuckets(rate_per_s=1, burst=1, max_clients=100, clock=Clock())
    for n in range(10_000):
        buckets.allow(f"client-{n}")
    assert len(buckets._buckets) == 100


def test_a_signature_is_good_once_within_the_window_and_the_memory_is_bounded():
    clock = Clock()
    guard = ReplayGuard(window_s=300, max_entries=2, clock=clock)
    assert guard.first_use("a") is True
    assert guard.first_use("a") is False
    assert guard.first_use("b") is True
    assert guard.first_use("c") is None  # full: refused, not forgotten
    clock.now += 601
    assert guard.first_use("c") is True and guard.first_use("a") is True  # outside the window: the timestamp refuses


def test_the_signature_covers_method_path_timestamp_key_and_body():
    key = b"k" * 32
    good = sign(key, "POST", "/api/v1/accrue", "1700000000", "id-1", b"{}")
    assert signature_matches(key, good.upper(), "POST", "/api/v1/accrue", "1700000000", "id-1", b"{}")
    for changed in (("GET", "/api/v1/accrue", "1700000000", "id-1", b"{}"),
                    ("POST", "/api/v1/redeem", "1700000000", "id-1", b"{}"),
                    ("POST", "/api/v1/accrue", "1700000001", "id-1", b"{}"),
                    ("POST", "/api/v1/accrue", "1700000000", "id-2", b"{}"),
                    ("POST", "/api/v1/accrue", "1700000000", "id-1", b"{ }")):
        assert not signature_matches(key, good, *changed)
    assert timestamp_fresh("1700000000", 300, now=1700000300)
    assert not timestamp_fresh("1700000000", 300, now=1700000301)
    assert not timestamp_fresh("-1700000000", 300, now=1700000000)
    assert not timestamp_fresh("1e9", 300, now=1e9)


def test_a_member_token_names_one_card_until_it_expires():
    signer = TokenSigner(b"s" * 32, ttl_s=60)
    token, expires = signer.issue("index-a", now=1000)
    assert expires == 1060
    assert signer.card_index(token, now=1059) == "index-a"
    assert signer.card_index(token, now=1060) is None
    assert TokenSigner(b"t" * 32, ttl_s=60).card_index(token, now=1000) is None
    payload, mac = token.split(".")
    assert signer.card_index(payload[:-2] + "xx." + mac, now=1000) is None
    assert signer.card_index("a.b.c", now=1000) is None and signer.card_index("x" * 600, now=1000) is None


def test_api_settings_are_read_from_the_file_and_checked(tmp_path):
    import pytest

    from pointswitch.config import ConfigError, load

    path = tmp_path / "switch.toml"
    path.write_text("[api]\nsignature_window_s = 60\nrequests_per_s_per_key = 5\nmember_token_ttl_s = 600\n")
    config = load(path, env={})
    assert (config.api.signature_window_s, config.api.requests_per_s_per_key) == (60.0, 5.0)
    assert config.api.member_token_ttl_s == 600.0 and config.api.burst_per_key == 40
    for bad in ("max_requests_in_flight = 0", "member_code_tries = -1", "no_such_setting = 1"):
        path.write_text(f"[api]\n{bad}\n")
        with pytest.raises(ConfigError):
            load(path, env={})
