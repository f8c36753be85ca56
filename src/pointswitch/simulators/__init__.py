"""Terminals and hosts that speak the same wire as the switch (codecs only), for
tests, demos and load."""
