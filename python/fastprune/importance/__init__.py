"""Importance criteria: score tensors, one per prunable parameter (or channel)."""

from fastprune.importance.magnitude import magnitude_scores

__all__ = ["magnitude_scores"]
