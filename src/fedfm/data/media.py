"""Image and audio data: validate rows, load pixels and waveforms, extract the model's inputs.

Two formats (``DataConfig.format``), parsed by ``parse_image`` / ``parse_audio`` like the text
formats (a malformed row is a ``DataError`` naming file and line, or skipped and counted):

``image``
    ``image_field`` holds the pixels -- ``H x W`` (grayscale), ``H x W x C`` (C = 1, 3 or 4), or a
    flat list of a square image's ``H*W`` gray values, all in 0..255 -- or the path of an image
    file (PNG, JPEG, ... read with Pillow), relative to the data file's folder. ``label_field``
    holds an int class index or a string label (looked up in ``label_names`` when given).
``audio``
    ``audio_field`` holds the path of a PCM WAV file (8/16/32-bit, any rate, mono or averaged to
    mono; read with the standard library's ``wave``), relative to the data file's folder, or a
    list of float samples at ``data.sampling_rate``. ``text_field`` holds the transcript.
    Audio at another rate than the model's is resampled (band-limited, by FFT); audio longer
    than the model's window is cut at the end (Whisper's feature extractor does it).

Feature extraction is the model's own processor, built from its config by ``build_processor``
(``ViTImageProcessor``: resize to the model's image size, rescale by 1/255, normalize with mean
and std 0.5; ``WhisperFeatureExtractor``: log-mel features padded to the encoder's window) --
never downloaded. The model loader attaches it to the bundle's tokenizer
(``attach_processor``), which is how the data layer, handed the tokenizer, finds it.

Examples: images give ``{"pixel_values": (C, H, W) float tensor, "labels": int, "row"}``; audio
gives ``{"input_features": (mel, frames) float tensor, "labels": transcript ids + EOS,
"reference": transcript, "row"}``. ``greedy_transcribe`` / ``transcript_accuracy`` decode
speech models greedily and score exact transcript matches.
"""

from __future__ import annotations

import math
import re
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from transformers import PretrainedConfig, WhisperFeatureExtractor

from fedfm.config import DataConfig
from fedfm.data.sources import DataError, RowError, split_path

if TYPE_CHECKING:
    from fedfm.data.formats import Records

try:  # transformers >= 5 names the Pillow backend; its default one needs torchvision
    from transformers import ViTImageProcessorPil as ViTImageProcessor
except ImportError:  # transformers 4.x: the default processor is the Pillow/numpy one
    from transformers import ViTImageProcessor  # type: ignore[assignment]

MEDIA_FORMATS = ("image", "audio")
PROCESSOR_ATTR = "feature_processor"  # where the loader attaches the processor on a tokenizer
IMAGE_CHANNELS = (1, 3, 4)
AUDIO_RATE = 16_000  # Whisper's sampling rate
HOP_LENGTH = 160  # Whisper: 10 ms frames at 16 kHz
IGNORE_INDEX = -100


class ImageItem(NamedTuple):
    image: str | np.ndarray  # a file path, or uint8 pixels (H, W) / (H, W, C)
    label: int


class AudioItem(NamedTuple):
    audio: str | np.ndarray  # a WAV path, or float32 samples at ``rate``
    text: str
    rate: int


# --------------------------------------------------------------------------- processors


def build_processor(config: PretrainedConfig) -> Any | None:
    """The feature processor of a ViT or Whisper model config; None for other (text) models."""
    if config.model_type == "vit":
        return image_processor(config)
    if config.model_type == "whisper":
        return audio_feature_extractor(config)
    return None


def image_processor(config: PretrainedConfig) -> Any:
    size = int(config.image_size)
    channels = int(config.num_channels)
    return ViTImageProcessor(do_resize=True, size={"height": size, "width": size},
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.5] * channels, image_std=[0.5] * channels)


