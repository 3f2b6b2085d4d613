"""Data loaders: Fashion-MNIST's IDX files (synthetic ones written here; the real ones where installed)."""
import gzip
import os

import numpy as np
import pytest
import torch

from stn_ext import data
from stn_ext.data import FASHION_FILES, fashion_mnist, fashion_mnist_folder, read_idx


def _write_idx(path, arr, compress=True):
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    body = head + arr.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(body)


def _fake_fashion(folder, n_train=30, n_test=7, compress=True):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    arrays = {"train_x": rng.randint(0, 256, (n_train, 28, 28)), "train_y": np.arange(n_train) % 10,
              "test_x": rng.randint(0, 256, (n_test, 28, 28)), "test_y": np.arange(n_test) % 10}
    for key, stem in FASHION_FILES.items():
        _write_idx(os.path.join(folder, stem + (".gz" if compress else "")), arrays[key], compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    path = str(tmp_path / ("a.idx" + (".gz" if compress else "")))
    _write_idx(path, a, compress)
    assert np.array_equal(read_idx(path), a)


def test_read_idx_refuses_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    path = str(tmp_path / "short")
    _write_idx(path, np.zeros((4, 5)), compress=False)
    with open(path, "rb+") as f:
        f.truncate(12)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_fashion_splits_from_an_explicit_folder(tmp_path):
    arrays = _fake_fashion(str(tmp_path), compress=False)
    d = fashion_mnist(path=str(tmp_path), val_size=10, train_size=15)
    assert (len(d.train), len(d.val), len(d.test)) == (15, 10, 7)
    assert d.train.x.shape[1:] == (1, 28, 28) and d.train.x.dtype == torch.float32
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) <= 1.0
    assert torch.equal(d.test.x[:, 0], torch.from_numpy(arrays["test_x"].astype(np.float32) / 255))
    # validation and training are disjoint parts of the official training set
    rows = lambda s: {tuple(r) for r in s.x.flatten(1).tolist()}  # noqa: E731
    assert not rows(d.train) & rows(d.val)
    assert d.n_classes == 10 and d.name == "fashion-mnist"


def test_fashion_found_through_env_and_torchvision_layout(tmp_path, monkeypatch):
    _fake_fashion(str(tmp_path / "env"))
    monkeypatch.setenv(data.FASHION_ENV, str(tmp_path / "env"))
    assert fashion_mnist_folder() == str(tmp_path / "env")
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    _fake_fashion(str(raw))
    assert fashion_mnist_folder(str(tmp_path / "tv")) == str(raw)


def test_fashion_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FASHION_ENV, str(tmp_path))
    monkeypatch.setattr(data, "FASHION_DEBIAN", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        fashion_mnist_folder()
    assert "Nothing is downloaded" in str(e.value)


@pytest.mark.skipif(not os.path.exists(os.path.join(data.FASHION_DEBIAN, "train-images-idx3-ubyte.gz")),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    d = fashion_mnist(train_size=1000)
    assert (len(d.train), len(d.val), len(d.test)) == (1000, 10000, 10000)
    assert sorted(torch.bincount(d.test.y).tolist()) == [1000] * 10  # the official test set is balanced


def test_trainer_runs_on_fashion_files(tmp_path):
    from stn_ext.tuning import TrainConfig, Trainer

    _fake_fashion(str(tmp_path), n_train=10040, n_test=20)
    cfg = TrainConfig(method="stn", model="cnn", data="fashion-mnist", data_path=str(tmp_path), hypers=("dropout", "cutout"),
                      train_size=40, batch_size=8, steps=4, warmup_steps=1, channels=(2, 4), quiet=True, eval_every=4)
    tr = Trainer(cfg)
    assert tr.data.input_shape == (1, 28, 28) and len(tr.data.train) == 40
    s = tr.fit()
    assert s["steps"] == 4 and np.isfinite(s["val_loss"])
