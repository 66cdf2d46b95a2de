"""Adaptability: preference (being built)."""
