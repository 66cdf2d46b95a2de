"""Federated algorithms: client procedures and server rules, registered by name.

Importing this package registers every algorithm, server optimizer and aggregator.
"""

from fedfm.algorithms import aggregation, fedavg, fedprox, scaffold, server_opt
from fedfm.algorithms.local_train import train_locally

__all__ = ["aggregation", "fedavg", "fedprox", "scaffold", "server_opt", "train_locally"]
