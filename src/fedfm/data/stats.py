"""Statistics of a federated data split and their rich table (``fedfm data stats CONFIG``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

HISTOGRAM_BINS_SHOWN = 6


@dataclass
class ClientStats:
    """One client: sizes and the histogram of its training rows over ``DataStats.histogram_key``."""

    client_id: int
    train_size: int
    validation_size: int
    histogram: dict[str, int] = field(default_factory=dict)


@dataclass
class DataStats:
    """What ``build_federated_data`` made, and every row it left out and why."""

    source: str
    format: str
    task: str
    partition: str  # e.g. "dirichlet(alpha=0.5, by=label)"
    histogram_key: str | None  # column the histograms count (partition column or label)
    clients: list[ClientStats]
    global_validation_size: int
    global_validation_source: str  # a file, or "held out from <path>"
    rows_loaded: int  # valid training-source rows before the global validation hold-out
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows (on_error="skip")
    skipped_examples: list[str] = field(default_factory=list)  # first few messages
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> tokenized examples
    label_names: list[str] | None = None

    @property
    def total_train(self) -> int:
        return sum(c.train_size for c in self.clients)

    @property
    def total_validation(self) -> int:
        return sum(c.validation_size for c in self.clients)

    @property
    def skew(self) -> float | None:
        """Mean over clients of the total-variation distance between a client's histogram and
        the histogram of all clients' training rows: 0 when every client looks like the whole,
        near 1 - 1/K when each holds a single one of K equally common values. ``None`` without
        histograms."""
        total = _merge([c.histogram for c in self.clients])
        count = sum(total.values())
        distances = [total_variation(c.histogram, total, count) for c in self.clients
                     if sum(c.histogram.values()) > 0]
        return sum(distances) / len(distances) if distances and count else None

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for run directories and ``--json`` output)."""
        return {
            "source": self.source, "format": self.format, "task": self.task,
            "partition": self.partition, "histogram_key": self.histogram_key,
            "clients": [vars(c) for c in self.clients],
            "global_validation_size": self.global_validation_size,
            "global_validation_source": self.global_validation_source,
            "rows_loaded": self.rows_loaded, "skipped": dict(self.skipped),
            "skipped_examples": list(self.skipped_examples), "dropped": dict(self.dropped),
            "label_names": self.label_names, "skew": self.skew,
        }


def total_variation(histogram: dict[str, int], reference: dict[str, int],
                    reference_count: int) -> float:
    """``(1/2) sum_v |p(v) - q(v)|`` of the two normalized histograms."""
    size = sum(histogram.values())
    names = set(histogram) | set(reference)
    return 0.5 * sum(abs(histogram.get(v, 0) / size - reference.get(v, 0) / reference_count)
                     for v in names)


def compact_histogram(histogram: dict[str, int], bins: int = HISTOGRAM_BINS_SHOWN) -> str:
    """``"neg:120 pos:80"``; the largest ``bins`` bins, then ``+k more``."""
    if not histogram:
        return "-"
    ranked = sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = sorted(ranked[:bins])
    text = " ".join(f"{name}:{count}" for name, count in shown)
    rest = len(ranked) - len(shown)
    return f"{text} +{rest} more" if rest else text


def _merge(histograms: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for histogram in histograms:
        for name, count in histogram.items():
            total[name] = total.get(name, 0) + count
    return total


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))


def render_stats_table(stats: DataStats) -> Table:
    """Per-client sizes and histograms, a totals row, and a caption with skipped/dropped rows."""
    key = stats.histogram_key or "-"
    table = Table(title=f"{stats.source} - {stats.format} / {stats.task}, "
                        f"{len(stats.clients)} clients, {stats.partition}")
    table.add_column("client", justify="right")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    table.add_column(f"histogram ({key})", overflow="fold")
    for client in stats.clients:
        table.add_row(str(client.client_id), str(client.train_size),
                      str(client.validation_size), compact_histogram(client.histogram))
    table.add_section()
    table.add_row("total", str(stats.total_train), str(stats.total_validation),
                  compact_histogram(_merge([c.histogram for c in stats.clients])))
    skipped = f"skipped {stats.num_skipped} rows" + (
        f" ({_reasons(stats.skipped)})" if stats.skipped else "")
    dropped = f"dropped {stats.num_dropped} examples" + (
        f" ({_reasons(stats.dropped)})" if stats.dropped else "")
    skew = stats.skew
    measured = ("" if skew is None else
                f"skew (mean total-variation distance of a client's {key} histogram from the "
                f"total): {skew:.3f}; ")
    table.caption = (f"{measured}global validation: {stats.global_validation_size} rows "
                     f"({stats.global_validation_source}); {skipped}; {dropped}")
    return table