def audio_feature_extractor(config: PretrainedConfig) -> WhisperFeatureExtractor:
    """Log-mel features for the encoder's window: ``2 * max_source_positions`` frames of 10 ms
    (Whisper's first two convolutions keep, then halve, the frame count)."""
    frames = 2 * int(config.max_source_positions)
    extractor = WhisperFeatureExtractor(feature_size=int(config.num_mel_bins),
                                        sampling_rate=AUDIO_RATE, hop_length=HOP_LENGTH,
                                        chunk_length=max(1, math.ceil(frames / 100)))
    extractor.n_samples = frames * HOP_LENGTH  # the window, exactly (chunk_length is whole s)
    extractor.nb_max_frames = frames
    return extractor


def attach_processor(tokenizer: Any, processor: Any | None) -> None:
    """Let ``tokenizer`` carry the model's feature processor (no-op for None)."""
    if processor is not None:
        setattr(tokenizer, PROCESSOR_ATTR, processor)


def processor_of(tokenizer: Any, fmt: str) -> Any:
    """The processor the loader attached, checked against the data format."""
    processor = getattr(tokenizer, PROCESSOR_ATTR, None)
    want_image = fmt == "image"
    fits = processor is not None and (
        hasattr(processor, "image_mean") if want_image else isinstance(
            processor, WhisperFeatureExtractor))
    if not fits:
        kind, preset = ("an image", "tiny-vit") if want_image else ("a speech", "tiny-whisper")
        raise DataError(f"data.format={fmt!r} needs {kind} model with its feature processor "
                        f"(e.g. model.name: {preset}); this model has none")
    return processor


# --------------------------------------------------------------------------- parsing


def _wrong(where: str, detail: str) -> RowError:
    return RowError(where, "wrong type", detail)


def _path_or_none(value: Any, name: str, where: str) -> str | None:
    if value is None:
        raise RowError(where, "missing field", f"missing field {name!r}")
    if isinstance(value, str):
        if not value.strip():
            raise _wrong(where, f"field {name!r} is an empty path")
        return value
    if not isinstance(value, list):
        raise _wrong(where, f"field {name!r} must be a file path or a list of numbers, got "
                            f"{type(value).__name__}")
    return None


def _numbers(value: list[Any], name: str, where: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _wrong(where, f"field {name!r} must hold numbers in equal-length rows") from None
    if array.size == 0 or not np.isfinite(array).all():
        raise _wrong(where, f"field {name!r} must be a non-empty list of finite numbers")
    return array


def _pixels(array: np.ndarray, name: str, where: str) -> np.ndarray:
    if array.ndim == 1:
        side = math.isqrt(array.size)
        if side * side != array.size:
            raise _wrong(where, f"field {name!r}: a flat list needs a square number of gray "
                                f"values, got {array.size}")
        array = array.reshape(side, side)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in IMAGE_CHANNELS):
        raise _wrong(where, f"field {name!r} must be H x W or H x W x C (C = 1, 3 or 4), got "
                            f"shape {tuple(array.shape)}")
    if array.min() < 0 or array.max() > 255:
        raise RowError(where, "bad value", f"field {name!r}: pixel values must lie in 0..255, "
                                           f"got {array.min():g}..{array.max():g}")
    return np.round(array).astype(np.uint8)


def _label_index(row: dict[str, Any], where: str, cfg: DataConfig) -> int:
    label, names = row.get(cfg.label_field), cfg.label_names
    if label is None:
        raise RowError(where, "missing field", f"missing field {cfg.label_field!r} (expected "
                                               f"an int or string label)")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise _wrong(where, f"label field {cfg.label_field!r} must be an int or a string, got "
                            f"{type(label).__name__} {label!r}")
    if isinstance(label, str) and names is not None and label in names:
        return names.index(label)
    index = int(label) if isinstance(label, int) or re.fullmatch(r"\d+", label) else -1
    if index >= 0 and (names is None or index < len(names)):
        return index
    allowed = f"one of {names} or their indices" if names else "an int class index >= 0"
    raise RowError(where, "unknown label", f"unknown label {label!r}; expected {allowed}")


