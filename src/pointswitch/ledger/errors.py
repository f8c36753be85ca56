"""Errors of the operator functions."""

from __future__ import annotations


class AdminError(ValueError):
    """A refusal an operator can act on (unknown id, bad value, duplicate)."""
