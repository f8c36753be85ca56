"""The sections of the settings, each a dataclass with its defaults and checks
(``pointswitch.config`` reads them from a file and the environment)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import time

from ..codecs import DIALECTS
from ..codecs.framing import FRAMINGS


class ConfigError(ValueError):
    pass


_LOOPBACK = ("127.", "::1", "localhost")


@dataclass
class ListenerConfig:
    name: str
    port: int
    dialect: str = "cup"
    framing: str = "binary2"
    host: str = "0.0.0.0"
    # How financial messages are authenticated (field 64), always with the working
    # MAK the terminal got at sign-on: "ecb" (UnionPay POS method; the cup default),
    # "x919" (ANSI X9.19; the iso87 default), or "off" (nothing authenticated: only
    # on a loopback address with allow_unauthenticated = true, for test rigs).
    mac: str = ""
    allow_unauthenticated: bool = False

    @property
    def mac_method(self) -> str:
        return self.mac or ("ecb" if self.dialect == "cup" else "x919")

    def validate(self) -> None:
        if self.dialect not in DIALECTS:
            raise ConfigError(f"listener {self.name}: unknown dialect {self.dialect!r}")
        if self.framing not in FRAMINGS:
            raise ConfigError(f"listener {self.name}: unknown framing {self.framing!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"listener {self.name}: port {self.port} out of range")
        if self.mac_method not in ("ecb", "x919", "off"):
            raise ConfigError(f"listener {self.name}: mac is ecb, x919 or off")
        if self.mac_method == "off":
            if not self.allow_unauthenticated:
                raise ConfigError(f"listener {self.name}: mac = \"off\" accepts messages nobody authenticates;"
                                  " it needs allow_unauthenticated = true (and a loopback host)")
            if not self.host.startswith(_LOOPBACK):
                raise ConfigError(f"listener {self.name}: mac = \"off\" is allowed only on a loopback address"
                                  f" (127.0.0.1, ::1), not {self.host}")


@dataclass
class Limits:
    max_frame_bytes: int = 4096  # a frame's length header above this closes the connection
    max_connections: int = 1024  # across all listeners; more are accepted and closed at once
    max_connections_per_peer: int = 64  # from one address; more are accepted and closed at once
    max_in_flight_per_connection: int = 32  # reading pauses while this many are in progress
    max_requests_in_flight: int = 256  # across all connections; past it a request is answered 96 at once
    max_write_buffer_bytes: int = 262_144  # answers a peer has not read; past it, its reading pauses
    idle_timeout_s: float = 300.0  # a connection silent this long is closed
    # ... and this long while it has not yet sent a message whose MAC verified
    unauthenticated_idle_timeout_s: float = 15.0
    frame_timeout_s: float = 30.0  # a started frame must complete within this
    request_timeout_s: float = 10.0  # processing one request; past it the answer is 96 (if nothing committed)
    # Past the deadline, how long an answer waits for a COMMIT already sent; if the
    # database never says, the request is not answered (the terminal reverses it).
    commit_wait_s: float = 10.0
    shutdown_grace_s: float = 15.0  # on SIGTERM, time allowed for requests in flight
    max_undecodable_frames: int = 16  # consecutive frames that cannot be answered at all


@dataclass
class DatabaseConfig:
    dsn: str | None = None
    data_dir: str = ""  # embedded PostgreSQL's folder; default: platform data dir
    pool_min_size: int = 2
    pool_max_size: int = 10
    command_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0  # opening a connection (start-up, pool) gives up after this
    # Accruals written together, one COMMIT for many (docs/architecture.md, group commit):
    # this many batches at once, each its own connection (0: one transaction per request) ...
    group_commit_writers: int = 2
    group_commit_max_batch: int = 64  # ... of at most this many requests
    restart_embedded: bool = True  # serve restarts the embedded PostgreSQL when it finds it not running


@dataclass
class SecurityConfig:
    master_key_file: str = ""  # hex master key; or POINTSWITCH_MASTER_KEY; embedded default: generated
    max_pin_tries: int = 3  # wrong PINs in a row before the card is locked for PIN use
    # PIN checks (scrypt: ~24 ms of CPU and 16 MiB each) running at once; 0 = one per CPU core.
    # More than the cores only adds memory and tail latency.
    pin_workers: int = 0
    # MAC failures within mac_failure_window_s: past the per-peer limit the peer's
    # connections are closed and it is refused for peer_ban_s; past the per-terminal
    # limit (from any peers) the terminal's working keys are withdrawn (it signs on again).
    max_mac_failures_per_peer: int = 5
    max_mac_failures_per_terminal: int = 20
    mac_failure_window_s: float = 60.0
    peer_ban_s: float = 300.0
    # Sign-ons per minute for one terminal from one peer, and from one peer in all.
    sign_ons_per_minute: int = 6
    sign_ons_per_minute_per_peer: int = 60
    max_pending_sign_ons: int = 4  # key sets issued and not yet used, per terminal (newest kept)
    pending_keys_ttl_s: float = 300.0  # a key set not used by then is forgotten
    session_cache_size: int = 10_000  # terminals whose sessions each process keeps in memory


@dataclass
class HttpConfig:
    """The web layer (``pointswitch.web``): operator console, JSON API, ``/metrics``.
    Served by one process (worker 0 with ``--workers``); ``enabled = false`` turns it off;
    ``port = 0`` takes a free port (tests)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024  # a request body past this gets 413
    shutdown_timeout_s: float = 5.0  # requests in flight finish within this at stop


