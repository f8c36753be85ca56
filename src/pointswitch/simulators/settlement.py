"""A terminal's end of the day: batch settlement (0500) from its own journal, and
batch upload (0320), as a UnionPay-style POS does them (PROTOCOL.md).

The terminal keeps the answered financial requests of its open batch (its batch
store, with clear card numbers, as a POS keeps them until upload) and counts them
by the same rule as the host: approved, not reversed by this terminal, one per
trace; debits (60.1 22, 51, 53, 54) and credits (23, 52, 25) by field 4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..codecs.subfields import (
    UPLOAD_RECORDS_PER_MESSAGE,
    Field60,
    SettlementTotals,
    TotalsBlock,
    UploadRecord,
    render_48_upload,
    render_48_upload_end,
)
from .reply import Reply, TerminalError


class BatchSettlement:
    """Settlement and upload, for :class:`~.terminal.TerminalClient`."""

    batch: int
    batch_store: list[Reply]  # the answered financial requests of the open batch
    settled: tuple[int, bool, list[UploadRecord]] | None  # batch, balanced, records to upload

    if TYPE_CHECKING:
        def base_fields(self, mti: str, proc: str, txn_type: str, *, trace: int | None = None,
                        network_code: str = "") -> dict[str, str]: ...

        async def send(self, fields: dict[str, str], envelope: Any = None, *, tamper: bool = False,
                       mac: bool | None = None) -> Reply: ...

    def counted(self) -> list[tuple[Reply, bool]]:
        """The open batch's transactions the settlement counts, each with whether it is
        a debit: approved, and not reversed by this terminal."""
        reversed_traces = {r.request["11"] for r in self.batch_store
                           if r.request["t"] in ("0400", "0420") and r.approved}
        # One transaction per trace, as in a POS journal: a retransmission is the same
        # transaction, its answer replaces the first one's.
        by_trace = {r.request["11"]: r for r in self.batch_store if r.request["t"] in ("0200", "0220")}
        out = []
        for r in by_trace.values():
            txn_type = r.request.get("60", "")[:2]
            if r.request["t"] in ("0200", "0220") and r.approved and r.request["11"] not in reversed_traces:
                if txn_type in DEBIT_TYPES:
                    out.append((r, True))
                elif txn_type in CREDIT_TYPES:
                    out.append((r, False))
        return out

    def batch_totals(self) -> TotalsBlock:
        counted = self.counted()
        debits = [int(r.request["4"]) for r, debit in counted if debit]
        credits = [int(r.request["4"]) for r, debit in counted if not debit]
        return TotalsBlock(sum(debits), len(debits), sum(credits), len(credits))

    def _batch_message(self, mti: str, network_code: str, batch: int) -> dict[str, str]:
        fields = self.base_fields(mti, "", "00", network_code=network_code)
        del fields["3"], fields["25"]
        fields["60"] = Field60("00", f"{batch:06d}", network_code).render()
        return fields

    async def settle(self, totals: TotalsBlock | None = None) -> Reply:
        """Settle the open batch (0500, no MAC) with this terminal's own totals (or
        ``totals``). Approved, the batch's records wait for :meth:`upload`; the next
        sign-on brings the host's next batch."""
        own = totals or self.batch_totals()
        fields = self._batch_message("0500", "201", self.batch)
        fields["48"] = SettlementTotals(own, TotalsBlock()).render()
        fields["49"] = "156"
        reply = await self.send(fields, mac=False)
        if reply.approved:
            balanced = reply.fields.get("48", "")[30:31] == "1" and reply.fields.get("48", "")[61:62] == "1"
            records = [UploadRecord(int(r.request["11"]), r.request["2"], int(r.request["4"]))
                       for r, _debit in self.counted()]
            self.settled = (self.batch, balanced, records)
        return reply

    async def upload(self, records: list[UploadRecord] | None = None) -> list[Reply]:
        """Upload the settled batch's records, 8 a message (0320, 60.3 = 201), then the end
        (202 after a batch that did not balance, 207 after one that did)."""
        if self.settled is None:
            raise TerminalError("settle first")
        batch, balanced, own = self.settled
        records = own if records is None else records
        replies = []
        for i in range(0, len(records), UPLOAD_RECORDS_PER_MESSAGE):
            fields = self._batch_message("0320", "201", batch)
            fields["48"] = render_48_upload(records[i : i + UPLOAD_RECORDS_PER_MESSAGE])
            replies.append(await self.send(fields, mac=False))
        end = self._batch_message("0320", "207" if balanced else "202", batch)
        end["48"] = render_48_upload_end(len(records))
        replies.append(await self.send(end, mac=False))
        return replies


# 60.1 of what a settlement counts (PROTOCOL.md): debits and credits.
DEBIT_TYPES = {"22", "51", "53", "54"}
CREDIT_TYPES = {"23", "52", "25"}
