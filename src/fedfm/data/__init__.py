"""Data for federated runs: read rows, validate and tokenize them, split them over clients.

``build_federated_data(cfg, num_clients=..., tokenizer=..., task=..., max_length=..., seed=...)``
is the entry point; ``load_label_info`` gives classification labels before any tokenization;
``collate`` pads a batch; ``PARTITIONERS`` holds the partitioners by name.
"""

from fedfm.data.federated import (
    ClientData,
    FederatedData,
    build_federated_data,
    check_task,
    collate,
    describe_federated_data,
    load_label_info,
)
from fedfm.data.formats import IGNORE_INDEX, LabelSpace, Records, load_records, tokenize_records
from fedfm.data.partition import PARTITIONERS, PartitionError, partition
from fedfm.data.sources import DataError, read_rows
from fedfm.data.stats import ClientStats, DataStats, render_stats_table

__all__ = [
    "IGNORE_INDEX",
    "PARTITIONERS",
    "ClientData",
    "ClientStats",
    "DataError",
    "DataStats",
    "FederatedData",
    "LabelSpace",
    "PartitionError",
    "Records",
    "build_federated_data",
    "check_task",
    "collate",
    "describe_federated_data",
    "load_label_info",
    "load_records",
    "partition",
    "read_rows",
    "render_stats_table",
    "tokenize_records",
]