@dataclass
class ApiConfig:
    """The JSON API under ``/api/v1`` (docs/api.md): merchants' PCs and shops sign each
    request with their terminal's API key; members log in with a one-time code."""

    signature_window_s: float = 300.0  # a request's X-Timestamp further than this from now is refused
    max_requests_in_flight: int = 64  # API requests at once; past it: 503 (code 96), nothing done
    requests_per_s_per_key: float = 20.0  # sustained requests per API key; past it: 429 (code 65)
    burst_per_key: int = 40  # ... with bursts up to this many
    key_cache_s: float = 30.0  # API keys are re-read this often (a rotated key stops working within it)
    max_replay_entries: int = 100_000  # signatures of non-idempotent requests remembered for the window
    max_tracked_clients: int = 10_000  # API keys and member login addresses whose rates are tracked
    member_code_ttl_s: float = 300.0  # a login code is valid this long
    member_code_resend_s: float = 60.0  # at most one code per card this often
    member_code_tries: int = 5  # wrong tries of one code before it is void
    member_max_failures: int = 10  # wrong codes in a row before the card's logins are locked ...
    member_lockout_s: float = 900.0  # ... for this long
    member_token_ttl_s: float = 3600.0  # a member's bearer token is valid this long
    member_logins_per_minute_per_client: int = 20  # code requests and code checks from one address
    max_history: int = 100  # postings a member's history shows at most

    def validate(self) -> None:
        positive = ("signature_window_s", "max_requests_in_flight", "requests_per_s_per_key", "burst_per_key",
                    "max_replay_entries", "max_tracked_clients", "member_code_ttl_s", "member_code_tries",
                    "member_max_failures", "member_token_ttl_s", "member_logins_per_minute_per_client",
                    "max_history")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"[api] {name} must be positive")


@dataclass
class ConsoleConfig:
    """The operator console (``/console``, docs/console.md): sessions, logins, lockout."""

    session_ttl_s: float = 8 * 3600.0  # a session cookie is refused this long after sign-in
    max_failed_logins: int = 5  # wrong passwords in a row before the account is locked
    lockout_s: float = 900.0  # how long a locked account refuses every password
    max_concurrent_logins: int = 4  # password checks (scrypt, 32 MiB each) at once; others wait
    min_password_length: int = 12
    page_rows: int = 100  # rows a list screen shows (postings, transactions, audit entries)
    secure_cookies: bool = False  # mark cookies Secure (set it when a TLS proxy fronts the console)


@dataclass
class MetricsConfig:
    """Prometheus metrics over HTTP (``/metrics``); port 0 = not served."""

    host: str = "127.0.0.1"
    port: int = 0


