"""Secure aggregation (SecAgg+): a transport-independent protocol and its in-process driver."""
