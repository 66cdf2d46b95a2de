"""Run directories, metrics sinks and console progress."""

from fedfm.tracking.console import ConsoleProgress, summary_table
from fedfm.tracking.run_dir import MetricsFileSink, RunDirectory

__all__ = ["ConsoleProgress", "MetricsFileSink", "RunDirectory", "summary_table"]
