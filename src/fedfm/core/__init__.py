"""Core contracts of fedfm: State, ClientUpdate, registries, the round loop, checkpoints.

``core`` imports nothing else of fedfm; everything else builds on it.
"""
