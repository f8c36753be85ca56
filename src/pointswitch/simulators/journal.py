"""A terminal's journal: every request it sent and its outcome, as the terminal saw it.

One JSON object a line, written (and flushed) once the outcome is final: when the
answer came, or, for a request never answered, after its reversal was answered or
its attempts ran out. A fault campaign reconciles these lines against the ledger.
Card numbers are masked (first 6 and last 4 digits). The keys of every line:

- ``at``: when the outcome became final (UTC, ISO 8601, milliseconds)
- ``terminal``, ``merchant``: fields 41 and 42 (spaces stripped)
- ``mti``: of the request (0200, 0220, 0400 for a reversal the operator asked for, 0800, 0820)
- ``operation``: accrue, redeem, void_accrual, refund, void_redemption, cash_out,
  insurance, inquiry (a 0400 names what it reverses); sign_on, sign_off, echo
- ``trace``: field 11; ``batch``: 60.2 of the request
- ``card``: field 2 masked, or null; ``amount_fen``: field 4, or null
- ``rc``: the response code, or ``"no answer"``
- ``rrn``, ``auth_code``: fields 37 and 38 of the answer, or null
- ``points_moved``: field 63 of an approved answer when it is a number, else null
- ``reversal_rc``: null when no reversal was sent; else the reversal's response
  code, or ``"no answer"`` when none of its attempts was answered
- ``reversal_attempts``: how many times the reversal was sent (0: none)
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .reply import Reply, mask_card, operation_of

NO_ANSWER = "no answer"

KEYS = ("at", "terminal", "merchant", "mti", "operation", "trace", "batch", "card", "amount_fen", "rc", "rrn",
        "auth_code", "points_moved", "reversal_rc", "reversal_attempts")


def journal_line(terminal_id: str, merchant_id: str, request: dict[str, str], reply: Reply | None, *,
                 reversal: Reply | None = None, reversal_attempts: int = 0,
                 at: datetime | None = None) -> dict[str, Any]:
    """The journal line of ``request``: answered by ``reply``, or (None) never answered;
    then ``reversal`` is the answer to its reversal, sent ``reversal_attempts`` times."""
    fields = reply.fields if reply is not None else {}
    card = request.get("2")
    amount = request.get("4")
    approved = fields.get("39") == "00"
    moved = fields.get("63", "").strip()
    if reversal_attempts == 0:
        reversal_rc = None
    else:
        reversal_rc = reversal.rc if reversal is not None else NO_ANSWER
    return {
        "at": (at or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "terminal": terminal_id.strip(),
        "merchant": merchant_id.strip(),
        "mti": request.get("t", ""),
        "operation": operation_of(request),
        "trace": request.get("11", ""),
        "batch": request.get("60", "")[2:8] or None,
        "card": mask_card(card) if card else None,
        "amount_fen": int(amount) if amount and amount.isdigit() else None,
        "rc": fields.get("39", "") if reply is not None else NO_ANSWER,
        "rrn": fields.get("37", "").strip() or None,
        "auth_code": fields.get("38", "").strip() or None,
        "points_moved": int(moved) if approved and moved.isdigit() else None,
        "reversal_rc": reversal_rc,
        "reversal_attempts": reversal_attempts,
    }


class TerminalJournal:
    """Appends journal lines to a file; one journal may serve many terminals (the
    ``terminal`` key tells them apart). Each line is flushed as it is written."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.lines = 0

    def record(self, terminal_id: str, merchant_id: str, request: dict[str, str], reply: Reply | None, *,
               reversal: Reply | None = None, reversal_attempts: int = 0) -> dict[str, Any]:
        line = journal_line(terminal_id, merchant_id, request, reply, reversal=reversal,
                            reversal_attempts=reversal_attempts)
        self.write(line)
        return line

    def write(self, line: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"journal {self.path} is closed")
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TerminalJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every line of a terminal journal (a last line cut short by a crash is left out)."""
    texts = Path(path).read_text(encoding="utf-8").splitlines()
    lines = []
    for n, text in enumerate(texts, 1):
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            if n < len(texts):
                raise ValueError(f"{path}: line {n} is not JSON") from None
    return lines