def parse_image(row: dict[str, Any], where: str, cfg: DataConfig) -> ImageItem:
    name = cfg.image_field
    value = row.get(name)
    path = _path_or_none(value, name, where)
    image = path if path is not None else _pixels(_numbers(value, name, where), name, where)
    return ImageItem(image, _label_index(row, where, cfg))


def parse_audio(row: dict[str, Any], where: str, cfg: DataConfig) -> AudioItem:
    name = cfg.audio_field
    value = row.get(name)
    path = _path_or_none(value, name, where)
    text = row.get(cfg.text_field)
    if not isinstance(text, str):
        raise RowError(where, "missing field" if text is None else "wrong type",
                       f"field {cfg.text_field!r} must hold the transcript string")
    if path is not None:
        return AudioItem(path, text, 0)
    samples = _numbers(value, name, where)
    if samples.ndim != 1:
        raise _wrong(where, f"field {name!r} must be a flat list of samples")
    return AudioItem(samples.astype(np.float32), text, cfg.sampling_rate)


# --------------------------------------------------------------------------- loading


def _base_dir(source: str) -> Path:
    file, _ = split_path(source)
    return file if file.is_dir() else file.parent


def _resolve(path: str, source: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else _base_dir(source) / candidate


def load_image(path: Path) -> np.ndarray:
    """Pixels of an image file as uint8 (H, W, C)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of a PCM WAV file."""
    with wave.open(str(path), "rb") as clip:
        width, channels, rate = clip.getsampwidth(), clip.getnchannels(), clip.getframerate()
        frames = clip.readframes(clip.getnframes())
    if width == 1:
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = "<i2" if width == 2 else "<i4"
        samples = np.frombuffer(frames, dtype=dtype).astype(np.float32) / 2 ** (8 * width - 1)
    else:
        raise ValueError(f"{8 * width}-bit samples are not supported (use 8, 16 or 32-bit PCM)")
    return samples.reshape(-1, channels).mean(axis=1), rate


def resample(signal: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by truncating (or zero-padding) the spectrum."""
    if rate == target or signal.size == 0:
        return signal.astype(np.float32)
    count = max(1, round(len(signal) * target / rate))
    spectrum = np.fft.rfft(signal)
    kept = np.zeros(count // 2 + 1, dtype=complex)
    width = min(len(kept), len(spectrum))
    kept[:width] = spectrum[:width]
    return (np.fft.irfft(kept, n=count) * (count / len(signal))).astype(np.float32)


def _channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, channels) uint8: gray repeated to RGB, alpha dropped, RGB averaged to gray."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    if pixels.shape[2] == channels:
        return pixels
    if channels == 1:
        return np.round(pixels.mean(axis=2, keepdims=True)).astype(np.uint8)
    return np.repeat(pixels[:, :, :1], channels, axis=2)


def _load(items: Sequence[Any], records: Records, loader: Any) -> list[Any]:
    loaded = []
    for i, item in enumerate(items):
        value = item[0]
        if not isinstance(value, str):
            loaded.append(value)
            continue
        path = _resolve(value, records.source)
        try:
            loaded.append(loader(path))
        except (OSError, ValueError, EOFError, wave.Error) as exc:
            raise DataError(f"{records.locations[i]}: cannot read {path}: {exc}") from exc
    return loaded


# --------------------------------------------------------------------------- examples


def tokenize_media(records: Records, rows: Sequence[int], tokenizer: Any, *, fmt: str,
                   max_length: int) -> list[dict[str, Any]]:
    """The examples of ``records`` (format ``image`` or ``audio``), ``row`` ids from ``rows``."""
    if not records.items:
        return []
    processor = processor_of(tokenizer, fmt)
    if fmt == "image":
        return _image_examples(records, rows, processor)
    return _audio_examples(records, rows, processor, tokenizer, max_length)


def _image_examples(records: Records, rows: Sequence[int], processor: Any
                    ) -> list[dict[str, Any]]:
    channels = len(processor.image_mean)
    images = [_channels(pixels, channels) for pixels in _load(records.items, records, load_image)]
    pixels = processor(images, return_tensors="pt",
                       input_data_format="channels_last")["pixel_values"]
    return [{"pixel_values": pixels[i].clone(), "labels": int(item.label), "row": row}
            for i, (item, row) in enumerate(zip(records.items, rows, strict=True))]


def _audio_examples(records: Records, rows: Sequence[int], extractor: WhisperFeatureExtractor,
                    tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    rate = extractor.sampling_rate
    loaded = _load(records.items, records, read_wav)  # (samples, rate) for files
    waves = [resample(*clip, rate) if isinstance(clip, tuple) else resample(clip, item.rate, rate)
             for item, clip in zip(records.items, loaded, strict=True)]
    features = extractor(waves, sampling_rate=rate, return_tensors="pt")["input_features"]
    texts = [item.text for item in records.items]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    eos = tokenizer.eos_token_id
    tail = [int(eos)] if eos is not None else []
    return [{"input_features": features[i].clone(),
             "labels": (list(encoded[i]) + tail)[:max_length], "reference": text, "row": row}
            for i, (text, row) in enumerate(zip(texts, rows, strict=True))]


def collate_media(examples: Sequence[dict[str, Any]], task: str) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` / ``input_features``; class ids, or transcript ids right-padded
    with -100."""
    key = "pixel_values" if "pixel_values" in examples[0] else "input_features"
    batch = {key: torch.stack([torch.as_tensor(e[key]) for e in examples])}
    labels = [e["labels"] for e in examples]
    if task == "classification":
        batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.long)
        return batch
    padded = torch.full((len(labels), max(len(ids) for ids in labels)), IGNORE_INDEX,
                        dtype=torch.long)
    for i, ids in enumerate(labels):
        padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    batch["labels"] = padded
    return batch


# --------------------------------------------------------------------------- transcription


@torch.no_grad()
def greedy_transcribe(model: Any, input_features: torch.Tensor, *, start_id: int,
                      eos_id: int | None, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of a speech encoder-decoder (plain or peft-wrapped), token ids without
    the start token and cut before EOS. A plain loop rather than ``generate``: Whisper's own
    generate expects the multilingual vocabulary's task and language tokens."""
    rows = input_features.shape[0]
    decoded = torch.full((rows, 1), start_id, dtype=torch.long, device=input_features.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=input_features.device)
    for _ in range(max_new_tokens):
        logits = model(input_features=input_features, decoder_input_ids=decoded,
                       use_cache=False).logits[:, -1]
        step = logits.argmax(dim=-1)
        decoded = torch.cat([decoded, step[:, None]], dim=1)
        if eos_id is not None:
            finished |= step == eos_id
        if bool(finished.all()):
            break
    out = []
    for ids in decoded[:, 1:].tolist():
        out.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return out


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def transcript_accuracy(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], *,
                        device: torch.device | str = "cpu", batch_size: int = 64,
                        max_new_tokens: int = 8) -> dict[str, float]:
    """Share of greedy transcripts equal to their reference after ``normalize_transcript``
    (``{"exact_match", "transcribed"}``; ``{}`` for no examples). Restores the train mode."""
    if not examples:
        return {}
    start = int(model.config.decoder_start_token_id)
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for begin in range(0, len(examples), batch_size):
            chunk = examples[begin:begin + batch_size]
            features = torch.stack([torch.as_tensor(e["input_features"]) for e in chunk])
            ids = greedy_transcribe(model, features.to(device), start_id=start,
                                    eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens)
            for tokens, example in zip(ids, chunk, strict=True):
                said = tokenizer.decode(tokens, skip_special_tokens=True)
                hits += normalize_transcript(said) == normalize_transcript(example["reference"])
    finally:
        model.train(was_training)
    return {"exact_match": hits / len(examples), "transcribed": float(len(examples))}
