"""Export (issue 4, items 1-2): peft and transformers round trips give fedfm's own global model,
and the provenance card records what the run directory says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from fedfm import api
from fedfm.cli import app
from fedfm.export import ExportError, export_run, read_run
from fedfm.export.card import PROVENANCE_FILE
from fedfm.models import apply_adapter, load_model, set_state

FEW = {"federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2},
       "algorithm": {"local": {"steps": 2}}, "eval": {"every": 1, "max_examples": 4}}


def global_model(result: api.RunResult, num_labels: int | None = None) -> torch.nn.Module:
    """fedfm's global model after the run: base + adapter + final State, as evaluated."""
    config = api.load_config(result.run_dir / "config.yaml")
    bundle = load_model(config.model, seed=config.seed, num_labels=num_labels)
    bundle = apply_adapter(bundle, config.adapter, seed=config.seed)
    set_state(bundle.model, result.final_state)
    return bundle.model.eval()


def probe_inputs(task: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 57, 300, 41, 2049, 77, 5, 6], [1, 8, 9, 1000, 11, 0, 0, 0]])
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [5]])).long()
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, task: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**probe_inputs(task)).logits


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt_tuning"])
def test_peft_export_loads_in_peft_with_identical_outputs(lm_config, kind: str) -> None:
    result = api.run(lm_config(adapter={"kind": kind, "r": 4, "alpha": 8,
                                        "num_virtual_tokens": 4}, **FEW))
    out = export_run(result.run_dir, "peft").directory
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    loaded = PeftModel.from_pretrained(base, out).eval()
    ours = global_model(result)
    expected = logits(ours, "causal_lm")
    assert torch.equal(logits(loaded, "causal_lm"), expected)
    # the adapter matters: the bare base gives other outputs
    bare = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    if kind != "prompt_tuning":  # prompt tuning prepends tokens: shapes differ anyway
        assert not torch.allclose(logits(bare, "causal_lm"), expected)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_merged_export_loads_in_transformers_with_the_same_outputs(lm_config, kind: str) -> None:
    result = api.run(lm_config(adapter={"kind": kind, "r": 4, "alpha": 8}, **FEW))
    out = export_run(result.run_dir, "merged").directory
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = logits(global_model(result), "causal_lm")
    got = logits(merged, "causal_lm")
    # merging reassociates (W + BA)x: equal up to float32 rounding, far below any real change
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_classifier_lora_with_head_round_trips(cls_config) -> None:
    result = api.run(cls_config(**FEW))
    ours = global_model(result, num_labels=2)
    expected = logits(ours, "classification")
    peft_dir = export_run(result.run_dir, "peft").directory
    base = AutoModelForSequenceClassification.from_pretrained(peft_dir / "base_model")
    assert base.config.id2label == {0: "negative", 1: "positive"}
    loaded = PeftModel.from_pretrained(base, peft_dir).eval()
    assert torch.equal(logits(loaded, "classification"), expected)
    merged_dir = export_run(result.run_dir, "merged").directory
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert torch.allclose(logits(merged, "classification"), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["layernorm", "full"])
def test_selective_and_full_export_as_model_directories(lm_config, kind: str) -> None:
    result = api.run(lm_config(adapter={"kind": kind}, **FEW))
    out = export_run(result.run_dir, "full").directory
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(model, "causal_lm"), logits(global_model(result), "causal_lm"))
    with pytest.raises(ExportError, match="selective method: use --format full"):
        export_run(result.run_dir, "peft", out=out.parent / "peft")


def test_prompt_tuning_cannot_be_merged(lm_config) -> None:
    result = api.run(lm_config(adapter={"kind": "prompt_tuning", "num_virtual_tokens": 4},
                               **FEW))
    with pytest.raises(ExportError, match="use --format peft"):
        export_run(result.run_dir, "merged")


