"""AV-MNIST: pairing, the FSDD split, the log-mel cache, the hard variant, unimodal models, a real run, and the
one-line message for missing data."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile

import fuselab.data.audio as audio
from fuselab.data.avmnist import FSDD_NAME, MEL, avmnist, load_mnist, make_pairs
from fuselab.models.mbt import mbt
from fuselab.models.mlp import mlp_streams
from fuselab.models.multistream import SingleStream
from fuselab.train.config import make_config
from fuselab.train.run import execute

if os.environ.get("CI") == "true":
    import librosa  # noqa: F401  (CI installs the dev extra, which has it: a missing librosa must fail there)
else:
    pytest.importorskip("librosa")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for the module (the spectrograms of all 3,000 recordings are computed once)."""
    return tmp_path_factory.mktemp("fuselab-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("FUSELAB_CACHE", str(cache))


def _index(name: str) -> int:
    return int(FSDD_NAME.match(name).group(3))


def test_pairing_keeps_labels_consistent(data_root):
    sizes = dict(train_size=400, val_size=100, test_size=300)
    pairs = make_pairs(data_root, 3, **sizes)
    mnist = load_mnist(data_root)
    bundle = avmnist(seed=3, data_root=str(data_root), **sizes)
    features = audio.log_mels(pairs.recordings, MEL, namespace="fsdd")
    images_of = lambda split: mnist["test" if split == "test" else "train"][0][pairs.image[split]] / 255.0  # noqa: E731
    pix_mean, pix_std = images_of("train").mean(), images_of("train").std()
    mel_mean, mel_std = features[pairs.recording["train"]].mean(), features[pairs.recording["train"]].std()
    for split in ("train", "val", "test"):
        labels = pairs.label[split]
        mnist_labels = mnist["test" if split == "test" else "train"][1]
        assert np.array_equal(mnist_labels[pairs.image[split]], labels)  # the image shows the label's digit
        assert np.array_equal(pairs.recording_digit[pairs.recording[split]], labels)  # so does the recording
        part = getattr(bundle, split)
        assert torch.equal(part.y, torch.from_numpy(labels))
        assert len(np.unique(labels)) == 10
        # the bundle's rows are exactly those images and recordings, standardised with the training split's statistics
        pixels = (images_of(split) - pix_mean) / pix_std
        assert np.allclose(part.x["image"][:, 0].numpy(), pixels, atol=1e-4)
        mel = (features[pairs.recording[split]] - mel_mean) / mel_std
        assert np.allclose(part.x["audio"].numpy(), mel, atol=1e-4)
    assert bundle.dims == {"audio": (64, 32), "image": (1, 28, 28)}
    again = avmnist(seed=3, data_root=str(data_root), **sizes)
    assert torch.equal(again.train.x["audio"], bundle.train.x["audio"])  # the seed fixes the pairs
    other = make_pairs(data_root, 4, **sizes)
    assert not np.array_equal(other.recording["train"], pairs.recording["train"])


def test_no_test_recording_appears_in_train(data_root):
    for seed in (0, 1):
        pairs = make_pairs(data_root, seed, train_size=20000, val_size=5000, test_size=None)
        names = {p: {pairs.recordings[i].name for i in pairs.recording[p]} for p in ("train", "val", "test")}
        assert not names["test"] & (names["train"] | names["val"])
        assert not names["val"] & names["train"]
        assert {_index(n) for n in names["test"]} == set(range(0, 5))  # FSDD's official test recordings
        assert {_index(n) for n in names["val"]} == set(range(5, 10))
        assert {_index(n) for n in names["train"]} == set(range(10, 50))
        assert len(pairs.label["test"]) == 10000  # all MNIST test images
        assert not set(pairs.image["train"]) & set(pairs.image["val"])


def _copy_subset(data_root: Path, dest: Path, speaker: str = "theo") -> Path:
    (dest / "fsdd" / "recordings").mkdir(parents=True)
    (dest / "mnist").symlink_to(data_root / "mnist")
    for wav in sorted((data_root / "fsdd" / "recordings").glob(f"*_{speaker}_*.wav")):
        shutil.copy2(wav, dest / "fsdd" / "recordings" / wav.name)
    return dest


def test_feature_cache_is_reused_and_invalidated_when_a_recording_changes(data_root, tmp_path, monkeypatch):
    root = _copy_subset(data_root, tmp_path / "data")
    monkeypatch.setenv("FUSELAB_CACHE", str(tmp_path / "cache"))
    calls = []
    compute = audio.compute_log_mels
    monkeypatch.setattr(audio, "compute_log_mels", lambda paths, spec: calls.append(len(paths)) or compute(paths, spec))
    paths = sorted((root / "fsdd" / "recordings").glob("*.wav"))
    audio.log_mels(paths[:5], MEL)  # librosa's first call costs seconds: keep it out of the timing

    start = time.perf_counter()
    first = audio.log_mels(paths, MEL, namespace="fsdd")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = audio.log_mels(paths, MEL, namespace="fsdd")
    warm = time.perf_counter() - start
    assert calls == [5, len(paths)]  # the second load computed nothing
    assert np.array_equal(first, second)
    assert warm < cold / 3, (cold, warm)
    assert len(list((tmp_path / "cache" / "fsdd").glob("logmel-*.npy"))) == 1

    changed = paths[7]
    rate, y = wavfile.read(changed)
    wavfile.write(changed, rate, np.roll(y, len(y) // 3))  # same size, same name, other content
    third = audio.log_mels(paths, MEL, namespace="fsdd")
    assert calls == [5, len(paths), len(paths)]
    assert not np.array_equal(third[7], first[7])
    assert np.array_equal(np.delete(third, 7, 0), np.delete(first, 7, 0))
    assert len(list((tmp_path / "cache" / "fsdd").glob("logmel-*.npy"))) == 2
    # a changed setting is another cache entry too
    noisy = audio.log_mels(paths, dataclasses.replace(MEL, snr_db=0.0), namespace="fsdd")
    assert not np.array_equal(noisy, third) and calls[-1] == len(paths)
    # and the dataset reads the copy (one speaker still has every digit and every split)
    bundle = avmnist(data_root=str(root), train_size=200, val_size=50, test_size=100)
    assert len(bundle.train) == 200


def test_hard_variant_removes_most_pca_energy_and_adds_noise(data_root):
    sizes = dict(train_size=300, val_size=50, test_size=100, data_root=str(data_root))
    clean = avmnist(variant="clean", **sizes)
    hard = avmnist(variant="hard", **sizes)
    assert torch.equal(clean.train.y, hard.train.y)  # same pairs, degraded
    x = hard.train.x["image"].flatten(1).double()
    s = torch.linalg.svdvals(x - x.mean(0))
    assert (s[4:] < 1e-3 * s[0]).all() and s[3] > 1e-2 * s[0]  # 4 principal components left
    c = clean.train.x["image"].flatten(1).double()
    assert torch.linalg.svdvals(c - c.mean(0))[20] > 1e-2 * s[0]
    # the noise fills the silence around each word: the quietest tenth of the spectrogram rises towards the loudest
    quiet = lambda a: (a.flatten(1).quantile(0.1, dim=1) - a.flatten(1).amax(1)).mean()  # noqa: E731
    recordings = make_pairs(data_root, 0, train_size=300, val_size=50, test_size=100).recordings
    default_snr = inspect.signature(avmnist).parameters["audio_snr_db"].default
    raw_clean = audio.log_mels(recordings, MEL, namespace="fsdd")
    raw_hard = audio.log_mels(recordings, dataclasses.replace(MEL, snr_db=default_snr), namespace="fsdd")
    assert quiet(torch.from_numpy(raw_hard)) > quiet(torch.from_numpy(raw_clean)) + 20  # dB


def test_one_modality_is_a_unimodal_model_without_fusion():
    torch.manual_seed(0)
    common = dict(num_classes=10, fusion={"name": "late"}, width=16, heads=2, layers=2, fusion_layer=1,
                  tokenizer="auto", patch_size={"image": 14, "audio": 16}, patch_stride={"audio": 16})
    uni = mbt(dims={"image": (1, 28, 28)}, **common)
    assert uni.exchange is None and isinstance(uni.merge, SingleStream)
    out = uni({"image": torch.randn(3, 1, 28, 28)})
    assert out.logits.shape == (3, 10)
    both = mbt(dims={"image": (1, 28, 28), "audio": (64, 32)}, **common)
    assert both.exchange is not None and not isinstance(both.merge, SingleStream)
    assert both({"image": torch.randn(3, 1, 28, 28), "audio": torch.randn(3, 64, 32)}).logits.shape == (3, 10)
    vec = mlp_streams(dims={"fou": 76}, num_classes=10, fusion={"name": "late"}, hidden=8)
    assert isinstance(vec.merge, SingleStream) and vec({"fou": torch.randn(2, 76)}).logits.shape == (2, 10)


def test_small_real_run_fusion_beats_each_unimodal_run_of_the_same_budget(data_root):
    base = {
        "data": {"name": "avmnist", "variant": "hard", "train_size": 800, "val_size": 200, "test_size": 1000,
                 "data_root": str(data_root)},
        "model": {"name": "mbt", "width": 32, "heads": 2, "layers": 1, "fusion_layer": 1, "tokenizer": "auto",
                  "patch_size": {"image": 14, "audio": 16}, "patch_stride": {"audio": 16}},
        "fusion": {"name": "concat"},
        "train": {"epochs": 6, "batch_size": 32, "lr": 3.0e-3, "threads": 1, "checkpoint": False},
    }
    acc = {}
    runs = {"fusion": [], "image": ["data.modalities=[image]"], "audio": ["data.modalities=[audio]"]}
    for name, overrides in runs.items():
        acc[name] = execute(make_config(base, overrides)).metrics["test_accuracy"]
    assert acc["fusion"] > max(acc["image"], acc["audio"]) + 0.03, acc


def test_missing_data_root_is_one_line_that_says_what_to_download(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("FUSELAB_DATA", raising=False)
    for kwargs in ({}, {"data_root": str(tmp_path / "nowhere")}):
        with pytest.raises(FileNotFoundError) as err:
            avmnist(**kwargs)
        message = str(err.value)
        assert "\n" not in message
        assert "train-images-idx3-ubyte.gz" in message and "free-spoken-digit-dataset" in message
        assert "/mnist" in message and "/fsdd/recordings" in message and "FUSELAB_DATA" in message
    from fuselab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "data.name=avmnist", f"data.data_root={tmp_path / 'nowhere'}", "--out", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"avmnist data not found under .*nowhere", err)
