"""Overhead of fedfm's local runtime over a plain PyTorch training loop (the compute floor).

Workload W1: a Llama-architecture model from config (hidden 256, 4 layers, 4 heads,
intermediate 688, vocab 8192), seed 0, LoRA r=8 alpha=16 on q_proj and v_proj; 20 clients with
160 token sequences of length 128 each; 10 clients per round, 10 local steps each, batch 8,
AdamW lr 1e-3; 3 rounds. Token ids are seeded random draws (the arithmetic is the same as for
text of that length).

Both sides run in this process on the same model init: ``floor`` is a plain loop doing the same
300 optimizer steps on one model; ``fedfm`` is the full round loop (sampling, State swaps, deltas,
aggregation, byte counting, metrics file, checkpoints) with evaluation off. Each side runs
``--repeats`` times alternately after a short warm-up; the minimum of each is compared.
Prints one JSON line.

    python bench/overhead.py [--rounds 3] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from fedfm.algorithms.fedavg import build_fedavg
from fedfm.api import seed_everything
from fedfm.config import RunConfig, config_from_dict
from fedfm.core.checkpoint import CheckpointManager
from fedfm.core.client_store import MemoryClientStore
from fedfm.core.loop import LoopSettings, LoopSnapshot, RoundLoop
from fedfm.data import ClientData, FederatedData, collate
from fedfm.models import apply_adapter, get_state, load_model, set_state
from fedfm.runtime.local import LocalRuntime
from fedfm.runtime.workload import Workload
from fedfm.tracking import MetricsFileSink, RunDirectory

NUM_CLIENTS, SEQS_PER_CLIENT, SEQ_LEN, VOCAB = 20, 160, 128, 8192


def w1_config(rounds: int) -> RunConfig:
    return config_from_dict({
        "name": "bench-w1",
        "seed": 0,
        "model": {"name": "tiny-llama", "max_length": SEQ_LEN},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": "<synthetic>", "format": "instruction"},
        "federation": {"num_clients": NUM_CLIENTS, "clients_per_round": 10, "rounds": rounds},
        "algorithm": {"name": "fedavg", "local": {"steps": 10, "batch_size": 8, "lr": 1e-3}},
        "runtime": {"precision": "fp32", "device": "cpu"},
        "eval": {"enabled": False},
        "tracking": {"console": False},
    })


def w1_data() -> FederatedData:
    generator = torch.Generator().manual_seed(0)
    clients = []
    for client_id in range(NUM_CLIENTS):
        ids = torch.randint(4, VOCAB, (SEQS_PER_CLIENT, SEQ_LEN), generator=generator).tolist()
        train = [{"input_ids": seq, "labels": seq} for seq in ids]
        clients.append(ClientData(client_id=client_id, train=train, validation=[]))
    return FederatedData(clients=clients, global_validation=[], label_names=None,
                         num_labels=None, task="causal_lm", stats=None)


def build_workload(config: RunConfig) -> Workload:
    bundle = apply_adapter(load_model(config.model, seed=0), config.adapter, seed=0)
    algorithm = build_fedavg(config.algorithm, NUM_CLIENTS)
    return Workload(bundle=bundle, data=w1_data(), client=algorithm.client, config=config,
                    device=torch.device("cpu"), autocast_dtype=None)


def run_floor(workload: Workload, initial: dict, total_steps: int) -> float:
    """Plain loop: pooled data, one model, one AdamW, the same number of optimizer steps."""
    config = workload.config.algorithm.local
    set_state(workload.model, initial)
    model = workload.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    pooled = [ex for client in workload.data.clients for ex in client.train]
    batches = torch.randint(0, len(pooled), (total_steps, config.batch_size),
                            generator=torch.Generator().manual_seed(1))
    pad = workload.pad_token_id
    model.train()
    start = time.perf_counter()
    for step in range(total_steps):
        batch = collate([pooled[i] for i in batches[step].tolist()], pad_token_id=pad,
                        task="causal_lm")
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run_fedfm(workload: Workload, initial: dict, rounds: int,
              runtime_cls: type = LocalRuntime) -> float:
    config = workload.config
    algorithm = build_fedavg(config.algorithm, NUM_CLIENTS)
    workload.client = algorithm.client
    store = MemoryClientStore()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDirectory.create(tmp, "bench")
        settings = LoopSettings(seed=0, num_clients=NUM_CLIENTS,
                                sample_size=config.federation.sample_size(), rounds=rounds,
                                eval_enabled=False)
        loop = RoundLoop(settings=settings, server=algorithm.server,
                         runtime=runtime_cls(workload, store),
                         observers=[MetricsFileSink(run_dir)],
                         checkpointer=CheckpointManager(run_dir.checkpoints, client_store=store),
                         client_store=store)
        start = time.perf_counter()
        loop.run(LoopSnapshot(0, initial, {}, {}))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(0)
    config = w1_config(args.rounds)
    workload = build_workload(config)
    initial = get_state(workload.model)
    total_steps = args.rounds * config.federation.sample_size() * config.algorithm.local.steps
    run_floor(workload, initial, 5)  # warm-up: allocator, kernels
    floor_times, fedfm_times = [], []
    for _ in range(args.repeats):
        floor_times.append(run_floor(workload, initial, total_steps))
        fedfm_times.append(run_fedfm(workload, initial, args.rounds))
    floor, fedfm_time = min(floor_times), min(fedfm_times)
    print(json.dumps({
        "bench": "overhead", "workload": "W1", "rounds": args.rounds,
        "optimizer_steps": total_steps, "threads": torch.get_num_threads(),
        "floor_s": round(floor, 3), "fedfm_s": round(fedfm_time, 3),
        "ratio": round(fedfm_time / floor, 4), "target_ratio": 1.05,
        "floor_runs_s": [round(t, 3) for t in floor_times],
        "fedfm_runs_s": [round(t, 3) for t in fedfm_times],
        "torch": torch.__version__, "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
