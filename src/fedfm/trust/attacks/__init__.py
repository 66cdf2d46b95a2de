"""Privacy attacks as evaluation tools (membership inference)."""
