"""Bundled data for demos and tests (nothing is downloaded)."""

from fastprune.data.digits import Digits, digits

__all__ = ["Digits", "digits"]
