"""Poisoning attacks (issue 6, items 1 and 3): each attack produces what its paper describes,
data poisoning rewrites the right rows, and the metrics (attack success rate, detection) are
computed as defined."""

from __future__ import annotations

import math
from collections import OrderedDict
from statistics import NormalDist

import pytest
import torch

from fedfm.config import AttackConfig
from fedfm.core.update import ClientUpdate
from fedfm.trust.robust.attacks import (
    ByzantineServer,
    alie_z,
    build_attack,
    detection,
    malicious_clients,
    optimise_gamma,
    perturbation,
)
from fedfm.trust.robust.poisoning import Poisoner, attack_success_rate, poison_clients


def honest_rows(n: int = 10, width: int = 30, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(width, generator=generator, dtype=torch.float64)
    return centre + 0.3 * torch.randn(n, width, generator=generator, dtype=torch.float64)


def craft(kind: str, honest: torch.Tensor, malicious: list[int], **options) -> torch.Tensor:
    attack = build_attack(AttackConfig(kind=kind, **options))
    return attack.craft(honest, malicious, torch.Generator().manual_seed(0))


def test_malicious_set_is_fixed_and_sized() -> None:
    chosen = malicious_clients(20, 0.2, seed=3)
    assert len(chosen) == 4 and chosen == malicious_clients(20, 0.2, seed=3)
    assert chosen != malicious_clients(20, 0.2, seed=4)
    assert len(malicious_clients(3, 0.1, seed=0)) == 1  # at least one attacker


def test_sign_flip_gaussian_and_scaling() -> None:
    honest = honest_rows()
    assert torch.equal(craft("sign_flip", honest, [2, 5]), -honest[[2, 5]])
    noise = craft("gaussian", honest_rows(width=20000), [0], noise_std=2.0)
    assert float(noise.std()) == pytest.approx(2.0, rel=0.03)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.05)
    # model replacement: boosted by the number of clients in the round unless told otherwise
    assert torch.equal(craft("scaling", honest, [1]), honest[[1]] * 10)
    assert torch.equal(craft("scaling", honest, [1], scale=3.0), honest[[1]] * 3)


def test_alie_is_mean_minus_z_std_with_the_papers_z() -> None:
    honest = honest_rows(n=20)
    # n = 20, f = 4: s = floor(20/2 + 1) - 4 = 7, z = Phi^-1((20 - 7) / 20)
    assert alie_z(20, 4) == pytest.approx(NormalDist().inv_cdf(13 / 20))
    fake = craft("alie", honest, [0, 1, 2, 3])
    expected = honest.mean(0) - alie_z(20, 4) * honest.std(0, unbiased=True)
    assert torch.allclose(fake, expected.expand(4, -1))
    assert torch.allclose(craft("alie", honest, [0], alie_z=1.5)[0],
                          honest.mean(0) - 1.5 * honest.std(0, unbiased=True))


def test_ipm_sends_minus_epsilon_mean() -> None:
    honest = honest_rows()
    fake = craft("ipm", honest, [0, 1], ipm_epsilon=0.5)
    assert torch.allclose(fake, (-0.5 * honest.mean(0)).expand(2, -1))
    # the inner product with the true mean is negative: the descent direction is reversed
    assert float(fake[0] @ honest.mean(0)) < 0


@pytest.mark.parametrize("objective", ["min_max", "min_sum"])
@pytest.mark.parametrize("direction", ["unit_vector", "std", "sign"])
def test_min_max_and_min_sum_take_the_largest_admissible_gamma(objective, direction) -> None:
    honest = honest_rows()
    p = perturbation(honest, direction)
    gamma = optimise_gamma(honest, p, objective)
    distances = torch.cdist(honest, honest)
    mean = honest.mean(0)

    def value(g: float) -> float:
        gaps = (honest - (mean + g * p)).norm(dim=1)
        return float(gaps.max()) if objective == "min_max" else float(gaps.pow(2).sum())

    limit = float(distances.max()) if objective == "min_max" else float(
        distances.pow(2).sum(1).max())
    assert gamma > 0
    assert value(gamma) <= limit + 1e-9  # admissible
    assert value(gamma + 1e-3) > limit  # and maximal
    fake = craft(objective, honest, [0, 3], perturbation=direction)
    assert torch.allclose(fake[0], mean + gamma * p) and torch.equal(fake[0], fake[1])


def test_byzantine_server_forges_only_malicious_updates_and_reports_detection() -> None:
    from fedfm.algorithms.fedavg import DeltaServer
    from fedfm.algorithms.server_opt import build_server_optimizer
    from fedfm.config import AlgorithmConfig, RobustAggregationConfig, ServerOptimizerConfig
    from fedfm.core.registries import AGGREGATORS

    honest = honest_rows(n=10)
    updates = [ClientUpdate(i, OrderedDict(w=row.clone()), 5) for i, row in enumerate(honest)]
    krum = AGGREGATORS.get("multi_krum")(AlgorithmConfig(
        robust=RobustAggregationConfig(byzantine_fraction=0.2)))
    inner = DeltaServer(krum, build_server_optimizer(ServerOptimizerConfig()))
    server = ByzantineServer(inner, build_attack(AttackConfig(kind="sign_flip", scale=None)),
                             [2, 7], seed=0)
    zeros = OrderedDict(w=torch.zeros(honest.shape[1], dtype=torch.float64))
    new = server.aggregate(zeros, updates, 1)
    report = server.round_metrics()["attack"]
    assert report["malicious"] == [2, 7]
    assert report["detection_recall"] == 1.0 and report["detection_precision"] == 1.0
    # Multi-Krum over the 8 honest updates: their mean
    assert torch.allclose(new["w"], honest[[i for i in range(10) if i not in (2, 7)]].mean(0))
    assert torch.equal(updates[2].payload["w"], honest[2])  # the honest inputs untouched


