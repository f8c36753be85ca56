"""``pointswitch sim``: a terminal, upstream bank and insurer hosts, and the load generator."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .. import logs
from . import common


def _state_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("pointswitch"))


def _state_path(terminal: str) -> Path:
    return _state_dir() / "sim-terminals" / f"{terminal}.json"


def _host_ledger_path(kind: str, port: int) -> Path:
    """Where `sim bank` / `sim insurer` keep their ledger unless told (one file per kind and port)."""
    return _state_dir() / "sim-hosts" / f"{kind}-{port}.jsonl"


def cmd_sim_host(args: argparse.Namespace) -> int:
    from ..simulators.host import HostSimulator, Rule, load_rules

    logs.configure("info")  # on stderr: what the host credits, declines and reverses
    rules = load_rules(args.rules) if args.rules else []
    field = "card" if args.kind == "bank" else "policy"
    rules += [Rule(action="decline", rc="05", **{field: value}) for value in args.decline]
    if args.decline_amount_over is not None:
        rules.append(Rule(action="decline", rc="61", amount_over=args.decline_amount_over))
    if args.delay:
        rules.append(Rule(action="approve", delay_s=args.delay))
    mac_key = None
    if args.mac_key_file:
        from ..config import ConfigError
        from ..switch.upstream_wire import read_mac_key

        try:
            mac_key = read_mac_key(args.mac_key_file, f"sim {args.kind}")
        except ConfigError as exc:
            sys.exit(f"pointswitch: {exc}")
    if len(args.reversal_rc) != 2 or not args.reversal_rc.isalnum():
        sys.exit("pointswitch: --reversal-rc is a two-character response code, like 00 or 96")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        sys.exit("pointswitch: --tls-cert and --tls-key go together (and --tls-client-ca needs them)")
    ledger = Path(args.ledger) if args.ledger else _host_ledger_path(args.kind, args.port)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    host = HostSimulator(args.kind, args.host, args.port, args.framing, rules,
                         ledger, answer_reversals=not args.no_reversal_ack,
                         drop_every=args.drop_every, reversal_rc=args.reversal_rc, mac_key=mac_key,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with host:
            print(f"{args.kind} simulator on {args.host}:{host.port} ({len(rules)} rules); ledger {ledger}"
                  f" ({host.replayed} lines replayed: {len(host.entries)} entries, net {host.net_fen()} fen)",
                  flush=True)
            await stop.wait()
        print(f"{args.kind} simulator stopped: {len(host.entries)} entries, net {host.net_fen()} fen", flush=True)

    asyncio.run(run())
    return 0


def cmd_sim_terminal(args: argparse.Namespace) -> int:
    from ..codecs.subfields import UploadRecord
    from ..simulators.journal import TerminalJournal
    from ..simulators.reply import mask_card
    from ..simulators.terminal import NoAnswer, Reply, TerminalClient, TerminalError, describe

    state_file = _state_path(args.terminal)
    state: dict[str, Any] = {"trace": 0, "batch": 1, "history": {}}
    if state_file.exists():
        state = json.loads(state_file.read_text())

    # A test tool: literal values are accepted, and '-' reads from standard input.
    args.tmk = common.secret(args.tmk, "--tmk", "terminal master key", literal_ok=True)
    args.pin = common.secret(args.pin, "--pin", "PIN", literal_ok=True)
    if args.tmk:
        state["tmk"] = args.tmk.upper()  # "loading the master key into the terminal"

    def key(name: str) -> bytes | None:
        return bytes.fromhex(state[name]) if state.get(name) else None

    async def run() -> Any:
        client = TerminalClient(args.host, args.port, args.terminal, args.merchant,
                                dialect_name=args.dialect, framing_name=args.framing,
                                batch=state["batch"], trace=state["trace"], timeout_s=args.timeout,
                                tmk=key("tmk"), default_pin=args.pin, pik=key("pik"), mak=key("mak"),
                                tdk=key("tdk"), double_mak=args.double_mak,
                                reversal_on_timeout=args.reversal_on_timeout, reversal_attempts=args.reversal_attempts,
                                reversal_delay_s=args.reversal_delay, journal=journal)
        # The terminal's batch store: its answered transactions of the open batch (from
        # the history it keeps) and, after a settlement, what is left to upload.
        client.batch_store = [Reply(h["request"], h["reply"]) for h in state["history"].values()
                              if h["request"].get("60", "")[2:8] == f"{client.batch:06d}" and not h.get("reversed")]
        if state.get("settled"):
            batch, balanced, records = state["settled"]
            client.settled = (batch, balanced, [UploadRecord(t, c, a) for t, c, a in records])
        async with client:
            try:
                reply = await operation(client)
            except NoAnswer as exc:  # reversed when it should be; the trace is used up all the same
                reply = Reply(exc.request, {})
                unanswered: NoAnswer | None = exc
            else:
                unanswered = None
            state["trace"], state["batch"] = client.trace, client.batch
            if args.op == "sign-off" and unanswered is None:
                client.pik = client.mak = client.tdk = None
            for name in ("pik", "mak", "tdk"):  # the terminal's working keys, kept like its secure memory
                value = getattr(client, name)
                state[name] = value.hex().upper() if value else None
            if args.op == "settle" and reply.approved and client.settled is not None:
                batch, balanced, records = client.settled
                state["settled"] = [batch, balanced, [[r.trace, r.card_number, r.amount_fen] for r in records]]
            if args.op == "upload" and reply.approved:
                state.pop("settled", None)
            if args.op == "reverse" and reply.approved and reply.request["11"] in state["history"]:
                state["history"][reply.request["11"]]["reversed"] = True
            if reply.request.get("t") in ("0200", "0220"):
                request = {k: v for k, v in reply.request.items() if k not in ("52", "64")}
                state["history"][reply.request["11"]] = {"request": request, "reply": reply.fields}
                while len(state["history"]) > 200:
                    state["history"].pop(next(iter(state["history"])))
            if unanswered is None:
                return describe(reply)
            card = reply.request.get("2")
            return {"mti": None, "rc": "no answer", "trace": reply.request.get("11"),
                    "card": mask_card(card) if card else None,
                    "amount_fen": int(reply.request["4"]) if "4" in reply.request else None,
                    "reversal_rc": (unanswered.reversal.rc if unanswered.reversal else "no answer")
                    if unanswered.reversal_attempts else None,
                    "reversal_attempts": unanswered.reversal_attempts}

    async def operation(client: TerminalClient) -> Reply:
        op = args.op
        if op == "sign-on":
            return await client.sign_on(args.key_scheme)
        if op == "sign-off":
            return await client.sign_off()
        if op == "echo":
            return await client.echo()
        if op == "inquiry":
            return await client.inquiry(args.card)
        if op in ("accrue", "redeem"):
            return await client.send(client.request(op, args.card, args.amount), tamper=args.tamper)
        if op == "cash-out":
            return await client.cash_out(args.card, args.amount, args.bank_card)
        if op == "insurance":
            return await client.insurance(args.card, args.amount, args.policy)
        if op == "settle":
            return await client.settle()
        if op == "upload":
            if client.settled is None:
                sys.exit(f"pointswitch: nothing to upload: settle first ({state_file})")
            return (await client.upload())[-1]  # the end message's answer
        original = state["history"].get(f"{int(args.trace):06d}")
        if original is None:
            sys.exit(f"pointswitch: no transaction with trace {args.trace} in {state_file}")
        orig = Reply(original["request"], original["reply"])
        if op == "void":
            return await client.void(orig)
        if op == "refund":
            return await client.refund(orig, args.amount)
        return await client.reverse(orig.request)

    journal = TerminalJournal(args.journal) if args.journal else None
    try:
        result = asyncio.run(run())
    except (TerminalError, OSError) as exc:
        sys.exit(f"pointswitch: {exc}")
    finally:
        if journal is not None:
            journal.close()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the terminal's keys
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state))
    common.print_result(result, args.json, lambda d: "\n".join(f"{k:<15} {v}" for k, v in d.items() if v is not None))
    return 0 if result["rc"] == "00" else 1


def cmd_sim_load(args: argparse.Namespace) -> int:
    from ..app import install_uvloop
    from ..simulators.load import LoadPlan, run_load

    tmk = common.secret(args.tmk, "--tmk", "terminal master key", literal_ok=True)
    pin = common.secret(args.pin, "--pin", "PIN", literal_ok=True)
    mix = {}
    for part in args.mix.split(","):
        name, _, weight = part.partition("=")
        if name not in ("accrue", "inquiry", "redeem", "cash_out") or not weight.isdigit():
            sys.exit("pointswitch: --mix is like accrue=80,inquiry=10,redeem=10 (also cash_out=N)")
        mix[name] = int(weight)
    plan = LoadPlan(
        host=args.host, port=args.port, merchant_id=args.merchant, terminal_prefix=args.terminal_prefix,
        first_terminal=args.first_terminal, connections=args.connections, depth=args.depth,
        duration_s=None if args.count else args.duration, count=args.count,
        first_card=int(args.first_card), cards=args.cards, mix=mix, dialect=args.dialect,
        framing=args.framing, seed=args.seed,
        tmk=bytes.fromhex(tmk) if tmk else None, pin=pin or "", timeout_s=args.timeout,
        reversal_on_timeout=args.reversal_on_timeout, reversal_attempts=args.reversal_attempts,
        reversal_delay_s=args.reversal_delay, journal=Path(args.journal) if args.journal else None,
    )
    install_uvloop()
    report = asyncio.run(run_load(plan, progress=None if args.json else sys.stderr))
    result = report.as_dict()
    if args.latencies:
        result["latencies_ms"] = [round(x, 3) for x in report.latencies_ms]
    common.print_result(result, args.json, lambda _d: report.render())
    return 0 if report.latencies_ms else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sim = sub.add_parser("sim", help="simulators").add_subparsers(dest="sim", required=True)
    st = sim.add_parser("terminal", help="a UnionPay-style POS terminal")
    st.add_argument("op", choices=["sign-on", "sign-off", "echo", "inquiry", "accrue", "redeem",
                                   "cash-out", "insurance", "void", "refund", "reverse", "settle", "upload"],
                    help="settle: batch settlement (0500) with the terminal's own totals; upload: the settled"
                         " batch's records (0320), then the end of the upload")
    st.add_argument("--host", default=os.environ.get("POINTSWITCH_HOST", "127.0.0.1"))
    st.add_argument("--port", type=int, default=5000)
    st.add_argument("--dialect", default="cup", choices=["cup", "iso87"])
    st.add_argument("--framing", default="binary2", choices=["binary2", "ascii4"])
    st.add_argument("--terminal", required=True, help="terminal id (field 41)")
    st.add_argument("--merchant", required=True, help="merchant id (field 42)")
    st.add_argument("--card", help="card number (field 2)")
    st.add_argument("--amount", type=common.yuan_to_fen, help="amount in yuan, e.g. 12.50")
    st.add_argument("--trace", help="trace of the original (void, refund, reverse)")
    st.add_argument("--bank-card", help="the bank card to credit (cash-out, field 48)")
    st.add_argument("--policy", help="the policy whose premium is paid (insurance, field 48)")
    st.add_argument("--tmk", help="load this terminal master key (32 hex digits; '-' reads it from standard"
                    " input); kept in the terminal's state")
    st.add_argument("--pin", help="the member's PIN, typed on the PIN pad (inquiry, redeem; '-' reads it from"
                    " standard input)")
    st.add_argument("--key-scheme", default="003", choices=["001", "003", "004"], help="sign-on 60.3")
    st.add_argument("--double-mak", action=argparse.BooleanOptionalAction, default=None,
                    help="the terminal's profile has a double-length MAK (default: yes for iso87, no for cup)")
    st.add_argument("--tamper", action="store_true",
                    help="change one byte of the message after its MAC was computed (shows the A0 path)")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    _practice_options(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_sim_terminal)

    for kind in ("bank", "insurer"):
        sh = sim.add_parser(kind, help=f"an upstream {kind} host (iso87) that pointswitch connects to")
        sh.add_argument("--host", default="127.0.0.1")
        sh.add_argument("--port", type=int, default=6000 if kind == "bank" else 6001)
        sh.add_argument("--framing", default="ascii4", choices=["binary2", "ascii4"])
        sh.add_argument("--rules", help="TOML file of [[rule]] tables (action, rc, delay_s, card, policy, amount_over,"
                                        " times)")
        sh.add_argument("--decline-card" if kind == "bank" else "--decline-policy", action="append", default=[],
                        dest="decline", help="decline requests for this card / policy (05); repeatable")
        sh.add_argument("--decline-amount-over", type=int, help="decline amounts above this many fen (61)")
        sh.add_argument("--delay", type=float, default=0.0, help="answer every request this many seconds late")
        sh.add_argument("--drop-every", type=int, default=0, help="never answer every Nth request")
        sh.add_argument("--no-reversal-ack", action="store_true", help="receive reversals but never acknowledge")
        sh.add_argument("--reversal-rc", default="00",
                        help="answer reversals with this code; other than 00 = refused, nothing undone")
        sh.add_argument("--tls-cert", help="serve TLS with this certificate (PEM) ...")
        sh.add_argument("--tls-key", help="... and its private key (PEM)")
        sh.add_argument("--tls-client-ca", help="require a client certificate signed by this CA (PEM)")
        sh.add_argument("--mac-key-file", help="X9.19 MAC key (32 hex digits): requests checked, answers signed")
        sh.add_argument("--ledger", help="the host's ledger, a JSON-lines file: replayed at start, every credit,"
                        " decline and reversal appended before it is answered (default: sim-hosts/KIND-PORT.jsonl"
                        " in the user state folder)")
        sh.set_defaults(func=cmd_sim_host, kind=kind)

    sl = sim.add_parser("load", help="load generator")
    sl.add_argument("--host", default="127.0.0.1")
    sl.add_argument("--port", type=int, default=5000)
    sl.add_argument("--dialect", default="cup", choices=["cup", "iso87"])
    sl.add_argument("--framing", default="binary2", choices=["binary2", "ascii4"])
    sl.add_argument("--merchant", default="MLOAD0000000001")
    sl.add_argument("--terminal-prefix", default="L")
    sl.add_argument("--first-terminal", type=int, default=1,
                    help="the first load terminal's number: several load processes use terminals of their own")
    sl.add_argument("--connections", type=int, default=8)
    sl.add_argument("--depth", type=int, default=1, help="requests outstanding per connection")
    sl.add_argument("--duration", type=float, default=10.0, help="seconds")
    sl.add_argument("--count", type=int, help="total requests (instead of a duration)")
    sl.add_argument("--cards", type=int, default=1000)
    sl.add_argument("--first-card", default="6288990000000000")
    sl.add_argument("--mix", default="accrue=80,inquiry=10,redeem=10")
    sl.add_argument("--seed", type=int, default=None, help="random seed (default: fresh each run)")
    sl.add_argument("--tmk", help="master key of the load terminals (from admin seed; '-' reads it from standard"
                    " input)")
    sl.add_argument("--pin", default="123456", help="PIN of the load cards ('-' reads it from standard input)")
    sl.add_argument("--timeout", type=float, default=10.0, help="seconds a terminal waits for an answer (default 10)")
    _practice_options(sl)
    sl.add_argument("--json", action="store_true")
    sl.add_argument("--latencies", action="store_true",
                    help="with --json: every answer's latency too, so the reports of several processes merge exactly")
    sl.set_defaults(func=cmd_sim_load)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def _practice_options(parser: argparse.ArgumentParser) -> None:
    """Terminal practice: reversal of what goes unanswered, and the terminal's journal."""
    parser.add_argument("--no-reversal-on-timeout", dest="reversal_on_timeout", action="store_false",
                        help="do not reverse a financial request left unanswered (by default it is reversed: 0400,"
                             " 39 = 98, repeated until answered)")
    parser.add_argument("--reversal-attempts", type=_positive_int, default=3,
                        help="times the reversal is sent at most (default 3)")
    parser.add_argument("--reversal-delay", type=_seconds, default=1.0,
                        help="seconds between two attempts of the reversal (default 1)")
    parser.add_argument("--journal", help="append every request and its outcome to this JSON-lines file")


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot say: which options each terminal operation needs."""
    if args.command == "sim" and args.sim == "terminal":
        needs_card = args.op in ("inquiry", "accrue", "redeem", "cash-out", "insurance")
        if needs_card and not args.card:
            sys.exit("pointswitch: --card is required for " + args.op)
        if args.op == "cash-out" and not args.bank_card:
            sys.exit("pointswitch: --bank-card is required for cash-out")
        if args.op == "insurance" and not args.policy:
            sys.exit("pointswitch: --policy is required for insurance")
        if args.op in ("accrue", "redeem", "refund", "cash-out", "insurance") and args.amount is None:
            sys.exit("pointswitch: --amount is required for " + args.op)
        if args.op in ("void", "refund", "reverse") and not args.trace:
            sys.exit("pointswitch: --trace of the original is required for " + args.op)
