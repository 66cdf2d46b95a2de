"""The deployment on loopback against the local runtime, on W1's model (see bench/overhead.py).

The config is W1's (tiny-llama, LoRA r=8 alpha=16 on q_proj/v_proj, AdamW lr 1e-3, 10 local
steps of batch 8, fp32 on CPU, evaluation off) on real text, since agents read their data from
files: the first 2000 rows of examples/data/dolly_train.jsonl (instruction format,
``model.max_length`` 128), partitioned iid over ``--agents`` clients, ``--clients-per-round``
of them per round, ``--rounds`` rounds. Three measurements, all in one invocation:

* ``local``: ``fedfm.run`` with the local runtime on that config, in a child process (all cores,
  clients one after another): seconds per round (``wall_time.round`` of metrics.jsonl), the mean
  and the steady state (round 1 left out), and the process's peak RSS. This is the baseline.
* ``remote``: a coordinator process (``fedfm server``, uvicorn on 127.0.0.1) plus one
  ``fedfm client`` process per client (``runtime.num_threads: 1``): seconds per round from the
  coordinator's metrics.jsonl (the same fields) and ``x_local`` (remote over local, steady
  state), setup (coordinator start to round 1 opened, and to its first accepted update), the
  full round cycle from the coordinator's database (round closed to round closed, checkpoint
  included), the coordinator's peak RSS (that process alone: its kernel high-water mark,
  VmHWM, and sampled RSS), the agents' peak summed RSS, and the largest difference between the
  final global State and the local run's (must be <= 1e-5). ``deploy.min_clients`` is set to
  the number of agents, so round 1 starts once all are online and every round selects exactly
  the clients the local run selects.
* ``upload``: a dedicated coordinator process with K = ``--upload-clients`` clients, all in
  every round, and K threads of this process acting as clients over httpx on loopback: each
  polls its task, downloads the broadcast, builds an update of the right shapes (random values,
  ``fedfm.deploy.wire.update_to_bytes``), waits at a barrier, then PUTs it. The PUT is answered
  after the upload is streamed to disk, SHA-256 checked, validated, fsynced and committed, so
  the times are end to end. The first ``--upload-rounds`` rounds upload one at a time
  (``sequential``), the next as many all K at once (``concurrent``, the top-level numbers):
  MB/s and uploads/s over the rounds' upload windows (first PUT sent to last answered), per
  upload latency, and the update size. One line per adapter rank in ``--upload-ranks``.

Every line is one JSON object with ``bench: "deploy"`` and the machine (CPU count, torch
version). MB are 2**20 bytes. Every child process runs in its own process group and is
killed at the end whatever happens; every wait is bounded.

    python bench/deploy.py [--agents 20] [--clients-per-round 10] [--rounds 3]
                           [--upload-clients 10] [--upload-rounds 3] [--upload-ranks 8,64]
                           [--keep] [--timeout-s 3600]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import w1_config  # noqa: E402
from process_tree import TreeRssSampler, peak_tree_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "dolly_train.jsonl"
MAX_ROWS = 2000
API = "/api/v1"
MB = 2**20
SAMPLE_INTERVAL_S = 0.25


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__,
            "machine": platform.machine(), "python": platform.python_version()}


def emit(result: dict[str, Any]) -> None:
    print(json.dumps({"bench": "deploy", **result, **machine()}), flush=True)


def note(message: str) -> None:
    print(f"[deploy] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- config


def bench_config(*, num_clients: int, per_round: int, rounds: int, rank: int = 8,
                 output_dir: Path | None = None) -> dict[str, Any]:
    """W1's config (bench/overhead.py) on Dolly rows, as a plain dict for YAML."""
    raw = w1_config(rounds).model_dump(mode="json")
    raw["name"] = "bench-deploy"
    raw["data"] = {"path": str(DATA), "format": "instruction", "max_rows": MAX_ROWS,
                   "partition": {"kind": "iid"}}
    raw["adapter"]["r"] = rank
    raw["federation"].update(num_clients=num_clients, clients_per_round=per_round,
                             rounds=rounds)
    raw["eval"]["enabled"] = False
    raw["runtime"].update(precision="fp32", device="cpu")
    raw["tracking"].update(console=False, output_dir=str(output_dir or "runs"))
    # every client online before round 1: the coordinator then selects what the loop selects
    raw["deploy"].update(min_clients=num_clients, round_timeout_s=600.0, long_poll_s=5.0,
                         heartbeat_s=5.0)
    return raw


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per round (mean, steady state without round 1), client times, bytes up."""
    rounds = [float(r["wall_time"]["round"]) for r in records]
    steady = rounds[1:] or rounds
    clients = [float(c["wall_time"]) for r in records for c in r["clients"].values()
               if c.get("status") == "ok"]
    return {
        "rounds_logged": len(records),
        "wall_per_round_s": round(statistics.fmean(steady), 3),
        "wall_per_round_mean_s": round(statistics.fmean(rounds), 3),
        "round_s": [round(t, 3) for t in rounds],
        "client_wall_mean_s": round(statistics.fmean(clients), 3) if clients else None,
        "bytes_up_per_round": int(statistics.fmean(int(r["bytes_up"]) for r in records)),
        "updates_per_round": round(statistics.fmean(len(r["completed"]) for r in records), 2),
    }


# --------------------------------------------------------------------------- processes


def popen(command: list[str], log: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    """A child in its own process group (so it and anything it forks can be killed)."""
    with open(log, "ab") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after 5 s."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def vm_hwm_bytes(pid: int) -> int:
    """The kernel's peak-RSS high-water mark of a process (Linux), 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssWatch(threading.Thread):
    """Samples one main process alone and the summed RSS of a group of others."""

    def __init__(self, main_pid: int, others: list[int] | None = None) -> None:
        super().__init__(daemon=True)
        self.main_pid = main_pid
        self.others: list[int] = list(others or [])
        self.main_rss = 0
        self.main_hwm = 0
        self.others_sum = 0
        self.others_hwm: dict[int, int] = {}
        self._stop_event = threading.Event()

    def _rss(self, pid: int) -> int:
        try:
            root = psutil.Process(pid)
            total = root.memory_info().rss
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return total
        except psutil.Error:
            return 0

    def sample(self) -> None:
        self.main_rss = max(self.main_rss, self._rss(self.main_pid))
        self.main_hwm = max(self.main_hwm, vm_hwm_bytes(self.main_pid))
        others = list(self.others)
        self.others_sum = max(self.others_sum, sum(self._rss(pid) for pid in others))
        for pid in others:
            self.others_hwm[pid] = max(self.others_hwm.get(pid, 0), vm_hwm_bytes(pid))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def main_peak_mb(self) -> float:
        return round(max(self.main_rss, self.main_hwm) / MB, 1)


