"""Data for the trainer: scikit-learn's digits (8x8 images, shipped with the package) by default,
Fashion-MNIST from its original IDX files (``fashion_mnist``; never downloaded here), or a user's tensors /
NumPy arrays through ``Dataset.from_arrays``."""
import gzip
import os
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return self.x.shape[0]


@dataclass
class Dataset:
    """train/val/test splits; ``task`` is 'classification' (y int64 class labels) or 'regression'
    (y float, (N,) or (N, k))."""

    train: Split
    val: Split
    test: Split
    task: str = "classification"
    n_classes: int = 0
    name: str = "custom"
    test_is_val: bool = False  # from_arrays without a test split: test metrics are validation metrics

    @property
    def input_shape(self):
        return tuple(self.train.x.shape[1:])

    @property
    def is_image(self):
        return len(self.input_shape) == 3

    def to(self, device, dtype=None):
        """The splits on ``device``; with ``dtype``, floating-point inputs and targets cast to it
        (class labels stay int64)."""
        def cast(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        mv = lambda s: Split(cast(s.x), cast(s.y))  # noqa: E731
        return replace(self, train=mv(self.train), val=mv(self.val), test=mv(self.test))

    @classmethod
    def from_arrays(cls, x_train, y_train, x_val, y_val, x_test=None, y_test=None, task="classification",
                    name="custom"):
        """Splits from tensors or NumPy arrays. x: (N, F) features or (N, C, H, W) images (float);
        y: (N,) integer labels for classification, (N,) or (N, k) floats for regression. Without a
        test split the validation split is reused as test (``test_is_val``; the trainer's summary then
        holds ``"test_is_val": true``)."""
        if task not in ("classification", "regression"):
            raise ValueError(f"stn_ext: task must be 'classification' or 'regression', got {task!r}")
        if (x_test is None) != (y_test is None):
            raise ValueError("stn_ext: give both x_test and y_test, or neither")
        test_is_val = x_test is None
        if test_is_val:
            x_test, y_test = x_val, y_val
        splits = []
        for which, x, y in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test)):
            x, y = _tensor(x, f"x_{which}"), _tensor(y, f"y_{which}")
            if x.dim() not in (2, 4):
                raise ValueError(f"stn_ext: x_{which} must be (N, features) or (N, C, H, W), got shape {tuple(x.shape)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"stn_ext: x_{which} holds {x.shape[0]} examples (shape[0]) but y_{which} holds {y.shape[0]}")
            if x.shape[0] == 0:
                raise ValueError(f"stn_ext: the {which} split is empty")
            if not x.is_floating_point():
                x = x.float()
            if task == "classification":
                if y.dim() != 1:
                    raise ValueError(f"stn_ext: y_{which} must be (N,) class labels, got shape {tuple(y.shape)}")
                if y.is_floating_point() and not torch.equal(y, y.round()):
                    raise ValueError(f"stn_ext: y_{which} holds non-integer labels; for real targets use task='regression'")
                y = y.long()
                if y.numel() and y.min() < 0:
                    raise ValueError(f"stn_ext: y_{which} holds negative class labels")
            else:
                if y.dim() not in (1, 2):
                    raise ValueError(f"stn_ext: y_{which} must be (N,) or (N, k) targets, got shape {tuple(y.shape)}")
                y = y.float() if not y.is_floating_point() else y
            splits.append(Split(x.contiguous(), y.contiguous()))
        shapes = {tuple(s.x.shape[1:]) for s in splits}
        if len(shapes) != 1:
            raise ValueError(f"stn_ext: train/val/test inputs have different shapes per example: {sorted(shapes)}")
        tshapes = {tuple(s.y.shape[1:]) for s in splits}
        if len(tshapes) != 1:
            raise ValueError(f"stn_ext: train/val/test targets have different shapes per example: {sorted(tshapes)}")
        n_classes = int(max(int(s.y.max()) for s in splits) + 1) if task == "classification" else 0
        return cls(*splits, task=task, n_classes=n_classes, name=name, test_is_val=test_is_val)


def _tensor(a, name):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    raise TypeError(f"stn_ext: {name} must be a torch.Tensor or numpy.ndarray, got {type(a).__name__}")


def digits_arrays(flat=False, dtype=torch.float32):
    """scikit-learn's digits, all 1797: x (N, 1, 8, 8), or (N, 64) with ``flat``, in [0, 1] (exact: k / 16), and
    y (N,) int64. The one loader of the data; each user splits it its own way (``digits``, the benchmark's
    ``stn_ext.tuning.problems.digits_protocol``, the reversible CLI's problem)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=dtype) / 16.0
    return (x.reshape(len(x), -1) if flat else x[:, None]), torch.tensor(d.target, dtype=torch.int64)


def digits(seed=0, val_fraction=0.2, test_fraction=0.2, train_size=None):
    """scikit-learn's digits (1797 8x8 grey images, 10 classes) as (N, 1, 8, 8) in [0, 1], split
    train/val/test at random (stratified-free, fixed by ``seed``). ``train_size`` caps the training
    split (a smaller one overfits more, which makes regularisation matter)."""
    x, y = digits_arrays()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    n = x.shape[0]
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    if train_size is not None:
        tr = tr[:train_size]
    return Dataset(Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), "classification", 10, "digits")


# --- Fashion-MNIST ---------------------------------------------------------------------------------------

FASHION_ENV = "STN_EXT_FASHION_MNIST"
FASHION_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian's package dataset-fashion-mnist
FASHION_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                 "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """An IDX file (LeCun's MNIST format; gzipped when it ends in .gz) as a NumPy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"stn_ext: {path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"stn_ext: {path} is truncated: its header says {dims}, it holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _fashion_file(folder, stem):
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def fashion_mnist_folder(path=None):
    """The folder holding Fashion-MNIST's four IDX files: ``path``, else $STN_EXT_FASHION_MNIST, else Debian's
    /usr/share/datasets/fashion-mnist, else torchvision's layout (<root>/FashionMNIST/raw) under ./data or
    ~/data. A folder counts when it holds all four files (.gz or not)."""
    if path:
        candidates = [path, os.path.join(path, "FashionMNIST", "raw")]
    else:
        candidates = [os.environ[FASHION_ENV]] if os.environ.get(FASHION_ENV) else []
        candidates += [FASHION_DEBIAN] + [os.path.join(root, "FashionMNIST", "raw")
                                          for root in ("data", os.path.expanduser("~/data"))]
    for folder in candidates:
        if all(_fashion_file(folder, stem) for stem in FASHION_FILES.values()):
            return folder
    where = f"in {path}" if path else f"(looked in ${FASHION_ENV}, {FASHION_DEBIAN}, data/ and ~/data/)"
    raise FileNotFoundError(
        f"stn_ext: Fashion-MNIST's IDX files ({', '.join(s + '.gz' for s in FASHION_FILES.values())}) not found "
        f"{where}. Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
        "scripts/setup_env.sh does this where it runs as root), or download them from "
        "https://github.com/zalandoresearch/fashion-mnist and pass the folder (--data-path, API: path=, or "
        f"${FASHION_ENV}). Nothing is downloaded here.")


def fashion_mnist(path=None, seed=0, train_size=None, val_size=10000):
    """Fashion-MNIST (Xiao et al. 2017; 60k training and 10k test 28x28 grey images, 10 classes) as
    (N, 1, 28, 28) in [0, 1]. The validation split is ``val_size`` images of the official training set, drawn by
    ``seed``; the training split is the rest, capped at ``train_size``; the test split is the official one."""
    folder = fashion_mnist_folder(path)
    arr = {k: read_idx(_fashion_file(folder, stem)) for k, stem in FASHION_FILES.items()}
    for which in ("train", "test"):
        if arr[which + "_x"].shape[0] != arr[which + "_y"].shape[0] or arr[which + "_x"].shape[1:] != (28, 28):
            raise ValueError(f"stn_ext: Fashion-MNIST's {which} files in {folder} do not match: images "
                             f"{arr[which + '_x'].shape}, labels {arr[which + '_y'].shape}")
    images = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)[:, None]  # noqa: E731
    labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    x, y = images(arr["train_x"]), labels(arr["train_y"])
    if not 0 < val_size < x.shape[0]:
        raise ValueError(f"stn_ext: val_size must be in (0, {x.shape[0]}), got {val_size}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2000 + seed))
    va, tr = perm[:val_size], perm[val_size:]
    if train_size is not None:
        tr = tr[:train_size]
    test = Split(images(arr["test_x"]), labels(arr["test_y"]))
    return Dataset(Split(x[tr], y[tr]), Split(x[va], y[va]), test, "classification", 10, "fashion-mnist")


BUILTIN = ("digits", "fashion-mnist")


def load(name, seed=0, path=None, **kw):
    """A built-in data set by name (BUILTIN); ``path``: where Fashion-MNIST's files are."""
    if name == "digits":
        return digits(seed=seed, **kw)
    if name == "fashion-mnist":
        return fashion_mnist(path=path, seed=seed, **kw)
    raise ValueError(f"stn_ext: unknown data set {name!r}; built in: {', '.join(BUILTIN)} (pass your own arrays "
                     "through stn_ext.data.Dataset.from_arrays)")
