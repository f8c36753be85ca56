"""The ledger of a host simulator: what it credited (bank) or collected (insurer),
declined and reversed, as JSON lines on disk.

With a file, the file is the truth: every line is appended and flushed before the
host answers, and a host that starts on an existing file replays it, so that after
a restart it still knows every credit it made (by retrieval reference, field 37),
every credit it undid, and every reversal that came before its original. Bank
card numbers are masked in the file. Every line has these keys:

- ``what``: ``credit`` (a 0200 approved and credited), ``decline`` (a 0200
  answered with another code, nothing credited), ``reversal`` (a credit undone),
  ``reversal_not_found`` (a reversal of a reference never credited: answered
  25, and a later original with that reference is declined), ``reversal_refused``
  (a reversal answered with a code other than 00 / 25: nothing undone)
- ``kind``: ``credit`` (bank) or ``premium`` (insurer)
- ``rrn``: field 37; ``trace``: field 11
- ``amount_fen``: field 4 (for ``reversal``, the amount of the credit undone)
- ``account``: the bank card (masked) or the policy number
- ``rc``: the response code the host answered with
- ``at``: when (UTC, ISO 8601)

A repeated 0200 with a reference already credited, and a repeated reversal of a
credit already undone, are answered again and add no line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..logs import mask_pan

WHATS = ("credit", "decline", "reversal", "reversal_not_found", "reversal_refused")


@dataclass
class Entry:
    kind: str  # "credit" (bank) or "premium" (insurer)
    rrn: str
    trace: str
    amount_fen: int
    account: str  # bank card or policy number (masked when replayed from a file)
    at: str
    reversed: bool = False


@dataclass
class LedgerState:
    """What a host knows: credits by retrieval reference, and the references
    reversed before their original came."""

    entries: dict[str, Entry] = field(default_factory=dict)
    reversed_unseen: set[str] = field(default_factory=set)

    def apply(self, line: dict[str, Any]) -> None:
        what, rrn = line["what"], line["rrn"]
        if what == "credit" and rrn not in self.entries:
            self.entries[rrn] = Entry(line["kind"], rrn, line["trace"], int(line["amount_fen"]), line["account"],
                                      line["at"])
        elif what == "reversal":
            if rrn not in self.entries:
                raise ValueError(f"reversal of {rrn}, which was never credited")
            self.entries[rrn].reversed = True
        elif what == "reversal_not_found":
            self.reversed_unseen.add(rrn)
        elif what not in WHATS:
            raise ValueError(f"unknown ledger line {what!r}")

    def net_fen(self) -> int:
        """Credited (or collected) and not reversed."""
        return sum(e.amount_fen for e in self.entries.values() if not e.reversed)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def line_of(what: str, kind: str, rrn: str, trace: str, amount_fen: int, account: str, rc: str,
            at: str | None = None) -> dict[str, Any]:
    """A ledger line; a bank card (``kind`` credit) is masked, a policy number is not."""
    return {"what": what, "kind": kind, "rrn": rrn, "trace": trace, "amount_fen": amount_fen,
            "account": mask_pan(account) if kind == "credit" else account, "rc": rc, "at": at or now()}


def append(path: Path, line: dict[str, Any]) -> None:
    """Append one line and flush it to the operating system before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, separators=(",", ":")) + "\n")
        f.flush()


def replay(path: str | os.PathLike[str], *, repair: bool = False) -> tuple[LedgerState, int]:
    """The state a ledger file describes, and its number of lines. A last line cut short
    (the host stopped while writing it, so it never answered) is ignored; with
    ``repair`` it is also cut off the file, so that the next line starts clean. Any
    other line that does not read raises ValueError."""
    state = LedgerState()
    path = Path(path)
    if not path.exists():
        return state, 0
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    lines = complete.decode("utf-8").splitlines()
    for n, text in enumerate(lines, 1):
        try:
            state.apply(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: line {n}: {exc}") from None
    return state, len(lines)


def net_credited_fen(path: str | os.PathLike[str]) -> int:
    """Money a host simulator's ledger file holds as credited (bank) or collected
    (insurer) and not reversed, in fen: what a reconciliation compares with the
    points the switch paid out."""
    state, _ = replay(path)
    return state.net_fen()
