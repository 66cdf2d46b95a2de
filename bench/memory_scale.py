"""Memory at scale: 1,000 registered clients, 100 per round, against a 10-client run.

Both runs use W1's model (Llama-architecture, hidden 256, 4 layers, vocab 8192, LoRA r=8 on
q/v; see bench/overhead.py) and the same pool of 16,000 token sequences of length 128, split
evenly over the clients, with SCAFFOLD (a per-client control variate persists between rounds),
the tiered client store (``--store-mb`` in memory, the rest on disk), a checkpoint every round
(which streams the store client by client) and 2 local steps of batch 8 per client. The 10-client
run samples all 10 each round; the 1,000-client run samples 100. Each run is its own process;
its peak RSS (``ru_maxrss``) is compared. Prints one JSON line per run and one with the ratio.

    python bench/memory_scale.py [--rounds 3] [--store-mb 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedfm.api import build_algorithm, seed_everything
from fedfm.config import config_from_dict
from fedfm.core.checkpoint import CheckpointManager
from fedfm.core.client_store import TieredClientStore
from fedfm.core.loop import LoopSettings, LoopSnapshot, RoundLoop
from fedfm.data import ClientData, FederatedData
from fedfm.models import apply_adapter, get_state, load_model
from fedfm.runtime.local import LocalRuntime
from fedfm.runtime.workload import Workload
from fedfm.tracking import MetricsFileSink, RunDirectory

POOL, SEQ_LEN, VOCAB = 16_000, 128, 8192


def pooled_data(num_clients: int) -> FederatedData:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (POOL, SEQ_LEN), generator=generator).tolist()
    shards: list[list[dict]] = [[] for _ in range(num_clients)]
    for index, seq in enumerate(ids):
        shards[index % num_clients].append({"input_ids": seq, "labels": seq})
    clients = [ClientData(client_id=i, train=rows, validation=[]) for i, rows in enumerate(shards)]
    return FederatedData(clients=clients, global_validation=[], label_names=None,
                         num_labels=None, task="causal_lm", stats=None)


def run(num_clients: int, per_round: int, rounds: int, store_mb: float) -> dict:
    seed_everything(0)
    config = config_from_dict({
        "name": "bench-scale", "seed": 0,
        "model": {"name": "tiny-llama", "max_length": SEQ_LEN},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": "<synthetic>", "format": "instruction"},
        "federation": {"num_clients": num_clients, "clients_per_round": per_round,
                       "rounds": rounds},
        "algorithm": {"name": "scaffold", "local": {"steps": 2, "batch_size": 8, "lr": 1e-2,
                                                   "optimizer": "sgd"}},
        "runtime": {"precision": "fp32", "device": "cpu"},
        "eval": {"enabled": False}, "tracking": {"console": False},
    })
    bundle = apply_adapter(load_model(config.model, seed=0), config.adapter, seed=0)
    algorithm = build_algorithm(config)
    workload = Workload(bundle=bundle, data=pooled_data(num_clients), client=algorithm.client,
                        config=config, device=torch.device("cpu"), autocast_dtype=None)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDirectory.create(tmp, "scale")
        store = TieredClientStore(run_dir.path / "client_states", int(store_mb * 2**20))
        loop = RoundLoop(
            settings=LoopSettings(seed=0, num_clients=num_clients, sample_size=per_round,
                                  rounds=rounds, eval_enabled=False),
            server=algorithm.server, runtime=LocalRuntime(workload, store),
            observers=[MetricsFileSink(run_dir)],
            checkpointer=CheckpointManager(run_dir.checkpoints, client_store=store, keep=1),
            client_store=store)
        start = time.perf_counter()
        loop.run(LoopSnapshot(0, get_state(workload.model), {}, {}))
        wall = time.perf_counter() - start
        stored, in_memory = len(store.client_ids()), len(store.in_memory())
    return {"bench": "memory_scale", "clients": num_clients, "per_round": per_round,
            "rounds": rounds, "wall_per_round_s": round(wall / rounds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "client_states": stored, "client_states_in_memory": in_memory,
            "store_budget_mb": store_mb, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store-mb", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        clients, per_round = (int(x) for x in args.child.split(":"))
        print(json.dumps(run(clients, per_round, args.rounds, args.store_mb)))
        return
    results = []
    for clients, per_round in ((10, 10), (1000, 100)):
        command = [sys.executable, __file__, "--child", f"{clients}:{per_round}",
                   "--rounds", str(args.rounds), "--store-mb", str(args.store_mb)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    small, large = results
    print(json.dumps({"bench": "memory_scale", "variant": "ratio",
                      "peak_rss_ratio_1000_vs_10": round(large["peak_rss_mb"]
                                                         / small["peak_rss_mb"], 3),
                      "target": 1.2}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
