"""The OpenAPI 3.1 description of ``/api/v1``, served at ``/api/v1/openapi.json``.

Written by hand, as data; the tests validate the API's real responses against
the schemas here (tests/test_api.py), so the two cannot drift apart silently.
"""

from __future__ import annotations

import copy
from typing import Any

_CODE = {"type": "string", "pattern": "^[0-9A-Z]{2}$", "description": "ISO 8583 response code (field 39)"}
_CARD = {"type": "string", "pattern": "^[0-9]{12,19}$"}
_AMOUNT = {"type": "integer", "minimum": 1, "maximum": 999_999_999_999, "description": "fen (CNY minor units)"}
_PIN = {"type": "string", "pattern": "^[0-9]{4,12}$", "description": "the member's PIN"}
_KEY = {"type": "string", "pattern": "^[\\x21-\\x7e]{1,64}$"}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "additionalProperties": False,
            "properties": {**required, **(optional or {})}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_REFUSED = {
    "400": _json(_ref("Refusal"), "malformed request (code 30)"),
    "401": _json(_ref("Refusal"), "not authenticated: signature, window or replay (code A0)"),
    "403": _json(_ref("Refusal"), "terminal unknown (97), merchant inactive (03), terminal not enabled (58)"),
    "429": _json(_ref("Refusal"), "rate limit of the API key (code 65)"),
    "503": _json(_ref("Refusal"), "not done, nothing posted (code 96)"),
    "504": _json(_ref("Refusal"), "outcome unknown: retry with the same Idempotency-Key (code 09)"),
}

_SCHEMAS: dict[str, Any] = {
    "Outcome": _obj(
        {"code": _CODE, "message": {"type": "string"}, "operation": {"type": "string"},
         "host_time": {"type": "string"}},
        {"rrn": {"type": "string", "pattern": "^[0-9]{12}$"}, "business_date": {"type": "string", "format": "date"},
         "auth_code": {"type": "string", "pattern": "^[0-9]{6}$"}, "points": {"type": "integer", "minimum": 0},
         "points_balance": {"type": "integer", "minimum": 0}, "cash_value_fen": {"type": "integer", "minimum": 0},
         "next_expiry": _obj({"date": {"type": "string", "format": "date"}, "points": {"type": "integer"}})}),
    "Refusal": _obj({"code": _CODE, "message": {"type": "string"}}),
    "Accrue": _obj({"card": _CARD, "amount_fen": _AMOUNT}),
    "Redeem": _obj({"card": _CARD, "amount_fen": _AMOUNT, "pin": _PIN}),
    "Reference": _obj({"card": _CARD, "amount_fen": _AMOUNT,
                       "original": {**_KEY, "description": "the Idempotency-Key of the original request"}}),
    "Inquire": _obj({"card": _CARD, "pin": _PIN}),
    "Login": _obj({"card": _CARD}),
    "TokenRequest": _obj({"card": _CARD, "code": {"type": "string"}}),
    "LoginAccepted": _obj({"code": _CODE, "message": {"type": "string"}, "expires_in_s": {"type": "integer"}}),
    "Token": _obj({"code": _CODE, "message": {"type": "string"}, "token": {"type": "string"},
                   "token_type": {"const": "Bearer"}, "expires_at": {"type": "integer"}}),
    "Balance": _obj({"code": _CODE, "card": {"type": "string", "description": "masked"},
                     "status": {"enum": ["active", "blocked"]}, "points_balance": {"type": "integer", "minimum": 0}}),
    "Expiry": _obj({"code": _CODE, "expiring": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "never_expiring": {"type": "integer", "minimum": 0}}),
    "History": _obj({"code": _CODE, "postings": {"type": "array", "items": _obj(
        {"at": {"type": "string"}, "operation": {"type": "string"}, "reason": {"type": "string"},
         "points": {"type": "integer"}, "merchant_id": {"type": "string"}, "rrn": {"type": "string"},
         "business_date": {"type": ["string", "null"]}})}}),
}

_SIGNED: list[dict[str, list[str]]] = [{"terminal": [], "timestamp": [], "signature": []}]
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": True, "schema": _KEY,
                "description": "same key and body: the same answer, nothing posted again; same key, other body: 94"}


def _write(summary: str, body: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "security": _SIGNED, "parameters": [_IDEMPOTENCY],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(body)}}},
                     "responses": {"200": _json(_ref("Outcome"), "decided by the ledger: code says how"),
                                   **_REFUSED}}}


def _member_read(summary: str, schema: str, parameters: list[Any] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [{"member": []}], "parameters": parameters or [],
                    "responses": {"200": _json(_ref(schema), summary),
                                  "400": _json(_ref("Refusal"), "bad parameter"),
                                  "401": _json(_ref("Refusal"), "no valid token"),
                                  "404": _json(_ref("Refusal"), "no such card (14)"),
                                  "503": _json(_ref("Refusal"), "not done (96)")}}}


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "pointswitch JSON API", "version": "1",
             "description": "Points for merchants' shops and PCs, and for members' apps. See docs/api.md."},
    "servers": [{"url": "/api/v1"}],
    "paths": {
        "/accrue": _write("Accrue points for a purchase", "Accrue"),
        "/redeem": _write("Pay with points (the member's PIN required)", "Redeem"),
        "/void": _write("Void an accrual or redemption of this terminal, by its Idempotency-Key", "Reference"),
        "/refund": _write("Refund (part of) an accrual of this terminal, by its Idempotency-Key", "Reference"),
        "/inquire": {"post": {
            "summary": "A card's balance (the member's PIN required); a signature is good once",
            "security": _SIGNED,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Inquire")}}},
            "responses": {"200": _json(_ref("Outcome"), "decided by the ledger"), **_REFUSED}}},
        "/member/login": {"post": {
            "summary": "Send a one-time code to the card holder's phone (202 whatever the card)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Login")}}},
            "responses": {"202": _json(_ref("LoginAccepted"), "accepted"),
                          "400": _json(_ref("Refusal"), "malformed"),
                          "429": _json(_ref("Refusal"), "too many from this address (65)"),
                          "503": _json(_ref("Refusal"), "not done (96)")}}},
        "/member/token": {"post": {
            "summary": "Exchange the one-time code for a bearer token",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TokenRequest")}}},
            "responses": {"200": _json(_ref("Token"), "logged in"),
                          "400": _json(_ref("Refusal"), "malformed"),
                          "401": _json(_ref("Refusal"), "wrong or expired code (55); logins locked (75)"),
                          "429": _json(_ref("Refusal"), "too many from this address (65)"),
                          "503": _json(_ref("Refusal"), "not done (96)")}}},
        "/member/balance": _member_read("The card's balance", "Balance"),
        "/member/expiry": _member_read("The card's points by expiry date", "Expiry"),
        "/member/history": _member_read("The card's last postings, newest first", "History", [
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}]),
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "terminal": {"type": "apiKey", "in": "header", "name": "X-Terminal", "description": "terminal id"},
            "timestamp": {"type": "apiKey", "in": "header", "name": "X-Timestamp", "description": "Unix seconds"},
            "signature": {"type": "apiKey", "in": "header", "name": "X-Signature",
                          "description": "hex HMAC-SHA256 under the API key of METHOD, path, X-Timestamp,"
                                         " Idempotency-Key and SHA-256(body) hex, joined by newlines"},
            "member": {"type": "http", "scheme": "bearer"},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    return copy.deepcopy(_DOCUMENT)