def test_round_option_exports_that_checkpoint(lm_config, tmp_path: Path) -> None:
    result = api.run(lm_config(**FEW))
    first = export_run(result.run_dir, "peft", round=1, out=tmp_path / "r1")
    assert first.round == 1 and first.provenance["federation"]["rounds"] == 1
    from safetensors.torch import load_file
    checkpoint = load_file(str(result.run_dir / "checkpoints" / "round_0001" /
                               "global.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(first.directory / "base_model")
    loaded = PeftModel.from_pretrained(base, first.directory).eval()
    config = api.load_config(result.run_dir / "config.yaml")
    ours = apply_adapter(load_model(config.model, seed=0), config.adapter, seed=0).model
    set_state(ours, checkpoint)
    assert torch.equal(logits(loaded, "causal_lm"), logits(ours.eval(), "causal_lm"))
    with pytest.raises(ExportError, match=r"kept rounds: 1, 2"):
        export_run(result.run_dir, "peft", round=7)
    with pytest.raises(ExportError, match="not empty"):
        export_run(result.run_dir, "peft", round=1, out=tmp_path / "r1")


def front_matter(readme: Path) -> dict[str, Any]:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_records_the_run_truthfully(cls_config) -> None:
    result = api.run(cls_config(**FEW))
    exported = export_run(result.run_dir, "peft")
    meta = front_matter(exported.directory / "README.md")
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-classification"
    card = meta["fedfm"]
    assert card == json.loads((exported.directory / PROVENANCE_FILE).read_text())
    summary, config = result.summary, api.load_config(result.run_dir / "config.yaml")
    assert card["base_model"]["name"] == "tiny-bert"
    assert card["base_model"]["included_as"] == "base_model/"
    assert card["adaptation"]["method"] == "lora"
    assert card["adaptation"]["hyperparameters"] == {"r": 4, "alpha": 8.0, "dropout": 0.0,
                                                     "target_modules": None, "train_head": True}
    assert card["adaptation"]["trainable_params"] == summary["trainable_params"]
    assert card["adaptation"]["peft_resolved"]["target_modules"] == ["query", "value"]
    assert "classifier" in card["adaptation"]["peft_resolved"]["modules_to_save"]
    assert card["algorithm"]["name"] == "fedavg"
    assert card["algorithm"]["local"]["lr"] == config.algorithm.local.lr
    assert card["federation"] == {"num_clients": 3, "clients_per_round": 2, "rounds": 2,
                                  "client_dropout_prob": 0.0}
    assert card["data"]["partition"] == {"kind": "dirichlet", "alpha": 1.0, "by": None,
                                         "min_size": 10}
    assert card["data"]["client_train_sizes"] == summary["client_train_sizes"]
    assert card["data"]["client_histogram_key"] == "label"
    for sizes, histogram in zip(card["data"]["client_train_sizes"],
                                card["data"]["client_histograms"], strict=True):
        assert sum(histogram.values()) == sizes
    assert card["privacy"]["differential_privacy"] is False
    assert card["robustness"]["byzantine_robust"] is False
    assert card["run"]["config_hash"] == summary["config_hash"]
    assert card["run"]["fedfm_version"] == summary["fedfm_version"]
    assert card["communication"]["bytes_up"] == sum(r["bytes_up"] for r in result.metrics)
    last_eval = result.metrics[-1]["eval"]["global"]
    assert {k: card["metrics"][k] for k in last_eval} == last_eval
    body = (exported.directory / "README.md").read_text()
    assert "3 registered, 2 per round" in body and "partition dirichlet(alpha=1, by=label" in body


def test_cli_export_prints_the_directory(lm_config) -> None:
    result = api.run(lm_config(**FEW))
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(result.run_dir), "--format", "merged"])
    assert done.exit_code == 0, done.output
    out = Path(done.stdout.strip().splitlines()[-1])
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    bad = runner.invoke(app, ["export", str(result.run_dir), "--format", "onnx"])
    assert bad.exit_code == 2 and "expected one of peft, merged, full" in bad.output
    missing = runner.invoke(app, ["export", str(result.run_dir.parent / "nope")])
    assert missing.exit_code == 2 and "not a fedfm run directory" in missing.output


def test_unreadable_state_is_a_clear_error(lm_config) -> None:
    result = api.run(lm_config(**FEW))
    (result.run_dir / "checkpoints" / "round_0001" / "global.safetensors").write_bytes(b"torn")
    record = read_run(result.run_dir)
    assert record.kept_rounds() == [1, 2]
    with pytest.raises(ExportError, match="round_0001/global.safetensors is not a readable"):
        export_run(result.run_dir, "peft", round=1, out=result.run_dir / "x")
