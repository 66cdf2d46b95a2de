"""Adaptability: domains (being built)."""
