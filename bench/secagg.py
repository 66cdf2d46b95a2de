"""Secure aggregation cost: SecAgg+ against plain summation, per client, for n = 10, 50, 100.

Each client holds a vector of ``--length`` fp32 values (default 147,456: the LoRA r=8 q/v adapter
of MiniLM-L6). Plain aggregation sends the fp32 vector; SecAgg+ sends 64-bit masked words plus
keys and encrypted shares, and the server removes masks. Every client's neighbourhood has
``degree = min(n - 1, 2 * ceil(log2 n) + 2)`` clients (SecAgg+'s logarithmic graph) and threshold
60% of it; ``--drop`` of the clients vanish after key sharing (recovered from shares).
Prints one JSON line per n: bytes up / down per client, client and server seconds, and the same
for plain summation, measured in the same run.

    python bench/secagg.py [--length 147456] [--drop 0.1] [--sizes 10,50,100]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from fedfm.trust.secagg.protocol import FixedPoint
from fedfm.trust.secagg.simulate import secure_sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=147_456)
    parser.add_argument("--drop", type=float, default=0.1)
    parser.add_argument("--sizes", default="10,50,100")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    encoding = FixedPoint(bound=100.0)
    for n in (int(s) for s in args.sizes.split(",")):
        values = {u: rng.normal(scale=0.01, size=args.length).astype(np.float32)
                  for u in range(n)}
        start = time.perf_counter()
        np.sum(np.stack(list(values.values())), axis=0)  # the plain aggregation being timed
        plain_seconds = time.perf_counter() - start
        encoded = {u: encoding.encode(v.astype(np.float64))[0] for u, v in values.items()}
        degree = min(n - 1, 2 * math.ceil(math.log2(n)) + 2)
        threshold = math.ceil(0.6 * (degree + 1))
        dropped = set(rng.choice(n, size=int(args.drop * n), replace=False).tolist())
        result = secure_sum(encoded, threshold=threshold, degree=degree, seed=n,
                            drop_after_shares=dropped)
        survivors = [u for u in values if u not in dropped]
        exact = np.array_equal(result.total, sum(encoded[u] for u in survivors))
        error = float(np.abs(encoding.decode(result.total)
                             - np.sum([values[u] for u in survivors], axis=0)).max())
        print(json.dumps({
            "bench": "secagg", "clients": n, "vector_length": args.length, "degree": degree,
            "threshold": threshold, "dropped_after_sharing": len(dropped),
            "exact_ring_sum": exact, "max_abs_error_vs_fp32_sum": error,
            "secagg_bytes_up_per_client": round(result.cost.bytes_up_per_client),
            "secagg_bytes_down_per_client": round(result.cost.bytes_down_per_client),
            "plain_bytes_up_per_client": 4 * args.length,
            "secagg_client_seconds": round(result.cost.client_seconds, 4),
            "secagg_server_seconds": round(result.cost.server_seconds, 4),
            "plain_server_seconds": round(plain_seconds, 5),
            "upload_ratio": round(result.cost.bytes_up_per_client / (4 * args.length), 3)}))


if __name__ == "__main__":
    main()