def start_coordinator(config: Path, state_dir: Path, log: Path, timeout: float
                      ) -> tuple[subprocess.Popen[bytes], str, float]:
    """``fedfm server`` on a free loopback port; (process, URL, seconds until it listened)."""
    endpoint = state_dir / "endpoint.json"
    endpoint.unlink(missing_ok=True)
    started = time.perf_counter()
    process = popen([sys.executable, "-m", "fedfm.cli", "server", str(config), "--state-dir",
                     str(state_dir), "--port", "0", "--host", "127.0.0.1", "--linger", "2"], log)
    deadline = started + timeout
    while not endpoint.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {process.returncode}:\n"
                               f"{log_tail(log)}")
        if time.perf_counter() > deadline:
            kill_group(process)
            raise RuntimeError(f"the coordinator did not listen within {timeout:.0f} s")
        time.sleep(0.05)
    return process, json.loads(endpoint.read_text())["url"], time.perf_counter() - started


def add_clients(state_dir: Path, count: int) -> list[str]:
    from fedfm.deploy.store import StateStore

    store = StateStore(state_dir / "coordinator.db")
    try:
        return [store.add_client(f"site{i}", client_id=i)[1] for i in range(count)]
    finally:
        store.close()


def db_rows(state_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(state_dir / "coordinator.db", timeout=30.0)
    try:
        return list(db.execute(sql))
    finally:
        db.close()


# --------------------------------------------------------------------------- local


def child_local(config_path: Path) -> None:
    """In a child process: the local runtime on the config; one JSON line."""
    import fedfm
    from fedfm.config import config_from_dict

    raw = yaml.safe_load(config_path.read_text())
    sampler = TreeRssSampler()
    sampler.start()
    started = time.perf_counter()
    try:
        result = fedfm.run(config_from_dict(raw), console=False)
    finally:
        sampler.stop()
    print(json.dumps({"run_dir": str(result.run_dir), "wall_s": time.perf_counter() - started,
                      "peak_rss_mb": round(peak_tree_rss_mb(sampler), 1),
                      "threads": torch.get_num_threads()}))


def run_local(raw: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    config = write_yaml(work / "local.yaml", raw)
    log = work / "local.log"
    process = popen([sys.executable, __file__, "--child-local", str(config)], log)
    try:
        process.wait(timeout=timeout)
    finally:
        kill_group(process)
    if process.returncode != 0:
        raise RuntimeError(f"the local run failed ({process.returncode}):\n{log_tail(log)}")
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    found = json.loads(lines[-1])
    run_dir = Path(found["run_dir"])
    return {"run_dir": run_dir, "wall_s": round(found["wall_s"], 3),
            "peak_rss_mb": found["peak_rss_mb"], "threads": found["threads"],
            **round_stats(read_metrics(run_dir / "metrics.jsonl"))}


# --------------------------------------------------------------------------- remote


def run_remote(raw: dict[str, Any], work: Path, agents: int, timeout: float) -> dict[str, Any]:
    state_dir = work / "state"
    config = write_yaml(work / "server.yaml", raw)
    tokens = add_clients(state_dir, agents)
    processes: list[subprocess.Popen[bytes]] = []
    watch: RssWatch | None = None
    started_wall = time.time()
    started = time.perf_counter()
    try:
        server, url, listen_s = start_coordinator(config, state_dir, work / "server.log", 120)
        processes.append(server)
        watch = RssWatch(server.pid)
        watch.start()
        for index, token in enumerate(tokens):
            client_yaml = write_yaml(work / f"client{index}.yaml", {
                "data": {"path": str(DATA)}, "partition": {"of": agents, "index": index},
                "state_dir": str(work / f"agent{index}"),
                "runtime": {"device": "cpu", "precision": "fp32", "num_threads": 1},
                "max_backoff_s": 2.0})
            agent = popen([sys.executable, "-m", "fedfm.cli", "client", "--server", url,
                           "--config", str(client_yaml)], work / f"agent{index}.log",
                          env={"FEDFM_TOKEN": token})
            processes.append(agent)
            watch.others.append(agent.pid)
        try:
            code = server.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the remote run did not finish within {timeout:.0f} s:\n"
                               f"{log_tail(work / 'server.log')}") from None
        total_s = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"the coordinator exited with {code}:\n"
                               f"{log_tail(work / 'server.log')}")
        agent_codes = []
        for agent in processes[1:]:
            try:
                agent_codes.append(agent.wait(timeout=60))
            except subprocess.TimeoutExpired:
                agent_codes.append(None)
    finally:
        if watch is not None:
            watch.stop()
        for process in processes:
            kill_group(process)
    assert watch is not None
    opened = dict(db_rows(state_dir, "SELECT round, opened_at FROM rounds"))
    closed = dict(db_rows(state_dir, "SELECT round, closed_at FROM rounds"))
    first_update = db_rows(state_dir, "SELECT MIN(received_at) FROM updates WHERE round = 1")
    cycles = [closed[r] - closed[r - 1] for r in sorted(closed)
              if r - 1 in closed and closed[r] and closed[r - 1]]
    stats = round_stats(read_metrics(state_dir / "run" / "metrics.jsonl"))
    return {
        "state_dir": state_dir,
        **stats,
        "round_cycle_s": [round(c, 3) for c in cycles],
        "setup": {"listen_s": round(listen_s, 3),
                  "round1_opened_s": round(opened[1] - started_wall, 3),
                  "first_update_s": round(first_update[0][0] - started_wall, 3)
                  if first_update and first_update[0][0] else None},
        "total_s": round(total_s, 3),
        "coordinator_peak_mb": watch.main_peak_mb(),
        "coordinator_sampled_peak_mb": round(watch.main_rss / MB, 1),
        "agents_peak_mb": round(watch.others_sum / MB, 1),
        "agent_peak_mb_max": round(max(watch.others_hwm.values(), default=0) / MB, 1),
        # exit code -> agents (None: still running 60 s after the coordinator ended)
        "agent_exit_codes": {str(c): agent_codes.count(c) for c in sorted(
            set(agent_codes), key=str)},
    }


