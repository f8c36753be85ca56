"""What the API's handlers share: the ledger, its API-side stores, and the limits."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ...config import ApiConfig
from ...ledger import Ledger
from ...ledger.api import ApiTerminals
from ...ledger.members import MemberCards
from .guard import KeyCache, ReplayGuard, TokenBuckets
from .login_codes import CodeSender
from .tokens import TokenSigner


@dataclass
class ApiState:
    config: ApiConfig
    ledger: Ledger
    terminals: ApiTerminals
    members: MemberCards
    keys: KeyCache
    rates: TokenBuckets  # per API key
    replays: ReplayGuard
    logins: TokenBuckets  # members' code requests and checks, per client address
    tokens: TokenSigner
    codes: CodeSender
    request_timeout_s: float
    commit_wait_s: float
    in_flight: int = 0


STATE: web.AppKey[ApiState] = web.AppKey("api_state")
