"""Peak memory of a process tree: the summed RSS of this process and all its descendants.

Every variant of bench/simulation.py is measured the same way, so a process that forks helpers
(Ray's raylet and workers, inductor's C++ compiler) pays for what runs at the same time as it,
and nothing is counted twice. The sampler is combined with the process's own ``ru_maxrss``
(exact, never missed between samples) by ``peak_tree_rss_mb``.
"""

from __future__ import annotations

import contextlib
import resource
import threading

import psutil

SAMPLE_INTERVAL_S = 0.2


class TreeRssSampler(threading.Thread):
    """Peak of the summed RSS of this process and all its descendants."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_bytes = 0
        self.max_processes = 0
        self.max_by_name: dict[str, int] = {}  # process name -> most alive at once
        self.actor_nice: set[int] = set()  # nice values seen on ClientApp actors
        self.cpu_s: dict[int, float] = {}  # pid -> last seen user+system CPU seconds
        self._stop_event = threading.Event()
        self._root = psutil.Process()

    def sample(self) -> None:
        total, procs = 0, 0
        names: dict[str, int] = {}
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
                times = proc.cpu_times()
                self.cpu_s[proc.pid] = times.user + times.system
                name = proc.name() if proc is not self._root else "driver"
                if name.startswith("ray::ClientAppActor"):
                    name = "ray::ClientAppActor"
                    self.actor_nice.add(proc.nice())
                procs += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            names[name] = names.get(name, 0) + 1
        self.peak_bytes = max(self.peak_bytes, total)
        self.max_processes = max(self.max_processes, procs)
        for name, count in names.items():
            self.max_by_name[name] = max(self.max_by_name.get(name, 0), count)

    def run(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(psutil.Error):
                self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def peak_tree_rss_mb(sampler: TreeRssSampler) -> float:
    """The larger of the sampled tree peak and this process's own exact peak, in MiB."""
    own_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(sampler.peak_bytes / 2**20, own_kib / 1024)
