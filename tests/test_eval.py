"""Tests for fedfm.eval: metrics vs hand-computed values; evaluators on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

from fedfm.eval import (
    accuracy,
    evaluate_examples,
    fairness_summary,
    generate_rouge,
    macro_f1,
    perplexity,
    primary_metric,
    rouge_l,
)

VOCAB = 100
PAD, EOS = 0, 1
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- fixtures


def make_collate(pad_to: int | None = None):
    """Right-pad input_ids with PAD and token labels with -100 (to ``pad_to`` if given)."""

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        width = max(width, pad_to or 0)
        ids = torch.full((len(items), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        token_labels = isinstance(items[0]["labels"], list)
        if token_labels:
            lab_width = max(max(len(it["labels"]) for it in items), pad_to or 0)
            labels = torch.full((len(items), lab_width), -100, dtype=torch.long)
        else:
            labels = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.tensor(it["input_ids"])
            mask[i, :n] = 1
            if token_labels:
                labels[i, : len(it["labels"])] = torch.tensor(it["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_t5(seed: int, initializer_factor: float = 1.0):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
        initializer_factor=initializer_factor,
    )
    return AutoModelForSeq2SeqLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def t5():
    return tiny_t5(seed=1)


@pytest.fixture(scope="module")
def t5_lively():
    """Larger random weights, so greedy outputs vary with the prompt instead of collapsing."""
    return tiny_t5(seed=2, initializer_factor=10.0)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(2)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=PAD,
    )
    return AutoModelForSequenceClassification.from_config(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def lm_examples() -> list[dict]:
    """Different lengths; the first tokens (the 'prompt') are unsupervised."""
    g = torch.Generator().manual_seed(3)
    out = []
    for length, prompt in [(5, 2), (9, 4), (3, 1), (12, 6), (7, 0)]:
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def seq2seq_examples() -> list[dict]:
    g = torch.Generator().manual_seed(4)
    out = []
    for src_len, tgt_len in [(4, 3), (8, 5), (2, 2), (6, 7)]:
        out.append({
            "input_ids": torch.randint(3, VOCAB, (src_len,), generator=g).tolist(),
            "labels": torch.randint(3, VOCAB, (tgt_len,), generator=g).tolist() + [EOS],
        })
    return out


def cls_examples() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [
        {
            "input_ids": torch.randint(3, VOCAB, (int(n),), generator=g).tolist(),
            "labels": i % 3,
        }
        for i, n in enumerate([4, 7, 3, 9, 5, 6, 2, 8])
    ]


# --------------------------------------------------------------------------- metrics


def test_accuracy_hand_computed():
    assert accuracy([0, 1, 2, 1], [0, 2, 2, 1]) == pytest.approx(0.75)
    assert accuracy(torch.tensor([1, 1]), torch.tensor([0, 0])) == 0.0
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_macro_f1_class_absent_from_preds():
    # labels: 0 0 1 1 2 ; preds: 0 1 1 1 1  (class 2 is never predicted)
    # class 0: tp=1 fp=0 fn=1 -> F1 = 2/3 ; class 1: tp=2 fp=2 fn=0 -> P=1/2 R=1 F1 = 2/3
    # class 2: tp=0 fp=0 fn=1 -> F1 = 0 ; class 3 absent from both -> not averaged
    got = macro_f1([0, 1, 1, 1, 1], [0, 0, 1, 1, 2], num_labels=4)
    assert got == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_macro_f1_class_only_in_preds_and_perfect():
    # labels 0 0 1 ; preds 0 2 1: class0 F1=2/3, class1 F1=1, class2 (pred only) F1=0
    assert macro_f1([0, 2, 1], [0, 0, 1], num_labels=3) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert macro_f1([2, 0], [2, 0], num_labels=3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        macro_f1([3], [0], num_labels=3)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(float("nan")))


def test_rouge_l():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    # LCS("a b c d", "a c") = 2: P = 2/2, R = 2/4 -> F = 2/3; second pair shares nothing
    assert rouge_l(["a c", "x"], ["a b c d", "y"]) == pytest.approx((2 / 3 + 0.0) / 2)
    # stemming: "running" ~ "run"
    assert rouge_l(["running"], ["run"]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- evaluate_examples


def hand_causal_loss(model, examples) -> tuple[float, int]:
    total, n = 0.0, 0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()
        target = torch.tensor(ex["labels"][1:])
        keep = target != -100
        total += float(F.cross_entropy(logits[:-1][keep], target[keep], reduction="sum"))
        n += int(keep.sum())
    return total / n, n


@torch.no_grad()
def test_causal_lm_loss_is_token_weighted_and_batch_independent(llama):
    examples = lm_examples()
    expected, n_tokens = hand_causal_loss(llama, examples)
    results = [
        evaluate_examples(llama, examples, task="causal_lm", collate_fn=make_collate(),
                          batch_size=bs, device=CPU)
        for bs in (1, 3, len(examples))
    ]
    for res in results:
        assert res["tokens"] == n_tokens
        assert res["loss"] == pytest.approx(expected, abs=1e-5)
        assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    # Not the mean of per-example means (the example lengths differ).
    per_example = [hand_causal_loss(llama, [ex])[0] for ex in examples]
    assert abs(sum(per_example) / len(per_example) - expected) > 1e-3
    padded = evaluate_examples(llama, examples, task="causal_lm",
                               collate_fn=make_collate(pad_to=20), batch_size=2, device=CPU)
    assert padded["loss"] == pytest.approx(expected, abs=1e-5)


@torch.no_grad()
def test_seq2seq_loss_matches_hand_computation(t5):
    examples = seq2seq_examples()
    total, n = 0.0, 0
    for ex in examples:
        labels = torch.tensor([ex["labels"]])
        logits = t5(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).logits[0]
        total += float(F.cross_entropy(logits.double(), labels[0], reduction="sum"))
        n += labels.shape[1]
    for bs in (1, 3, len(examples)):
        res = evaluate_examples(t5, examples, task="seq2seq", collate_fn=make_collate(),
                                batch_size=bs, device=CPU)
        assert res["tokens"] == n
        assert res["loss"] == pytest.approx(total / n, abs=1e-5)


@torch.no_grad()
def test_classification_matches_argmax_by_hand(bert):
    examples = cls_examples()
    preds, losses = [], []
    for ex in examples:
        logits = bert(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
        preds.append(int(logits.argmax()))
        losses.append(float(F.cross_entropy(logits[None], torch.tensor([ex["labels"]]))))
    labels = [ex["labels"] for ex in examples]
    res = evaluate_examples(bert, examples, task="classification", collate_fn=make_collate(),
                            batch_size=3, device=CPU, num_labels=3)
    assert res["examples"] == len(examples)
    correct = sum(int(p == y) for p, y in zip(preds, labels, strict=True))
    assert res["accuracy"] == pytest.approx(correct / len(examples))
    assert res["macro_f1"] == pytest.approx(macro_f1(preds, labels, 3))
    assert res["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def test_evaluate_restores_mode_and_handles_empty(llama):
    llama.train()
    try:
        evaluate_examples(llama, lm_examples()[:2], task="causal_lm", collate_fn=make_collate(),
                          batch_size=2, device=CPU)
        assert llama.training
    finally:
        llama.eval()
    evaluate_examples(llama, lm_examples()[:2], task="causal_lm", collate_fn=make_collate(),
                      batch_size=2, device=CPU)
    assert not llama.training
    assert evaluate_examples(llama, [], task="causal_lm", collate_fn=make_collate(),
                             batch_size=2, device=CPU) == {}
    unsupervised = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    assert evaluate_examples(llama, unsupervised, task="causal_lm", collate_fn=make_collate(),
                             batch_size=1, device=CPU) == {"tokens": 0}
    with pytest.raises(ValueError):
        evaluate_examples(llama, unsupervised, task="nope", collate_fn=make_collate(),
                          batch_size=1, device=CPU)


# --------------------------------------------------------------------------- generation


def one_by_one(model, tokenizer, prompts, max_new_tokens, *, causal: bool) -> list[str]:
    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=PAD, eos_token_id=EOS)[0]
        new = out[ids.shape[1]:] if causal else out
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts


PROMPTS = [[5, 9, 14], [22, 7, 31, 40, 8, 3, 11], [60], [17, 18, 19, 20, 21]]


def gen_examples(references: list[str]) -> list[dict]:
    return [{"prompt_ids": p, "reference": r} for p, r in zip(PROMPTS, references, strict=True)]


@torch.no_grad()
def test_generate_rouge_left_padding_matches_unpadded(llama, tokenizer):
    expected = one_by_one(llama, tokenizer, PROMPTS, 6, causal=True)
    assert all(expected)  # non-empty, so ROUGE = 1 is meaningful
    examples = gen_examples(expected)
    res = generate_rouge(llama, tokenizer, examples, task="causal_lm", max_new_tokens=6,
                         device=CPU, batch_size=4)
    assert res == {"rouge_l": pytest.approx(1.0), "generated": 4}
    wrong = [{"prompt_ids": p, "reference": "zzz"} for p in PROMPTS]
    assert generate_rouge(llama, tokenizer, wrong, task="causal_lm", max_new_tokens=6,
                          device=CPU)["rouge_l"] == 0.0
    assert generate_rouge(llama, tokenizer, [], task="causal_lm", max_new_tokens=6,
                          device=CPU) == {}


@torch.no_grad()
def test_generate_rouge_seq2seq(t5_lively, tokenizer):
    t5 = t5_lively
    expected = one_by_one(t5, tokenizer, PROMPTS, 5, causal=False)
    assert all(expected)
    examples = gen_examples(expected)
    res = generate_rouge(t5, tokenizer, examples, task="seq2seq", max_new_tokens=5,
                         device=CPU, batch_size=3)
    assert res["rouge_l"] == pytest.approx(1.0)
    assert res["generated"] == 4


@torch.no_grad()
def test_generate_rouge_peft_model(llama, tokenizer):
    peft = pytest.importorskip("peft")
    expected = one_by_one(llama, tokenizer, PROMPTS, 4, causal=True)
    wrapped = peft.get_peft_model(
        llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4)
    )
    try:
        # LoRA B starts at zero: the adapted model generates exactly as the base model.
        examples = gen_examples(expected)
        res = generate_rouge(wrapped, tokenizer, examples, task="causal_lm", max_new_tokens=4,
                             device=CPU, batch_size=4)
        assert res["rouge_l"] == pytest.approx(1.0)
    finally:
        wrapped.unload()


# --------------------------------------------------------------------------- fairness


def test_fairness_summary():
    per_client = {i: {"accuracy": v} for i, v in enumerate([0.1 * k for k in range(11)])}
    per_client[99] = {"loss": 1.0}  # lacks the metric: ignored
    s = fairness_summary(per_client, metric="accuracy", higher_is_better=True)
    values = [0.1 * k for k in range(11)]
    mean = sum(values) / 11
    assert s["accuracy_mean"] == pytest.approx(mean)
    assert s["accuracy_std"] == pytest.approx(
        math.sqrt(sum((v - mean) ** 2 for v in values) / 11))
    # ceil(10% of 11) = 2 clients
    assert s["accuracy_worst10"] == pytest.approx(0.05)
    assert s["accuracy_best10"] == pytest.approx(0.95)
    assert s["accuracy_min"] == pytest.approx(0.0)
    assert s["accuracy_max"] == pytest.approx(1.0)
    losses = fairness_summary({0: {"loss": 2.0}, 1: {"loss": 3.0}}, metric="loss",
                              higher_is_better=False)
    assert losses["loss_worst10"] == 3.0 and losses["loss_best10"] == 2.0
    assert fairness_summary({}, metric="loss", higher_is_better=False) == {}
    assert fairness_summary({0: {"x": 1.0}}, metric="loss", higher_is_better=False) == {}


def test_primary_metric():
    assert primary_metric("classification") == ("accuracy", True)
    assert primary_metric("causal_lm") == ("loss", False)
    assert primary_metric("seq2seq") == ("loss", False)
