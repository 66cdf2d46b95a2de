"""Vision and speech recipes (issue 10, item 5): image / audio formats, visual prompt tuning on a
tiny ViT, LoRA on a tiny Whisper, and the two example configs."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import fedfm
from fedfm.api import check_components
from fedfm.config import AdapterConfig, DataConfig, ModelConfig, load_config
from fedfm.data import DataError, build_federated_data, collate, load_records, tokenize_records
from fedfm.data.media import (
    normalize_transcript,
    read_wav,
    resample,
    transcript_accuracy,
)
from fedfm.eval import evaluate_examples
from fedfm.models import AdapterError, apply_adapter, get_state, load_model, set_state
from fedfm.models.vision_prompt import (
    PROMPT_NAME,
    add_visual_prompt,
    find_vit_embeddings,
    remove_visual_prompt,
)
from tests.conftest import DATA, ROOT

DIGITS = DATA / "digits.jsonl"
WORDS = DATA / "words" / "manifest.jsonl"
VISION_YAML = ROOT / "examples" / "vision_digits.yaml"
SPEECH_YAML = ROOT / "examples" / "speech_words.yaml"
VPT_STATE = {f"vit.embeddings.{PROMPT_NAME}", "classifier.weight", "classifier.bias"}


def _vit(num_labels: int = 10):
    return load_model(ModelConfig(name="tiny-vit", num_labels=num_labels), seed=0)


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2,
               channels: int = 1) -> None:
    frames = np.repeat(samples[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        data = np.round(frames * 127 + 128).astype(np.uint8).tobytes()
    else:
        data = np.round(frames * 32767).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as clip:
        clip.setnchannels(channels)
        clip.setsampwidth(width)
        clip.setframerate(rate)
        clip.writeframes(data)


# --------------------------------------------------------------------------- image data


def test_digits_load_with_the_right_shapes_and_labels() -> None:
    cfg = DataConfig(path=str(DIGITS), format="image")
    records = load_records(cfg.path, cfg)
    assert len(records) == 1797
    assert records.items[0].image.shape == (8, 8) and records.items[0].image.dtype == np.uint8
    labels = [item.label for item in records.items]
    assert sorted(set(labels)) == list(range(10)) and labels[:3] == [0, 1, 2]
    tokenized = tokenize_records(records.subset(range(64)), _vit().tokenizer, fmt="image",
                                 task="classification", max_length=64)
    example = tokenized.examples[0]
    assert example["pixel_values"].shape == (3, 16, 16) and example["labels"] == 0
    pixels = torch.stack([e["pixel_values"] for e in tokenized.examples])
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.max() > 0.9
    batch = collate(tokenized.examples[:5], pad_token_id=0, task="classification")
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    assert batch["labels"].tolist() == labels[:5]


@pytest.mark.parametrize(("row", "message"), [
    ({"image": [[0, 1], [2]], "label": 1}, "equal-length rows"),
    ({"image": [0, 1, 2], "label": 1}, "square number"),
    ({"image": [[0, 300], [0, 0]], "label": 1}, "0..255"),
    ({"image": [[0, 1], [2, 3]], "label": "cat"}, "unknown label 'cat'"),
    ({"image": [[0, 1], [2, 3]]}, "missing field 'label'"),
    ({"label": 3}, "missing field 'image'"),
])
def test_a_malformed_image_row_names_file_and_line(tmp_path, row, message) -> None:
    good = {"image": [[0, 255], [255, 0]], "label": 1}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, row, good])
    cfg = DataConfig(path=str(path), format="image")
    with pytest.raises(DataError, match=rf"bad\.jsonl, line 2: .*{message}"):
        load_records(cfg.path, cfg)
    skipped = load_records(cfg.path, cfg.model_copy(update={"on_error": "skip"}))
    assert len(skipped) == 2 and skipped.skips.total == 1


def test_image_files_and_string_labels(tmp_path) -> None:
    from PIL import Image

    Image.fromarray(np.full((5, 7, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "imgs.jsonl", [
        {"image": "a.png", "label": "cat"}, {"image": "missing.png", "label": "dog"}])
    cfg = DataConfig(path=str(path), format="image", label_names=["dog", "cat"])
    records = load_records(cfg.path, cfg)
    assert [item.label for item in records.items] == [1, 0]
    tokenizer = _vit(2).tokenizer
    ok = tokenize_records(records.subset([0]), tokenizer, fmt="image", task="classification",
                          max_length=8)
    assert ok.examples[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"imgs\.jsonl, line 2: cannot read .*missing\.png"):
        tokenize_records(records, tokenizer, fmt="image", task="classification", max_length=8)


def test_media_formats_need_a_media_model() -> None:
    cfg = DataConfig(path=str(DIGITS), format="image", max_rows=2)
    records = load_records(cfg.path, cfg, max_rows=2)
    bert = load_model(ModelConfig(name="tiny-bert", num_labels=10))
    with pytest.raises(DataError, match="needs an image model .*tiny-vit"):
        tokenize_records(records, bert.tokenizer, fmt="image", task="classification",
                         max_length=8)


# --------------------------------------------------------------------------- audio data


def test_wav_reading_mono_mixdown_and_resampling(tmp_path) -> None:
    tone = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000).astype(np.float32) * 0.5
    _write_wav(tmp_path / "s16.wav", tone, 8000, width=2, channels=2)
    _write_wav(tmp_path / "u8.wav", tone, 8000, width=1)
    for name, tolerance in (("s16.wav", 1e-4), ("u8.wav", 1e-2)):
        samples, rate = read_wav(tmp_path / name)
        assert rate == 8000 and samples.shape == (8000,)
        assert np.abs(samples - tone).max() < tolerance
    up = resample(tone, 8000, 16000)
    assert up.shape == (16000,)
    assert np.abs(up[::2] - tone).max() < 1e-3  # band-limited: the old samples are kept


def test_words_load_and_a_bad_audio_row_names_file_and_line(tmp_path) -> None:
    cfg = DataConfig(path=str(WORDS), format="audio")
    records = load_records(cfg.path, cfg)
    assert len(records) == 120
    assert {item.text for item in records.items} == {
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    whisper = load_model(ModelConfig(name="tiny-whisper"))
    tokenized = tokenize_records(records.subset([0, 1]), whisper.tokenizer, fmt="audio",
                                 task="seq2seq", max_length=16)
    example = tokenized.examples[0]
    assert example["input_features"].shape == (80, 100) and example["reference"] == "zero"
    assert example["labels"][-1] == whisper.tokenizer.eos_token_id
    assert whisper.tokenizer.decode(example["labels"], skip_special_tokens=True) == "zero"
    batch = collate(tokenized.examples, pad_token_id=0, task="seq2seq")
    assert batch["input_features"].shape == (2, 80, 100) and batch["labels"].shape[0] == 2

    samples = [0.0, 0.5, -0.5] * 100
    path = _write_jsonl(tmp_path / "audio.jsonl", [
        {"audio": samples, "text": "hi"}, {"audio": "nowhere.wav", "text": "x"},
        {"audio": samples}])
    with pytest.raises(DataError, match=r"audio\.jsonl, line 3: .*'text'"):
        load_records(str(path), DataConfig(path=str(path), format="audio"))
    cfg = DataConfig(path=str(path), format="audio", on_error="skip", sampling_rate=8000)
    records = load_records(cfg.path, cfg)
    assert len(records) == 2 and records.items[0].rate == 8000
    with pytest.raises(DataError, match=r"audio\.jsonl, line 2: cannot read .*nowhere\.wav"):
        tokenize_records(records, whisper.tokenizer, fmt="audio", task="seq2seq",
                         max_length=16)


# --------------------------------------------------------------------------- visual prompts


def test_vpt_adds_num_tokens_x_hidden_and_trains_only_prompt_and_head() -> None:
    base = _vit()
    before = {name: p.detach().clone() for name, p in base.model.named_parameters()}
    total = sum(p.numel() for p in base.model.parameters())
    bundle = apply_adapter(base, AdapterConfig(kind="visual_prompt", num_virtual_tokens=5))
    model = bundle.model
    hidden = model.config.hidden_size
    assert sum(p.numel() for p in model.parameters()) == total + 5 * hidden
    state = get_state(model)
    assert set(state) == VPT_STATE
    assert state[f"vit.embeddings.{PROMPT_NAME}"].shape == (5, hidden)
    # base names unchanged; one step moves the prompt and head, never a frozen weight
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss = model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 3])).loss
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in VPT_STATE:
            assert param.requires_grad
        else:
            assert not param.requires_grad and torch.equal(param, before[name]), name
    after = get_state(model)
    assert all(not torch.equal(after[k], state[k]) for k in VPT_STATE)
    set_state(model, state)
    assert all(torch.equal(get_state(model)[k], state[k]) for k in VPT_STATE)


def test_vpt_with_no_prompt_tokens_or_removed_prompts_is_the_base_model() -> None:
    pixels = torch.randn(3, 3, 16, 16)
    base = _vit().model
    with torch.no_grad():
        reference = base(pixel_values=pixels).logits
        add_visual_prompt(base, 0)
        assert torch.equal(base(pixel_values=pixels).logits, reference)
    prompted = _vit().model
    with torch.no_grad():
        add_visual_prompt(prompted, 4)
        assert not torch.allclose(prompted(pixel_values=pixels).logits, reference)
        assert prompted.vit.embeddings(pixels).shape[1] == 1 + 4 + 16  # CLS, prompts, patches
        remove_visual_prompt(prompted)
        assert torch.equal(prompted(pixel_values=pixels).logits, reference)
    assert not hasattr(find_vit_embeddings(prompted)[1], PROMPT_NAME)


def test_vpt_is_seeded_and_refuses_a_text_model() -> None:
    cfg = AdapterConfig(kind="visual_prompt", num_virtual_tokens=3)
    first = get_state(apply_adapter(_vit(), cfg, seed=7).model)
    again = get_state(apply_adapter(_vit(), cfg, seed=7).model)
    other = get_state(apply_adapter(_vit(), cfg, seed=8).model)
    key = f"vit.embeddings.{PROMPT_NAME}"
    assert torch.equal(first[key], again[key]) and not torch.equal(first[key], other[key])
    bert = load_model(ModelConfig(name="tiny-bert", num_labels=2))
    with pytest.raises(AdapterError, match="visual_prompt.*'bert'.*ViT"):
        apply_adapter(bert, cfg)


# --------------------------------------------------------------------------- the recipes


def test_example_configs_load_and_validate() -> None:
    for path in (VISION_YAML, SPEECH_YAML):
        config = load_config(path)
        check_components(config)
        assert Path(config.data.path).is_file()
    assert load_config(VISION_YAML).adapter.kind == "visual_prompt"
    assert load_config(SPEECH_YAML).data.format == "audio"


def _run_and_rebuild(path: Path, tmp_path: Path, overrides: list[str]):
    """Run a recipe (evaluation off), then the model holding its final State and its data."""
    result = fedfm.run(path, overrides=[f"tracking.output_dir={tmp_path}",
                                        "tracking.console=false", "eval.enabled=false",
                                        *overrides])
    config = load_config(path, overrides)
    bundle = apply_adapter(load_model(config.model, seed=config.seed), config.adapter,
                           seed=config.seed)
    initial = get_state(bundle.model)
    data = build_federated_data(config.data, num_clients=config.federation.num_clients,
                                tokenizer=bundle.tokenizer, task=bundle.task,
                                max_length=config.model.max_length, seed=config.seed)
    return result, bundle, initial, data


def _metrics(bundle, examples) -> dict[str, float]:
    return evaluate_examples(bundle.model, examples, task=bundle.task,
                             collate_fn=lambda rows: collate(rows, pad_token_id=0,
                                                             task=bundle.task),
                             batch_size=128, device=torch.device("cpu"))


def test_a_short_federated_vision_run_learns(tmp_path) -> None:
    result, bundle, _, data = _run_and_rebuild(VISION_YAML, tmp_path, [
        "federation.num_clients=5", "federation.clients_per_round=5", "federation.rounds=6",
        "algorithm.local.steps=6"])
    assert set(result.final_state) == VPT_STATE
    assert result.summary["communicated_params"] == 8 * 128 + 10 * 128 + 10
    set_state(bundle.model, result.final_state)
    metrics = _metrics(bundle, data.global_validation)
    assert metrics["examples"] == 359
    assert metrics["accuracy"] > 0.3  # chance: 0.1


def test_whisper_lora_state_and_a_short_run_lowers_the_loss(tmp_path) -> None:
    result, bundle, initial, data = _run_and_rebuild(SPEECH_YAML, tmp_path, [
        "federation.rounds=4", "algorithm.local.steps=5"])
    assert set(result.final_state) == set(initial)
    assert all(".lora_A." in key or ".lora_B." in key for key in initial)
    assert len(initial) == 2 * 2 * (2 + 2 * 2)  # A,B x q,v x (2 encoder + 2x2 decoder attns)
    before = _metrics(bundle, data.global_validation)["loss"]
    set_state(bundle.model, result.final_state)
    after = _metrics(bundle, data.global_validation)["loss"]
    assert after < before - 2.0, (before, after)
    found = transcript_accuracy(bundle.model, bundle.tokenizer, data.global_validation[:4])
    assert found["transcribed"] == 4 and 0.0 <= found["exact_match"] <= 1.0


def test_transcripts_are_normalized_before_matching() -> None:
    assert normalize_transcript("  Seven! ") == "seven"
    assert normalize_transcript("It's  TWO.") == "it's two"
