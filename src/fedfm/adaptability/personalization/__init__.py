"""Adaptability: personalization (being built)."""
