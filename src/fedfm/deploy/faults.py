"""Fault injection for the crash-recovery tests: ``FEDFM_CRASH_AT=point:round[:count]`` makes
the process that reaches that point kill itself with SIGKILL -- no cleanup, no flush, exactly
what ``kill -9`` does -- so a test can stop the coordinator or an agent at a precise moment."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "FEDFM_CRASH_AT"


def crash_point(point: str, round_index: int, count: int | None = None) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    parts = wanted.split(":")
    if parts[0] != point or int(parts[1]) != round_index:
        return
    if len(parts) > 2 and count != int(parts[2]):
        return
    os.kill(os.getpid(), signal.SIGKILL)