@dataclass
class ConnectorConfig:
    """An upstream host (bank, insurer): persistent ISO 8583 connections out of the switch."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    dialect: str = "iso87"
    framing: str = "ascii4"
    connections: int = 2  # persistent connections, shared by all requests
    connect_timeout_s: float = 3.0
    response_timeout_s: float = 8.0  # past this a request is timed out: 98 to the terminal, reversal queued
    echo_interval_s: float = 30.0  # an idle connection sends 0800 / 70 = 301 this often
    echo_timeout_s: float = 5.0  # an echo unanswered this long drops the connection
    backoff_initial_s: float = 0.5  # reconnect delay, doubled after each failure ...
    backoff_max_s: float = 30.0  # ... up to this
    max_in_flight: int = 512  # outstanding requests across the connector's connections
    match_key: str = "11+41"  # how responses find their request: "11+41" or "37"
    acquirer_id: str = "88880000001"  # field 32: this switch, as the upstream host knows it
    reversal_retry_s: float = 2.0  # first retry of an unacknowledged reversal, doubled up to ...
    reversal_retry_max_s: float = 60.0
    reversal_max_age_s: float = 86400.0  # a reversal not acknowledged by then is expired for the operator
    max_frame_bytes: int = 4096
    # A write not taken by the link within this is a broken link: the request is
    # treated as sent (reversed) when any of its bytes may have left.
    write_timeout_s: float = 2.0
    send_buffer_bytes: int = 65536  # bytes a link may hold unsent (socket and switch buffers, each)
    tls: bool = False  # TLS on the connections, checking the host's certificate
    tls_ca_file: str = ""  # CAs that sign the host's certificate (PEM); empty: the system's
    tls_cert_file: str = ""  # this switch's client certificate (PEM), for hosts that ask for one
    tls_key_file: str = ""  # its private key (PEM)
    tls_server_name: str = ""  # the name the host's certificate must carry; empty: ``host``
    mac_key_file: str = ""  # X9.19 MAC key (32 hex digits): 0200/0400/0420 signed, answers checked

    def validate(self) -> None:
        if self.dialect not in ("iso87", "cup"):
            raise ConfigError(f"connector {self.name}: dialect is iso87 or cup")
        if self.framing not in ("binary2", "ascii4"):
            raise ConfigError(f"connector {self.name}: framing is binary2 or ascii4")
        if self.match_key not in ("11+41", "37"):
            raise ConfigError(f"connector {self.name}: match_key is \"11+41\" or \"37\"")
        if not 0 < self.port < 65536:
            raise ConfigError(f"connector {self.name}: port is required")
        if self.connections < 1 or self.max_in_flight < 1:
            raise ConfigError(f"connector {self.name}: connections and max_in_flight are at least 1")
        if not re.fullmatch(r"[0-9]{1,11}", self.acquirer_id):
            raise ConfigError(f"connector {self.name}: acquirer_id is 1 to 11 digits")
        if self.write_timeout_s <= 0 or self.send_buffer_bytes < 2048:
            raise ConfigError(f"connector {self.name}: write_timeout_s > 0 and send_buffer_bytes >= 2048")
        tls_files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.tls_server_name)
        if any(tls_files) and not self.tls:
            raise ConfigError(f"connector {self.name}: tls_* settings need tls = true")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(f"connector {self.name}: tls_cert_file and tls_key_file go together")
        if self.mac_key_file and self.dialect != "iso87":
            raise ConfigError(f"connector {self.name}: mac_key_file needs dialect iso87")


@dataclass
class DayConfig:
    """The business day: when it ends, and what closing it does."""

    cutoff: str = "23:00"  # local time a business day ends; a request after it belongs to the next day
    time_zone: str = "Asia/Shanghai"
    auto_close: bool = True  # serve closes each day itself, close_grace_s after its cut-off
    close_grace_s: float = 600.0  # time for late answers and reversals to land before the day is cleared
    check_interval_s: float = 30.0  # how often serve looks for a day to close
    clearing_dir: str = ""  # where the clearing files go; default: <data_dir>/clearing
    cutoff_lock_timeout_ms: int = 250  # a cut-off holds postings up at most this long at a time ...
    cutoff_attempts: int = 400  # ... and tries this many times

    def validate(self) -> None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            self.cutoff_time()
        except ValueError:
            raise ConfigError(f"day.cutoff is a time HH:MM, not {self.cutoff!r}") from None
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"day.time_zone: unknown time zone {self.time_zone!r}") from None
        if self.close_grace_s < 0 or self.check_interval_s <= 0:
            raise ConfigError("day.close_grace_s >= 0 and day.check_interval_s > 0")
        if self.cutoff_lock_timeout_ms < 10 or self.cutoff_attempts < 1:
            raise ConfigError("day.cutoff_lock_timeout_ms >= 10 and day.cutoff_attempts >= 1")

    def cutoff_time(self) -> time:
        return time.fromisoformat(self.cutoff)


@dataclass
class UsageConfig:
    """Points spent outside the network: the rate, fee and limits of one kind of usage."""

    connector: str = ""  # the connector that carries it; empty = not offered (40)
    points_per_yuan: str = "100"  # points needed for one yuan (100 fen); a decimal
    fee_points: int = 0  # added to the points needed, per request
    min_amount_fen: int = 100
    daily_limit_fen: int = 50_000  # per card per day (host's local date)


@dataclass
class ExpiryConfig:
    """When points expire (docs/expiry.md): "never" (the default for a new network);
    "months": ``months`` after the business date they were earned on; "end_of_year":
    Dec 31 of the earning year + ``years``. Applies to points earned from then on."""

    policy: str = "never"
    months: int = 24
    years: int = 1

    def validate(self) -> None:
        if self.policy not in ("never", "months", "end_of_year"):
            raise ConfigError(f"[expiry] policy is never, months or end_of_year, not {self.policy!r}")
        if self.months < 1 or self.years < 0:
            raise ConfigError("[expiry] months >= 1 and years >= 0")


DEFAULT_LISTENERS = [
    ListenerConfig(name="cup", port=5000, dialect="cup", framing="binary2"),
    ListenerConfig(name="iso87", port=5001, dialect="iso87", framing="ascii4"),
]




MESSAGE_KINDS = ("accrual", "redemption", "cash_out", "insurance", "card_blocked", "points_expiring",
                 "clearing_statement")


@dataclass
class MessagesConfig:
    """Messages to members and merchants (docs/messages.md): the delivery workers,
    their limits, and the channels. A channel with no address (``sms_url``,
    ``smtp_host``) is off: its messages wait in the outbox."""

    enabled: bool = True  # serve runs a delivery worker (in every process with --workers)
    batch_size: int = 16  # messages one worker claims and sends at a time
    poll_interval_s: float = 5.0  # looking for due messages when no NOTIFY came
    send_timeout_s: float = 10.0  # one channel call (HTTP request, SMTP session)
    max_attempts: int = 8  # failed sends before a message is given up (failed)
    max_age_s: float = 86_400.0  # a message not delivered this long after it was queued is given up
    backoff_initial_s: float = 5.0  # after a failed send, wait this long (doubled each time, +-25 % jitter) ...
    backoff_max_s: float = 900.0  # ... up to this
    # Members are not messaged between these local times (the [day] time zone); their
    # messages wait until the end. Equal times: no quiet hours. Merchants are not held.
    quiet_hours_start: str = "22:00"
    quiet_hours_end: str = "08:00"
    rate_limit_per_hour: int = 20  # messages per recipient and channel per hour; more wait
    expiring_warning_days: int = 7  # tell members of points expiring within this many days
    expiring_check_interval_s: float = 3600.0  # how often the warnings are looked for
    # SMS gateway (HTTP, JSON): template ids per message kind, as the provider registered them
    sms_url: str = ""
    sms_sign_name: str = "积分联盟"
    sms_template_ids: dict[str, str] = field(default_factory=dict)  # kind -> template id; default: the kind
    # E-mail over SMTP
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "pointswitch@localhost"
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password_file: str = ""  # the SMTP password, read at start (never in the settings)
    webhook: bool = True  # merchants' webhooks (the URL and secret are the contact's)
    max_body_bytes: int = 16_384  # a rendered message past this is not sent (failed)

    def validate(self) -> None:
        for name in ("quiet_hours_start", "quiet_hours_end"):
            try:
                time.fromisoformat(getattr(self, name))
            except ValueError:
                raise ConfigError(f"[messages] {name} is a time HH:MM, not {getattr(self, name)!r}") from None
        if self.batch_size < 1 or self.max_attempts < 1 or self.rate_limit_per_hour < 1:
            raise ConfigError("[messages] batch_size, max_attempts and rate_limit_per_hour are at least 1")
        if min(self.poll_interval_s, self.send_timeout_s, self.max_age_s, self.backoff_initial_s,
               self.expiring_check_interval_s) <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("[messages] intervals and timeouts > 0, backoff_max_s >= backoff_initial_s")
        if not 0 <= self.expiring_warning_days <= 366:
            raise ConfigError("[messages] expiring_warning_days is 0 to 366")
        if not isinstance(self.sms_template_ids, dict) or set(self.sms_template_ids) - set(MESSAGE_KINDS):
            raise ConfigError(f"[messages] sms_template_ids maps message kinds ({', '.join(MESSAGE_KINDS)}) to ids")
        if self.sms_url and not self.sms_url.startswith(("http://", "https://")):
            raise ConfigError("[messages] sms_url is an http(s) URL")
