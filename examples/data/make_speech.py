"""Synthesize the spoken-digit set of the speech recipe with espeak-ng (``examples/data/words/``).

The ten English words ``zero`` .. ``nine``, each spoken by 6 synthetic speakers (an espeak-ng
accent + voice variant) at 2 seeded (speed, pitch) settings: 120 clips, 16 kHz mono 16-bit PCM
WAV, leading and trailing silence trimmed, at most 1 s each. ``manifest.jsonl`` lists one clip a
line: ``{"audio": file name (relative to the manifest), "text": word, "speaker", "speed",
"pitch"}``; ``speaker`` is the natural federated partition (one client per speaker).

espeak-ng writes 22,050 Hz WAV; it is resampled to 16 kHz here with an FFT (band-limited)
resampler in numpy, so nothing beyond numpy and the espeak-ng program is needed::

    sudo apt-get install -y espeak-ng
    python examples/data/make_speech.py            # rewrites examples/data/words/

The settings come from ``random.Random(SEED)``; the espeak-ng version used is written to
``words/VERSION.txt`` (synthesis may differ slightly between espeak-ng releases). espeak-ng is
GPL-3.0-or-later; the audio it produces is program output, not part of the program.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("words")
SEED = 0
RATE = 16_000
MAX_SECONDS = 1.0
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# accent + voice variant (espeak-ng's gmw voices; no mbrola voices needed)
SPEAKERS = ("en-us+m3", "en-gb+f2", "en-gb-scotland+m1", "en-029+f4", "en-gb-x-rp+m7",
            "en-us-nyc+f1")
TAKES = 2  # (speed, pitch) settings per speaker and word
SPEED = (165, 230)  # words per minute
PITCH = (25, 75)  # espeak-ng pitch, 0..99
SILENCE = 0.02  # trim below this share of the clip's peak
MARGIN = 0.02  # seconds of silence kept on each side
PEAK = 0.9


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True)
    return out.stdout.split("  Data at:")[0].strip()  # drop the local data path


def synthesize(word: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's waveform (float in [-1, 1]) and its sample rate."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", str(path), word], check=True)
        with wave.open(str(path), "rb") as clip:
            frames = clip.readframes(clip.getnframes())
            rate = clip.getframerate()
    return np.frombuffer(frames, dtype="<i2").astype(np.float64) / 32768.0, rate


def resample(signal: np.ndarray, rate: int, target: int = RATE) -> np.ndarray:
    """Band-limited resampling by truncating (or zero-padding) the spectrum."""
    count = round(len(signal) * target / rate)
    spectrum = np.fft.rfft(signal)
    kept = np.zeros(count // 2 + 1, dtype=complex)
    width = min(len(kept), len(spectrum))
    kept[:width] = spectrum[:width]
    return np.fft.irfft(kept, n=count) * (count / len(signal))


def trim(signal: np.ndarray, rate: int = RATE) -> np.ndarray:
    loud = np.flatnonzero(np.abs(signal) > SILENCE * np.abs(signal).max())
    margin = int(MARGIN * rate)
    start, end = max(0, loud[0] - margin), min(len(signal), loud[-1] + 1 + margin)
    return signal[start:end]


def to_wav(signal: np.ndarray, rate: int = RATE) -> bytes:
    pcm = np.round(signal / np.abs(signal).max() * PEAK * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(pcm.tobytes())
    return buffer.getvalue()


def main(out: Path = OUT) -> None:
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.wav"):
        old.unlink()
    rows, total = [], 0
    for s, speaker in enumerate(SPEAKERS):
        for word in WORDS:
            for take in range(TAKES):
                speed, pitch = rng.randint(*SPEED), rng.randint(*PITCH)
                raw, rate = synthesize(word, speaker, speed, pitch)
                clip = trim(resample(raw, rate))
                if len(clip) > MAX_SECONDS * RATE:
                    raise SystemExit(f"{word!r} by {speaker} at speed {speed} lasts "
                                     f"{len(clip) / RATE:.2f} s > {MAX_SECONDS} s")
                name = f"{word}_s{s}_t{take}.wav"
                data = to_wav(clip)
                (out / name).write_bytes(data)
                total += len(data)
                rows.append({"audio": name, "text": word, "speaker": speaker, "speed": speed,
                             "pitch": pitch})
    manifest = "".join(json.dumps(row) + "\n" for row in rows)
    (out / "manifest.jsonl").write_text(manifest)
    (out / "VERSION.txt").write_text(f"{espeak_version()}\nseed {SEED}\n")
    print(f"{out}: {len(rows)} clips, {total:,} bytes of WAV ({espeak_version()})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