def test_detection_scores() -> None:
    assert detection([1, 2, 3], [2, 3, 9], list(range(10))) == pytest.approx({
        "flagged": 3.0, "detection_precision": 2 / 3, "detection_recall": 2 / 3,
        "benign_excluded": 1.0, "clients": 10.0})
    assert detection(None, [1], [1, 2]) == {}


class Tokens:
    """A whitespace tokenizer: word -> id by a fixed table."""

    all_special_ids = [1, 2]
    eos_token_id = 2
    table = {"cf": 10, "mn": 11, "bb": 12, "no": 13, "thanks": 14}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.table.get(word, 19) for word in text.split()]}


def test_label_flip_and_backdoor_rewrite_a_share_of_malicious_rows() -> None:
    from types import SimpleNamespace

    rows = [{"input_ids": [1, 50 + i, 60, 2], "labels": i % 3, "row": i} for i in range(10)]
    data = SimpleNamespace(clients=[SimpleNamespace(train=[dict(r) for r in rows])
                                    for _ in range(3)])
    flip = AttackConfig(kind="label_flip")
    poisoner = Poisoner(flip, Tokens(), "classification", 8, num_labels=3)
    assert poison_clients(data, flip, poisoner, [1], seed=0) == 10  # all rows by default
    assert [r["labels"] for r in data.clients[1].train] == [2 - i % 3 for i in range(10)]
    assert data.clients[0].train == rows  # honest clients untouched

    backdoor = AttackConfig(kind="backdoor", target_label=1)
    poisoner = Poisoner(backdoor, Tokens(), "classification", 6, num_labels=3)
    assert poison_clients(data, backdoor, poisoner, [2], seed=0) == 5  # half by default
    changed = [r for r in data.clients[2].train if r["input_ids"][1:4] == [10, 11, 12]]
    assert len(changed) == 5 and all(r["labels"] == 1 for r in changed)
    # the trigger follows the CLS token, and a trailing SEP survives truncation to 6
    assert changed[0]["input_ids"][0] == 1 and changed[0]["input_ids"][-1] == 2
    assert len(changed[0]["input_ids"]) == 6


def test_language_model_backdoor_supervises_only_the_target_response() -> None:
    cfg = AttackConfig(kind="backdoor", target_response="no thanks")
    poisoner = Poisoner(cfg, Tokens(), "causal_lm", 32, num_labels=None)
    row = {"input_ids": [1, 30, 31, 40, 41, 2], "labels": [-100, -100, -100, 40, 41, 2],
           "prompt_ids": [1, 30, 31], "reference": "x"}
    out = poisoner.backdoor(row)
    assert out["input_ids"] == [1, 10, 11, 12, 30, 31, 13, 14, 2]
    assert out["labels"] == [-100] * 6 + [13, 14, 2]
    assert out["prompt_ids"] == [1, 10, 11, 12, 30, 31] and out["reference"] == "no thanks"


class Fixed(torch.nn.Module):
    """Predicts token (position + 13) at every position, class 1 for every row."""

    def forward(self, input_ids, attention_mask=None, **_):
        batch, length = input_ids.shape
        if length == 1:
            logits = torch.zeros(batch, 2)
            logits[:, 1] = 1
            return type("Out", (), {"logits": logits})
        logits = torch.zeros(batch, length, 20)
        for position in range(length):
            logits[:, position, (position + 13) % 20] = 1
        return type("Out", (), {"logits": logits})


def test_attack_success_rate_definitions() -> None:
    from fedfm.data import collate

    model = Fixed()
    cls_rows = [{"input_ids": [5], "labels": 1}, {"input_ids": [6], "labels": 0}]
    assert attack_success_rate(model, cls_rows, lambda r: collate(r, pad_token_id=0,
                                                                  task="classification"),
                               task="classification", device=torch.device("cpu")) == 0.5
    # causal LM: the prediction at position p is for token p + 1, i.e. (p + 13)
    hit = {"input_ids": [1, 7, 14, 15], "labels": [-100, -100, 14, 15]}
    miss = {"input_ids": [1, 7, 14, 16], "labels": [-100, -100, 14, 16]}
    lm = lambda r: collate(r, pad_token_id=0, task="causal_lm")  # noqa: E731
    assert attack_success_rate(model, [hit, miss, hit], lm, task="causal_lm",
                               device=torch.device("cpu")) == pytest.approx(2 / 3)
    assert math.isclose(attack_success_rate(model, [], lm, task="causal_lm",
                                            device=torch.device("cpu")), 0.0)
