"""Audio features: log-mel spectrograms of WAV files, computed once and cached by the files' content.

Legend: n recordings, l samples, t frames, f mel bins.

``log_mels(paths, spec)`` reads each recording (``scipy.io.wavfile``), brings it to a fixed length (centred:
zero-padded on both sides when shorter, the middle kept when longer), optionally adds white Gaussian noise at a
fixed signal-to-noise ratio, and computes a log-mel spectrogram with librosa (the ``audio`` extra:
``pip install 'fuselab[audio]'``; torchaudio does not load beside torch 2.13). The result ``(N, T, F)`` is
stored under the cache folder (``$FUSELAB_CACHE``, default ``~/.cache/fuselab``) in a file named by a hash of
every file's name and bytes and of the feature settings: a second call with the same files reads that file,
and any change of a recording (or of a setting) computes and stores a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CACHE_VERSION = 1  # bump when the computation changes, so that old cache files are not read


def cache_dir() -> Path:
    """The cache folder: ``$FUSELAB_CACHE`` or ``~/.cache/fuselab``."""
    return Path(os.environ.get("FUSELAB_CACHE") or Path.home() / ".cache" / "fuselab").expanduser()


@dataclasses.dataclass(frozen=True)
class MelSpec:
    """Log-mel settings. Defaults suit 8 kHz speech: 32 ms windows, 16 ms hop, 64 frames (1.02 s), 32 bins.

    Args:
        sample_rate: expected rate of every file (a file at another rate is an error, not resampled).
        n_fft: FFT window in samples.
        hop: hop between frames in samples.
        n_mels: mel bins F (up to the Nyquist frequency).
        frames: frames T kept; the waveform is brought to ``hop * frames`` samples first.
        top_db: dB below each recording's maximum at which values are clipped (its maximum is 0 dB).
        snr_db: add white Gaussian noise at this signal-to-noise ratio (signal power = mean square of the
            recording before padding); None adds none.
        noise_seed: the noise of a recording is drawn from ``(noise_seed, crc32(file name))``, so it does not
            depend on which other files are loaded or in what order.
    """

    sample_rate: int = 8000
    n_fft: int = 256
    hop: int = 128
    n_mels: int = 32
    frames: int = 64
    top_db: float = 80.0
    snr_db: float | None = None
    noise_seed: int = 0

    @property
    def samples(self) -> int:
        return self.hop * self.frames


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A mono recording as float32 in [-1, 1] and its sample rate."""
    from scipy.io import wavfile

    rate, y = wavfile.read(path)
    if y.ndim > 1:
        y = y.mean(axis=1)
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.float32) / float(np.iinfo(y.dtype).max)
    return y.astype(np.float32), int(rate)


def fit_length(y: np.ndarray, samples: int) -> np.ndarray:
    """Centre ``y`` in ``samples`` samples: zero-pad both sides, or keep the middle."""
    if len(y) >= samples:
        start = (len(y) - samples) // 2
        return y[start : start + samples]
    before = (samples - len(y)) // 2
    return np.pad(y, (before, samples - len(y) - before))


def add_noise(y: np.ndarray, padded: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``padded`` plus white noise whose power is the power of ``y`` (the unpadded recording) / 10^(snr/10)."""
    power = float(np.mean(y.astype(np.float64) ** 2)) or 1e-12
    noise = rng.standard_normal(len(padded)) * np.sqrt(power / 10 ** (snr_db / 10))
    return (padded + noise).astype(np.float32)


def _librosa():
    try:
        import librosa
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError(
            "log-mel spectrograms need librosa: pip install 'fuselab[audio]' (or pip install librosa)"
        ) from None
    return librosa


def compute_log_mels(paths: Sequence[Path], spec: MelSpec) -> np.ndarray:
    """``(N, T, F)`` float32 log-mel spectrograms in dB relative to each recording's maximum, clipped at
    ``-top_db``. No cache."""
    librosa = _librosa()
    waves = np.empty((len(paths), spec.samples), dtype=np.float32)
    for i, path in enumerate(paths):
        y, rate = read_wav(path)
        if rate != spec.sample_rate:
            raise ValueError(f"{path} has sample rate {rate}, expected {spec.sample_rate}")
        padded = fit_length(y, spec.samples)
        if spec.snr_db is not None:
            rng = np.random.default_rng([spec.noise_seed, zlib.crc32(Path(path).name.encode())])
            padded = add_noise(y, padded, spec.snr_db, rng)
        waves[i] = padded
    mel = librosa.feature.melspectrogram(
        y=waves, sr=spec.sample_rate, n_fft=spec.n_fft, hop_length=spec.hop, n_mels=spec.n_mels,
        fmax=spec.sample_rate / 2,
    )  # (N, F, frames + 1)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    db -= db.max(axis=(1, 2), keepdims=True)
    db = np.maximum(db, -spec.top_db)
    return np.ascontiguousarray(db[:, :, : spec.frames].transpose(0, 2, 1), dtype=np.float32)


def content_key(paths: Sequence[Path], spec: MelSpec) -> str:
    """Hash of the settings and of every file's name and bytes (order as given)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"version": CACHE_VERSION, **dataclasses.asdict(spec)}, sort_keys=True).encode())
    for path in paths:
        h.update(Path(path).name.encode() + b"\0")
        h.update(Path(path).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def log_mels(paths: Sequence[Path], spec: MelSpec, *, namespace: str = "audio") -> np.ndarray:
    """Cached ``compute_log_mels``: ``<cache>/<namespace>/logmel-<content key>.npy``."""
    paths = [Path(p) for p in paths]
    folder = cache_dir() / namespace
    target = folder / f"logmel-{content_key(paths, spec)}.npy"
    if target.is_file():
        try:
            cached = np.load(target)
            if cached.shape == (len(paths), spec.frames, spec.n_mels):
                return cached
        except (OSError, ValueError):
            pass  # unreadable (e.g. truncated by a full disk): compute it again
    features = compute_log_mels(paths, spec)
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, features)
        os.replace(tmp, target)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:  # a read-only or full cache folder only costs the time to compute again
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return features