# --------------------------------------------------------------------------- uploads


class UploadRun:
    """Shared by the client threads of one upload micro-run."""

    def __init__(self, url: str, clients: int, sequential_rounds: int) -> None:
        self.url = url
        self.barrier = threading.Barrier(clients)
        self.lock = threading.Lock()
        self.sequential_rounds = sequential_rounds
        self.records: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._records_lock = threading.Lock()

    def worker(self, token: str) -> None:
        try:
            self._work(token)
        except Exception as exc:  # noqa: BLE001 - reported in the result line
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self.barrier.abort()

    def _work(self, token: str) -> None:
        from fedfm.core.update import ClientUpdate
        from fedfm.deploy import wire

        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120.0) as http:
            while not self.stop.is_set():
                response = http.get(f"{API}/tasks/next", params={"wait": 5.0})
                response.raise_for_status()
                found = response.json()
                task = found["task"]
                if task is None:
                    if found["run_state"] in ("finished", "failed", "stopped"):
                        return
                    continue
                download = http.get(f"{API}/tasks/{task['task_id']}/state")
                download.raise_for_status()
                broadcast = wire.broadcast_from_bytes(download.content)
                generator = torch.Generator().manual_seed(1000 * task["round"] + task["client_id"])
                payload = OrderedDict(
                    (k, torch.randn(v.shape, generator=generator, dtype=v.dtype) * 1e-3)
                    for k, v in broadcast.global_state.items())
                update = ClientUpdate(client_id=task["client_id"], payload=payload,
                                      num_examples=80, metrics={"train_loss": 1.0},
                                      metadata={"wall_time": 0.0})
                body = wire.update_to_bytes(update, round_index=task["round"],
                                            task_id=task["task_id"])
                put_headers = {"X-Content-SHA256": hashlib.sha256(body).hexdigest(),
                               "Content-Type": "application/octet-stream"}
                sequential = task["round"] <= self.sequential_rounds
                self.barrier.wait(timeout=120)
                with self.lock if sequential else contextlib.nullcontext():
                    begin = time.perf_counter()
                    answer = http.put(f"{API}/tasks/{task['task_id']}/update", content=body,
                                      headers=put_headers)
                    end = time.perf_counter()
                if answer.status_code != 200:
                    raise RuntimeError(f"upload refused: HTTP {answer.status_code} "
                                       f"{answer.text[:300]}")
                with self._records_lock:
                    self.records.append({"round": task["round"], "begin": begin, "end": end,
                                         "bytes": len(body),
                                         "mode": "sequential" if sequential else "concurrent"})


