"""The fault campaign's parts (bench/faults.py runs them): processes it starts and breaks,
terminals that keep a journal of what they were told, a fuzzer, the fault schedule, and the
reconciliation of every terminal's view against the ledger and the upstream hosts' journals."""
