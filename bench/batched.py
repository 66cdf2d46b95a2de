"""Throughput of the batched runtime against K (clients per pass), on CPU or GPU.

W1's model and data (bench/overhead.py): 16 clients, each 5 local steps of batch 8 (sequences of
128 tokens) from the same broadcast. For K in 1, 2, 4, 8, 16 the 16 clients run in passes of K
(``BatchedRuntime.run_pass``); the baseline is the local runtime (clients one by one) measured
in the same process. Prints one JSON line per K: client-steps per second and the speed-up over
the local runtime.

    python bench/batched.py [--device cpu|cuda] [--precision fp32|bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import w1_config, w1_data  # noqa: E402

from fedfm.api import build_algorithm, probe_batch, seed_everything  # noqa: E402
from fedfm.core.client_store import MemoryClientStore  # noqa: E402
from fedfm.core.update import Broadcast  # noqa: E402
from fedfm.models import apply_adapter, load_model  # noqa: E402
from fedfm.runtime.batched import BatchedRuntime  # noqa: E402
from fedfm.runtime.fast import prepare_fast_path  # noqa: E402
from fedfm.runtime.local import LocalRuntime  # noqa: E402
from fedfm.runtime.workload import Workload  # noqa: E402

CLIENTS, STEPS = 16, 5


def build(device: torch.device, precision: str) -> Workload:
    config = w1_config(1)
    config = config.model_copy(update={
        "algorithm": config.algorithm.model_copy(update={"local": config.algorithm.local
                                                         .model_copy(update={"steps": STEPS})}),
        "runtime": config.runtime.model_copy(update={
            "precision": precision, "device": device.type, "kind": "batched",
            "clients_per_pass": CLIENTS})})
    bundle = apply_adapter(load_model(config.model, seed=0), config.adapter, seed=0)
    bundle.model.to(device)
    algorithm = build_algorithm(config)
    workload = Workload(bundle=bundle, data=w1_data(), client=algorithm.client, config=config,
                        device=device, autocast_dtype=None)
    probe = probe_batch(config, workload.data, bundle, device)
    plan, loss_fn, autocast_dtype = prepare_fast_path(bundle, config.runtime, device, probe)
    workload.loss_fn, workload.autocast_dtype, workload.speed = loss_fn, autocast_dtype, plan
    return workload


def timed(fn: object, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(0)
    device = torch.device(args.device)
    workload = build(device, args.precision)
    broadcast = Broadcast(global_state=workload.get_state(), extras={}, round=1)
    ids = list(range(CLIENTS))
    local = LocalRuntime(workload, MemoryClientStore())
    batched = BatchedRuntime(workload, MemoryClientStore())
    list(local.run_clients(ids[:2], broadcast, 1))  # warm-up
    local_s = timed(lambda: list(local.run_clients(ids, broadcast, 1)), device)
    client_steps = CLIENTS * STEPS
    base = {"bench": "batched", "device": str(device), "precision": args.precision,
            "threads": torch.get_num_threads(), "clients": CLIENTS, "steps_per_client": STEPS}
    print(json.dumps({**base, "variant": "local", "wall_s": round(local_s, 3),
                      "client_steps_per_s": round(client_steps / local_s, 2)}))
    for k in (1, 2, 4, 8, 16):
        def passes(k: int = k) -> None:
            for start in range(0, CLIENTS, k):
                batched.run_pass(ids[start:start + k], broadcast, 1)
        batched.run_pass(ids[:k], broadcast, 1)  # warm-up at this width
        seconds = timed(passes, device)
        print(json.dumps({**base, "variant": f"batched_k{k}", "clients_per_pass": k,
                          "wall_s": round(seconds, 3),
                          "client_steps_per_s": round(client_steps / seconds, 2),
                          "speedup_vs_local": round(local_s / seconds, 3)}))


if __name__ == "__main__":
    main()
