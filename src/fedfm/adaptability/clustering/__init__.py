"""Adaptability: clustering (being built)."""
