"""The provenance model card written next to every export.

A Hugging Face model card (``README.md`` with YAML front matter; see
https://huggingface.co/docs/hub/model-cards) whose metadata carries, under ``fedfm:``, how the
model came to be: base model, adaptation method and its hyper-parameters, the federated algorithm
and its hyper-parameters, rounds, clients and sampling, the data partition with per-client sizes,
the privacy and robustness settings, communication totals, the metrics at the exported round, the
config hash and the fedfm versions. Every value is read from the run directory (``config.yaml``,
``summary.json``, ``metrics.jsonl``) or from the exported model itself; nothing is typed in.
The same record is written as ``fedfm_provenance.json`` for tools.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import yaml

import fedfm
from fedfm.export.artifacts import WrittenModel
from fedfm.tracking.run_record import RunRecord

PROVENANCE_FILE = "fedfm_provenance.json"
_FAMILIES = {
    "lora": "reparameterization", "ia3": "additive", "prompt_tuning": "additive",
    "prefix_tuning": "additive", "bitfit": "selective", "layernorm": "selective",
    "last_layers": "selective", "head": "selective", "full": "full fine-tuning",
}
_ADAPTER_FIELDS = {
    "lora": ("r", "alpha", "dropout", "target_modules", "train_head"),
    "ia3": ("target_modules", "train_head"),
    "prompt_tuning": ("num_virtual_tokens", "train_head"),
    "prefix_tuning": ("num_virtual_tokens", "train_head"),
    "last_layers": ("num_layers", "train_head"),
    "bitfit": ("train_head",), "layernorm": ("train_head",), "head": (), "full": (),
}
_PARTITION_FIELDS = {
    "iid": ("min_size",), "dirichlet": ("alpha", "by", "min_size"),
    "natural": ("by", "min_size"), "shards": ("shards_per_client", "by", "min_size"),
    "label_quantity": ("classes_per_client", "by", "min_size"),
    "quantity": ("alpha", "min_size"),
}
_PIPELINE_TAGS = {"causal_lm": "text-generation", "classification": "text-classification",
                  "seq2seq": "text2text-generation"}


def build_provenance(record: RunRecord, written: WrittenModel, fmt: str,
                     round_index: int) -> dict[str, Any]:
    config = record.config
    summary = record.summary
    return {
        "run": {"name": config.name, "directory": str(record.path.resolve()),
                "seed": config.seed, "config_hash": config.config_hash(),
                "config_hash_recorded": summary.get("config_hash"),
                "fedfm_version": summary.get("fedfm_version"),
                "exported_with_fedfm": fedfm.__version__,
                "exported_at": datetime.now(UTC).isoformat(timespec="seconds")},
        "export": {"format": fmt, "round": round_index,
                   "rounds_completed": record.completed_rounds,
                   "rounds_configured": config.federation.rounds},
        "base_model": {"name": config.model.name, "reference": written.base_reference,
                       "revision": config.model.revision, "task": written.task,
                       "dtype": config.model.dtype, "max_length": config.model.max_length,
                       "included_as": "base_model/" if written.base_written else None},
        "adaptation": _adaptation(record, written),
        "algorithm": config.algorithm.model_dump(mode="json"),
        "federation": {"num_clients": config.federation.num_clients,
                       "clients_per_round": config.federation.sample_size(),
                       "rounds": round_index,
                       "client_dropout_prob": config.federation.dropout_prob},
        "data": _data(record),
        "privacy": _privacy(record, round_index),
        "robustness": _robustness(record),
        "communication": _communication(record, round_index),
        "metrics": record.metrics_at(round_index),
    }


def _adaptation(record: RunRecord, written: WrittenModel) -> dict[str, Any]:
    adapter = record.config.adapter
    chosen = {name: getattr(adapter, name) for name in _ADAPTER_FIELDS.get(adapter.kind, ())}
    return {"method": adapter.kind, "family": _FAMILIES.get(adapter.kind, "other"),
            "hyperparameters": chosen, "peft_resolved": written.peft_settings,
            "trainable_params": written.trainable_params,
            "total_params": written.total_params}


def _data(record: RunRecord) -> dict[str, Any]:
    data = record.config.data
    partition = data.partition
    recorded = record.summary.get("data") or {}
    clients = recorded.get("clients")
    found: dict[str, Any] = {
        "path": data.path, "format": data.format,
        "partition": {"kind": partition.kind,
                      **{k: getattr(partition, k) for k in _PARTITION_FIELDS[partition.kind]}},
        "partition_resolved": recorded.get("partition"),
        "client_validation_fraction": data.client_validation_fraction,
        "global_validation": recorded.get("global_validation_source"),
        "global_validation_size": recorded.get("global_validation_size"),
    }
    if clients:
        found["client_train_sizes"] = [c["train_size"] for c in clients]
        found["client_validation_sizes"] = [c["validation_size"] for c in clients]
        if recorded.get("histogram_key"):
            found["client_histogram_key"] = recorded["histogram_key"]
            found["client_histograms"] = [c.get("histogram", {}) for c in clients]
        found["dropped_examples"] = recorded.get("dropped", {})
        found["skipped_rows"] = recorded.get("skipped", {})
    elif record.summary.get("client_train_sizes"):
        found["client_train_sizes"] = record.summary["client_train_sizes"]
    else:
        found["client_train_sizes"] = "not recorded (the run has no summary.json yet)"
    return found


def _privacy(record: RunRecord, round_index: int) -> dict[str, Any]:
    privacy = record.config.privacy
    if privacy.client_dp is None and privacy.dp_sgd is None:
        return {"differential_privacy": False, "secure_aggregation": False,
                "note": "no privacy mechanism was configured for this run"}
    upto = [r for r in record.metrics if int(r.get("round", 0)) <= round_index]
    found: dict[str, Any] = {"secure_aggregation": False}
    kinds = []
    if privacy.client_dp is not None:
        kinds.append("client-level (DP-FedAvg)")
        budget = [r["privacy"] for r in upto if "privacy" in r]
        found["client_dp"] = privacy.client_dp.model_dump(mode="json")
        found["budget_at_round"] = budget[-1] if budget else None
    if privacy.dp_sgd is not None:
        from fedfm.trust.privacy.dp_sgd import dp_sgd_budgets

        kinds.append("sample-level (DP-SGD on clients)")
        per_client = dp_sgd_budgets(upto)
        found["dp_sgd"] = privacy.dp_sgd.model_dump(mode="json")
        found["dp_sgd_client_epsilon"] = per_client
        found["dp_sgd_max_client_epsilon"] = max(per_client.values(), default=0.0)
    found["differential_privacy"] = " and ".join(kinds)
    return found


def _robustness(record: RunRecord) -> dict[str, Any]:
    config = record.config
    attack = config.robustness.attack
    simulated = None if attack is None else attack.model_dump(mode="json", exclude_none=True)
    if config.privacy.client_dp is not None:
        return {"aggregator": "DP-FedAvg: sum of clipped updates plus Gaussian noise, divided "
                              "by the expected number of clients", "byzantine_robust": False,
                "attacks_simulated": simulated}
    name = config.algorithm.aggregator
    if name in ("mean", "secure_mean"):
        return {"aggregator": f"mean weighted by {config.algorithm.weighting}",
                "byzantine_robust": False, "attacks_simulated": simulated}
    robust = config.algorithm.robust
    return {"aggregator": name, "byzantine_robust": True,
            "byzantine_fraction": robust.byzantine_fraction, "lora_space": robust.lora_space,
            "attacks_simulated": simulated}


def _communication(record: RunRecord, round_index: int) -> dict[str, Any]:
    upto = [r for r in record.metrics if 0 < int(r.get("round", 0)) <= round_index]
    return {"bytes_up": int(sum(r.get("bytes_up", 0) for r in upto)),
            "bytes_down": int(sum(r.get("bytes_down", 0) for r in upto)),
            "rounds_logged": len(upto)}


# --------------------------------------------------------------------------- rendering


def render_card(provenance: dict[str, Any], fmt: str) -> str:
    """README.md text: YAML front matter (HF metadata + ``fedfm:``) and a readable body."""
    base = provenance["base_model"]
    adaptation = provenance["adaptation"]
    algorithm = provenance["algorithm"]
    meta: dict[str, Any] = {
        "library_name": "peft" if fmt == "peft" else "transformers",
        "pipeline_tag": _PIPELINE_TAGS.get(base["task"], "text-generation"),
        "tags": ["fedfm", "federated-learning", adaptation["method"], algorithm["name"]],
    }
    if "/" in base["reference"] and not base["reference"].startswith(("/", ".")):
        meta["base_model"] = base["reference"]  # a hub id
    meta["fedfm"] = provenance
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n{_body(provenance, fmt)}"


def _body(p: dict[str, Any], fmt: str) -> str:
    fed, data, adaptation = p["federation"], p["data"], p["adaptation"]
    local = p["algorithm"]["local"]
    sizes = data["client_train_sizes"]
    size_text = (f"{len(sizes)} clients, {min(sizes)}-{max(sizes)} training examples each "
                 f"(total {sum(sizes)})" if isinstance(sizes, list) and sizes else str(sizes))
    partition = data.get("partition_resolved") or data["partition"]["kind"]
    rows = [
        ("Base model", f"`{p['base_model']['name']}` ({p['base_model']['task']})"),
        ("Adaptation", f"{adaptation['method']} ({adaptation['family']}), "
                       f"{adaptation['trainable_params']:,} of {adaptation['total_params']:,} "
                       f"parameters trained"),
        ("Algorithm", f"{p['algorithm']['name']}, server optimizer "
                      f"{p['algorithm']['server_optimizer']['name']} "
                      f"(lr {p['algorithm']['server_optimizer']['lr']})"),
        ("Local training", f"{local['optimizer']} lr {local['lr']}, "
                           f"{_steps(local)}, batch {local['batch_size']}"),
        ("Rounds", f"{fed['rounds']} (of {p['export']['rounds_configured']} configured)"),
        ("Clients", f"{fed['num_clients']} registered, {fed['clients_per_round']} per round"),
        ("Data", f"`{data['path']}` ({data['format']}), partition {partition}"),
        ("Client data", size_text),
        ("Privacy", _privacy_text(p["privacy"])),
        ("Robustness", _robustness_text(p["robustness"])),
        ("Communication", f"{p['communication']['bytes_up']:,} bytes up, "
                          f"{p['communication']['bytes_down']:,} bytes down"),
        ("Config hash", f"`{p['run']['config_hash']}`"),
        ("fedfm", f"trained with {p['run']['fedfm_version']}, exported with "
                  f"{p['run']['exported_with_fedfm']}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    metrics = p["metrics"]
    metric_lines = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if k != "round")
    metric_text = (f"Global evaluation after round {metrics['round']}:\n\n| metric | value |\n"
                   f"|---|---|\n{metric_lines}\n" if metrics else "No evaluation was logged.\n")
    return (f"# {p['run']['name']}: federated {adaptation['method']} fine-tune of "
            f"{p['base_model']['name']}\n\nTrained with [fedfm](https://pypi.org/project/fedfm/) "
            f"by federated learning: the data stayed with its {fed['num_clients']} owners; only "
            f"adapter updates were exchanged.\n\n## Provenance\n\n| | |\n|---|---|\n{table}\n\n"
            f"## Evaluation\n\n{metric_text}\n## How to load\n\n{_usage(p, fmt)}\n\n"
            f"The full record is in this card's metadata (`fedfm:`) and in "
            f"`{PROVENANCE_FILE}`.\n")


def _steps(local: dict[str, Any]) -> str:
    return f"{local['steps']} steps" if local.get("steps") else f"{local['epochs']} epochs"


def _privacy_text(privacy: dict[str, Any]) -> str:
    if privacy.get("differential_privacy") is False:
        return "none (no differential privacy, no secure aggregation)"
    parts = []
    if "client_dp" in privacy:
        budget = privacy.get("budget_at_round") or {}
        dp = privacy["client_dp"]
        spent = (f"epsilon={budget['epsilon']:.3g} at delta={budget['delta']:.3g}"
                 if "epsilon" in budget else "no round accounted")
        parts.append(f"client-level DP-FedAvg ({spent}; {dp.get('noise')} noise, "
                     f"{dp.get('sampling')} client sampling, {dp.get('accountant')} accountant)")
    if "dp_sgd" in privacy:
        parts.append(f"sample-level DP-SGD (largest client epsilon "
                     f"{privacy['dp_sgd_max_client_epsilon']:.3g}, noise multiplier "
                     f"{privacy['dp_sgd']['noise_multiplier']})")
    return "; ".join(parts)


def _robustness_text(robustness: dict[str, Any]) -> str:
    if robustness.get("byzantine_robust") is False:
        text = f"{robustness['aggregator']} (not Byzantine-robust)"
    else:
        text = (f"{robustness['aggregator']} (Byzantine-robust, tolerates a "
                f"{robustness['byzantine_fraction']:g} share; LoRA geometry: "
                f"{robustness['lora_space']})")
    attack = robustness.get("attacks_simulated")
    if attack:
        text += (f"; simulated attack: {attack['kind']} by {attack['fraction']:g} of the "
                 f"clients")
    return text


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _usage(p: dict[str, Any], fmt: str) -> str:
    auto = {"causal_lm": "AutoModelForCausalLM", "classification":
            "AutoModelForSequenceClassification", "seq2seq": "AutoModelForSeq2SeqLM"}
    cls = auto.get(p["base_model"]["task"], "AutoModel")
    if fmt == "peft":
        base = (f'"{p["base_model"]["reference"]}"' if not p["base_model"]["included_as"]
                else 'f"{export_dir}/base_model"')
        return ("```python\nfrom peft import PeftModel\nfrom transformers import "
                f"{cls}\n\nbase = {cls}.from_pretrained({base})\n"
                "model = PeftModel.from_pretrained(base, export_dir)\n```")
    return (f"```python\nfrom transformers import {cls}\n\n"
            f"model = {cls}.from_pretrained(export_dir)\n```")


def write_card(provenance: dict[str, Any], fmt: str, written: WrittenModel) -> None:
    (written.directory / "README.md").write_text(render_card(provenance, fmt), encoding="utf-8")
    (written.directory / PROVENANCE_FILE).write_text(
        json.dumps(provenance, indent=2, sort_keys=False) + "\n", encoding="utf-8")