def summarize_uploads(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_round: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_round.setdefault(record["round"], []).append(record)
    window = sum(max(r["end"] for r in rs) - min(r["begin"] for r in rs)
                 for rs in by_round.values())
    total_bytes = sum(r["bytes"] for r in records)
    latencies = sorted((r["end"] - r["begin"]) * 1000 for r in records)
    return {
        "mb_per_s": round(total_bytes / MB / window, 2),
        "uploads_per_s": round(len(records) / window, 2),
        "uploads": len(records),
        "rounds": len(by_round),
        "latency_ms_p50": round(statistics.median(latencies), 1),
        "latency_ms_p90": round(latencies[int(0.9 * (len(latencies) - 1))], 1),
        "latency_ms_max": round(latencies[-1], 1),
    }


def run_uploads(rank: int, clients: int, rounds: int, work: Path, timeout: float
                ) -> dict[str, Any]:
    directory = work / f"upload_r{rank}"
    directory.mkdir(parents=True, exist_ok=True)
    state_dir = directory / "state"
    raw = bench_config(num_clients=clients, per_round=clients, rounds=2 * rounds, rank=rank)
    raw["deploy"]["round_timeout_s"] = 3600.0
    config = write_yaml(directory / "server.yaml", raw)
    tokens = add_clients(state_dir, clients)
    server = None
    watch = None
    run = None
    threads: list[threading.Thread] = []
    try:
        server, url, _ = start_coordinator(config, state_dir, directory / "server.log", 120)
        watch = RssWatch(server.pid)
        watch.start()
        run = UploadRun(url, clients, sequential_rounds=rounds)
        threads = [threading.Thread(target=run.worker, args=(token,), daemon=True)
                   for token in tokens]
        for thread in threads:
            thread.start()
        deadline = time.perf_counter() + timeout
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.perf_counter()))
        if any(thread.is_alive() for thread in threads):
            run.errors.append(f"client threads still running after {timeout:.0f} s")
        code = server.wait(timeout=max(1.0, deadline - time.perf_counter()))
    finally:
        if run is not None:
            run.stop.set()
            with contextlib.suppress(threading.BrokenBarrierError):
                run.barrier.abort()
        if watch is not None:
            watch.stop()
        if server is not None:
            kill_group(server)
    assert run is not None and watch is not None
    if run.errors or code != 0:
        raise RuntimeError(f"upload run failed (coordinator exit {code}): {run.errors[:3]}\n"
                           f"{log_tail(directory / 'server.log')}")
    concurrent = [r for r in run.records if r["mode"] == "concurrent"]
    sequential = [r for r in run.records if r["mode"] == "sequential"]
    return {"adapter_r": rank, "clients": clients,
            "update_bytes": run.records[0]["bytes"],
            **summarize_uploads(concurrent),
            "sequential": summarize_uploads(sequential),
            "coordinator_peak_mb": watch.main_peak_mb()}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=20, help="clients = agent processes")
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-clients", type=int, default=10)
    parser.add_argument("--upload-rounds", type=int, default=3,
                        help="rounds of each upload mode (sequential, then concurrent)")
    parser.add_argument("--upload-ranks", default="8,64",
                        help="LoRA ranks of the upload micro-runs ('' to skip them)")
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="bound on each of the local run, the remote run, an upload run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child-local", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_local is not None:
        child_local(args.child_local)
        return
    per_round = min(args.clients_per_round, args.agents)
    work = Path(tempfile.mkdtemp(prefix="fedfm-bench-deploy-"))
    common = {"workload": "W1-dolly", "agents": args.agents, "clients_per_round": per_round,
              "rounds": args.rounds}
    try:
        raw = bench_config(num_clients=args.agents, per_round=per_round, rounds=args.rounds,
                           output_dir=work / "local")
        note(f"local runtime, {args.rounds} rounds (work dir {work})")
        local = run_local(raw, work, args.timeout_s)
        emit({"variant": "local", **common, "runtime": "local",
              **{k: v for k, v in local.items() if k != "run_dir"}})

        note(f"coordinator + {args.agents} agent processes")
        remote = run_remote(raw, work, args.agents, args.timeout_s)
        from safetensors.torch import load_file

        from fedfm.core import state as state_ops

        diff = state_ops.max_abs_diff(
            load_file(str(local["run_dir"] / "final" / "global.safetensors")),
            load_file(str(remote["state_dir"] / "run" / "final" / "global.safetensors")))
        emit({"variant": "remote", **common, "agent_threads": 1,
              "x_local": round(remote["wall_per_round_s"] / local["wall_per_round_s"], 3),
              "x_local_mean": round(remote["wall_per_round_mean_s"]
                                    / local["wall_per_round_mean_s"], 3),
              **{k: v for k, v in remote.items() if k != "state_dir"},
              "max_abs_diff_vs_local": diff, "matches_local": diff <= 1e-5})

        for rank in [int(r) for r in args.upload_ranks.split(",") if r.strip()]:
            note(f"uploads: adapter r={rank}, {args.upload_clients} clients")
            result = run_uploads(rank, args.upload_clients, args.upload_rounds, work,
                                 args.timeout_s)
            emit({"variant": "upload", "workload": "W1-dolly", **result})
    finally:
        if args.keep:
            note(f"kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
