"""Judging and reporting one run of ``bench/throughput.py``: what makes it a failure,
what makes its figures doubtful, and the report a person reads."""

from __future__ import annotations

from typing import Any

import statements

EXPECTED_DECLINES = {"51"}  # redeeming more points than the card holds: the load's normal refusals
MAX_FAILURE_RATE = 0.01  # unexpected codes and transport errors, as a share of requests
LOAD_GENERATOR_LIMIT = 90.0  # % of one core: the load generator (one process, one thread) is the limit past this
OTHER_CPU_WARNING = 15.0  # % of one core used by other processes during a measurement: its figures are disturbed


def disturbed(cpu: dict[str, Any]) -> bool:
    """Other work on the machine took a noticeable share of the CPU during a measurement."""
    return float(cpu.get("other", 0.0)) > OTHER_CPU_WARNING


def check(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What makes the run a failure; and what makes its figures doubtful."""
    problems, warnings = [], []
    load = result["load"]
    requests = max(int(load.get("requests", 0)), 1)
    codes: dict[str, int] = load.get("response_codes", {})
    unexpected = {c: n for c, n in codes.items() if c != "00" and c not in EXPECTED_DECLINES}
    errors = sum(load.get("errors", {}).values())
    bad = sum(unexpected.values()) + errors
    if bad / requests > MAX_FAILURE_RATE:
        problems.append(f"{bad} of {requests} requests ({100 * bad / requests:.2f} %) failed: codes {unexpected},"
                        f" transport errors {load.get('errors')}")
    elif bad:
        warnings.append(f"{bad} of {requests} requests failed (under the 1 % limit): codes {unexpected},"
                        f" transport errors {load.get('errors')}")
    if not load.get("answered"):
        problems.append("no request was answered")
    if result["switch_exit_code"] != 0:
        problems.append(f"the switch exited {result['switch_exit_code']} after SIGTERM (expected 0)")
    logged = {k: v for k, v in result["switch_log"].get("notable", {}).items() if not k.startswith("warning")}
    if logged:
        problems.append(f"the switch logged errors: {logged}")
    if result["pgbench"].get("failed_transactions"):
        problems.append(f"pgbench: {result['pgbench']['failed_transactions']} failed transactions")
    if disturbed(load["cpu_percent_of_one_core"]):
        warnings.append("other processes used the CPU during the load: the switch's figures are low")
    generator = float(load["cpu_percent_of_one_core"].get("load_generator", 0.0))
    if generator >= LOAD_GENERATOR_LIMIT * int(load.get("load_processes", 1)):
        warnings.append(f"the load generator used {generator} % of one core over {load.get('load_processes', 1)}"
                        " process(es): it, not the switch, limited this run (more: --load-processes)")
    if disturbed(result["pgbench"]["cpu_percent_of_one_core"]):
        warnings.append("other processes used the CPU during pgbench: its figure is low")
    return problems, warnings


def render(r: dict[str, Any]) -> str:
    m, s, b, load, pgb = r["machine"], r["settings"], r["build"], r["load"], r["pgbench"]
    mem, cpu, pcpu = load["switch_process"], load["cpu_percent_of_one_core"], pgb["cpu_percent_of_one_core"]
    codes = "  ".join(f"{c}: {n}" for c, n in load.get("response_codes", {}).items())
    ops = "  ".join(f"{o}: {n}" for o, n in load.get("operations", {}).items())
    notable = r["switch_log"].get("notable") or "none"

    def others(c: dict[str, Any]) -> str:
        names = ", ".join(f"{n} {v}" for n, v in c["other_processes"].items())
        return f"other {c['other']}" + (f" ({names})" if names else "") + ("  << DISTURBED" if disturbed(c) else "")

    lines = [
        "pointswitch throughput",
        f"  machine      {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM",
        f"               {m['os']}, Python {m['python']}, PostgreSQL {m['postgresql']}",
        f"  build        {b['executable']}",
        f"               package {b['package']} ({b['commit'] or 'no git'}), Python {b['python']},"
        f" terminal security {'yes (MAC, PIN)' if b['terminal_security'] else 'no'}",
        f"  settings     {s['connections']} connections x depth {s['depth']}, {s['duration_s']:g} s,"
        f" {s['terminals']} terminals, {s['cards']} cards, mix {s['mix']}, switch log level {s['switch_log_level']}",
        "",
        f"  switch       {load.get('throughput_tps')} req/s ({load.get('answered')} answered of"
        f" {load.get('requests')} in {load.get('elapsed_s')} s)",
        f"  latency ms   p50 {load.get('latency_ms_p50')}  p95 {load.get('latency_ms_p95')}"
        f"  p99 {load.get('latency_ms_p99')}  max {load.get('latency_ms_max')}  mean {load.get('latency_ms_mean')}",
        f"  codes        {codes}",
        f"  operations   {ops}",
        f"  errors       {load.get('errors') or 'none'}",
        f"  switch RSS   peak {mem['rss_mib_peak']} MiB (before the load {mem['rss_mib_before_load']},"
        f" after {mem['rss_mib_after_load']}; {mem['rss_mib_growth_second_half']:+} MiB over its second half;"
        f" {mem['rss_samples']} samples)",
        f"  CPU          % of one core: switch {cpu['switch']}, load generator {cpu['load_generator']},"
        f" PostgreSQL {cpu['postgres']}, {others(cpu)}; machine {load['machine_cpu_percent']} % busy",
        f"  switch exit  {r['switch_exit_code']} after SIGTERM",
        f"  switch log   {r['switch_log'].get('lines_by_level')}; warnings/errors: {notable}",
        *([f"  bank host    {r['bank_simulator']}"] if r.get("bank_simulator") else []),
        *(statements.render(r["statements"], int(load.get("answered") or 0)) if r.get("statements") else []),
        "",
        f"  pgbench -N   {pgb['tps']} tps ({pgb['clients']} clients, {pgb['jobs']} jobs, {pgb['duration_s']} s,"
        f" scale {pgb['scale']}, latency avg {pgb['latency_ms_avg']} ms)",
        f"  CPU          % of one core: PostgreSQL {pcpu['postgres']}, pgbench {pcpu['pgbench']}, {others(pcpu)};"
        f" machine {pgb['machine_cpu_percent']} % busy",
        "",
        f"  ratio        switch / pgbench -N = {r['switch_per_pgbench']}",
        *(f"  warning      {w}" for w in r["warnings"]),
        "  result       " + ("OK" if r["ok"] else "FAILED: " + "; ".join(r["problems"])),
    ]
    return "\n".join(lines)
