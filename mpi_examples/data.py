"""Data for the training example: scikit-learn's digits (offline, the default) and the
CIFAR-10/100 python archives read from disk with a restricted unpickler.

Everything here is plain NumPy/torch on one process: no MPI.  ``shard`` decides which
training samples each rank sees (IID or one of the label-skewed splits), ``batches`` yields a rank's
minibatches for one epoch.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("digits", "cifar10", "cifar100")

# Where each archive's files live under --data-dir, as the CIFAR site ships them
# (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 python version").
CIFAR_LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key="labels", classes=10),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=["train"], test=["test"], label_key="fine_labels", classes=100),
}

# Per-channel statistics of the CIFAR training sets (the usual normalisation).
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


class DataError(ValueError):
    """The data cannot be loaded or split as asked (a user error: clear message)."""


@dataclass
class Dataset:
    """Train and test arrays: x float32 (N, C, H, W), y int64 (N,)."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------
def _digits_arrays():
    """(images float (1797, 8, 8) with values 0..16, labels int (1797,)).

    Read straight from the CSV that scikit-learn bundles (the file behind
    ``sklearn.datasets.load_digits``), which spares each rank the ~1 s import of
    scikit-learn; falls back to ``load_digits`` itself if the file is not where
    scikit-learn keeps it."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("--data digits needs scikit-learn (pip install scikit-learn, or "
                        "`make setup`)")
    for base in spec.submodule_search_locations or []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits as sk_load
    bunch = sk_load()
    return bunch.images, bunch.target.astype(np.int64)


def stratified_split(y, test_fraction, seed):
    """(train indices, test indices): per class, a seeded random ``test_fraction`` of
    its samples (rounded) goes to the test set."""
    rng = np.random.default_rng([seed, 31337])
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), split
    into train/test by a stratified split that does not depend on the training seed
    (every run is scored on the same 360 test images).  Pixels 0..16 are scaled to
    [0, 1] and standardised with the training set's mean and standard deviation."""
    images, y = _digits_arrays()
    x = images.astype(np.float32)[:, None, :, :] / 16.0
    tr, te = stratified_split(y, test_fraction, split_seed)
    x_tr, x_te = x[tr], x[te]
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    return Dataset("digits", np.ascontiguousarray(x_tr, np.float32), y[tr],
                   np.ascontiguousarray(x_te, np.float32), y[te], 10)


# ---------------------------------------------------------------------------------------
# CIFAR, with a restricted unpickler
# ---------------------------------------------------------------------------------------
class UnsafePickleError(pickle.UnpicklingError):
    """The file asks the unpickler for something a CIFAR archive never contains."""


class CifarUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR python archives contain: a dict of bytes keys, lists
    of ints and bytes, and uint8 NumPy arrays (rebuilt by ``numpy``'s own reconstructors).
    Any other global -- ``os.system``, ``builtins.eval``, ``subprocess.Popen``, ... -- is
    refused before it is looked up, so a tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # how Python 3 writes bytes under protocols 0-2 (a re-pickled archive): str ->
        # bytes through a codec; no code runs
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            found = super().find_class(module, name)
            return _empty_only(found) if name == "_reconstruct" else found
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: a CIFAR archive contains only dicts, lists, "
            "bytes, numbers and uint8 NumPy arrays (is the file tampered with?)")

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id: not part of a CIFAR archive")


def _empty_only(reconstruct):
    """numpy's ``_reconstruct`` as pickles use it: it makes an EMPTY array whose bytes the
    pickle then supplies (and numpy checks their size).  Called with any other shape it
    would allocate memory that no byte of the file backs (a 281-byte file could ask for
    gigabytes): refused."""
    def rebuild(subtype, shape, dtype):
        if int(np.prod(np.asarray(shape, dtype=np.int64))) != 0:
            raise UnsafePickleError(f"refusing an array of shape {tuple(shape)} with no data "
                                    "behind it (numpy pickles rebuild arrays from empty ones)")
        return reconstruct(subtype, shape, dtype)
    return rebuild


def safe_load_pickle(path) -> object:
    """Unpickle ``path`` with ``CifarUnpickler`` (Python-2 archives: bytes keys)."""
    data = Path(path).read_bytes()
    return CifarUnpickler(io.BytesIO(data), encoding="bytes").load()


MAX_IMAGES_PER_FILE = 60000   # CIFAR's python batches hold 10000 (train) or 50000 (CIFAR-100)


def _key(d, name):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DataError(f"missing key {name!r}")


def load_cifar_batch(path, label_key: str):
    """(x uint8 (N, 3, 32, 32), y int64 (N,)) from one archive file, with checks on
    what came out of the (restricted) unpickler."""
    try:
        d = safe_load_pickle(path)
    except UnsafePickleError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {exc})")
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    try:
        data, labels = _key(d, "data"), _key(d, label_key)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    if isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[0] > MAX_IMAGES_PER_FILE:
        raise DataError(f"{path}: {data.shape[0]} images in one batch file (CIFAR's hold "
                        f"10000; at most {MAX_IMAGES_PER_FILE} accepted)")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.shape != (data.shape[0],):
        raise DataError(f"{path}: labels must be {data.shape[0]} integers")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def cifar_missing_message(name: str, data_dir) -> str:
    lay = CIFAR_LAYOUT[name]
    return (f"{name}: the archive is not in {data_dir!s}. Download {lay['archive']} from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html (python version) and unpack it there, "
            f"so that {Path(str(data_dir)) / lay['folder']}/ holds "
            f"{', '.join(lay['train'][:2])}{', ...' if len(lay['train']) > 2 else ''} and "
            f"{lay['test'][0]}; then pass --data-dir {data_dir}")


def load_cifar(name: str, data_dir) -> Dataset:
    """CIFAR-10 or CIFAR-100 from ``data_dir`` (the folder that holds, or is,
    ``cifar-10-batches-py`` / ``cifar-100-python``); nothing is downloaded."""
    if name not in CIFAR_LAYOUT:
        raise DataError(f"unknown CIFAR variant {name!r}")
    if data_dir is None:
        raise DataError(f"--data {name} needs --data-dir DIR. " + cifar_missing_message(name, "DIR"))
    lay = CIFAR_LAYOUT[name]
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such directory. "
                        + cifar_missing_message(name, data_dir))
    folder = root / lay["folder"] if (root / lay["folder"]).is_dir() else root
    files = [folder / f for f in lay["train"] + lay["test"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"missing {', '.join(missing)} in {folder}. "
                        + cifar_missing_message(name, data_dir))
    parts = [load_cifar_batch(f, lay["label_key"]) for f in files]
    ntr = len(lay["train"])
    x_tr = np.concatenate([p[0] for p in parts[:ntr]])
    y_tr = np.concatenate([p[1] for p in parts[:ntr]])
    x_te = np.concatenate([p[0] for p in parts[ntr:]])
    y_te = np.concatenate([p[1] for p in parts[ntr:]])
    if y_tr.min() < 0 or max(y_tr.max(), y_te.max()) >= lay["classes"]:
        raise DataError(f"{folder}: labels outside 0..{lay['classes'] - 1}")
    mean = np.asarray(CIFAR_MEAN[name], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD[name], np.float32).reshape(1, 3, 1, 1)

    def norm(x):
        return np.ascontiguousarray(((x.astype(np.float32) / 255.0) - mean) / std)

    return Dataset(name, norm(x_tr), y_tr, norm(x_te), y_te, lay["classes"])


def load(name: str, data_dir=None) -> Dataset:
    if name == "digits":
        return load_digits()
    if name in CIFAR_LAYOUT:
        return load_cifar(name, data_dir)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def limit_train(ds: Dataset, n: int) -> Dataset:
    """The first ``n`` training samples only (the test set is unchanged)."""
    return Dataset(ds.name, ds.x_train[:n], ds.y_train[:n], ds.x_test, ds.y_test,
                   ds.num_classes)


# ---------------------------------------------------------------------------------------
# sharding and batching
# ---------------------------------------------------------------------------------------
SPLITS = ("iid", "sorted", "skew2", "dirichlet")


def shard(y: np.ndarray, rank: int, size: int, *, heterogeneous: bool = False,
          seed: int = 0, split: str | None = None, alpha: float = 0.1) -> np.ndarray:
    """Indices of the training samples rank ``rank`` of ``size`` trains on.

    Every rank gets the same number of samples (``len(y) // size``; ``2 * (len(y) //
    (2 size))`` for skew2; the remainder is left out), so all ranks make the same number
    of steps per epoch.  ``split`` (``heterogeneous=True`` is ``split="sorted"``):

    - "iid" (default): a random permutation (fixed by ``seed``) cut into equal parts.
    - "sorted": label-skewed, the samples sorted by label (ties in a seeded random order)
      and cut into contiguous equal parts, so each rank sees only about
      ``classes / size`` classes.
    - "skew2": each rank holds two label-sorted shards of ``len(y) // (2 size)`` samples
      (McMahan et al.'s "pathological non-IID" split): the sorted samples are cut into
      ``2 size`` shards and rank r gets shards ``p_r`` and ``p_r + size`` for a seeded
      permutation p, so its two shards are half the label range apart: two classes
      (a shard that straddles a class boundary adds a third or fourth, rarely).
    - "dirichlet": each rank draws its own class mixture ``pi ~ Dirichlet(alpha)``
      (Hsu et al. 2019: equal shares, skewed labels; alpha = 0.1 gives one or two
      dominant classes per rank) and takes its share from the classes in those
      proportions, without replacement; ranks draw in order, and where a class runs out
      the rank tops up from its next most likely classes, so late ranks are somewhat
      less skewed than their draw."""
    if split is None:
        split = "sorted" if heterogeneous else "iid"
    elif heterogeneous and split != "sorted":
        raise DataError(f"heterogeneous=True is split='sorted', not {split!r}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    n = len(y)
    if size > n:
        raise DataError(f"{size} ranks but only {n} training samples: launch at most {n} ranks")
    per = n // size
    if per == 0:
        raise DataError(f"{size} ranks leave no training sample per rank")
    rng = np.random.default_rng([seed, 7919])
    perm = rng.permutation(n)
    if split == "iid":
        return np.sort(perm[rank * per:(rank + 1) * per])
    by_label = perm[np.argsort(y[perm], kind="stable")]
    if split == "sorted":
        return np.sort(by_label[rank * per:(rank + 1) * per])
    if split == "skew2":
        length = n // (2 * size)
        if length == 0:
            raise DataError(f"skew2 needs at least {2 * size} training samples for {size} ranks")
        p = np.random.default_rng([seed, 7919, 2]).permutation(size)[rank]
        return np.sort(np.concatenate([by_label[k * length:(k + 1) * length]
                                       for k in (p, p + size)]))
    return np.sort(dirichlet_shares(y, size, alpha, seed)[rank])


def dirichlet_shares(y: np.ndarray, size: int, alpha: float, seed: int = 0) -> list:
    """Every rank's share of the "dirichlet" split (see ``shard``): the same on every
    rank, since it depends only on (y, size, alpha, seed)."""
    if not (alpha > 0 and np.isfinite(alpha)):
        raise DataError(f"the Dirichlet concentration alpha must be positive, got {alpha}")
    n = len(y)
    per = n // size
    rng = np.random.default_rng([seed, 7919, 3])
    classes = np.unique(y)
    pools = [list(np.flatnonzero(y == c)[rng.permutation(int((y == c).sum()))]) for c in classes]
    shares = []
    for _ in range(size):
        pi = rng.dirichlet(np.full(len(classes), float(alpha)))
        want = rng.multinomial(per, pi)
        take = [min(int(w), len(pool)) for w, pool in zip(want, pools)]
        missing = per - sum(take)
        for c in np.argsort(-pi, kind="stable"):  # top up from the next most likely classes
            if missing == 0:
                break
            extra = min(missing, len(pools[c]) - take[c])
            take[c] += extra
            missing -= extra
        mine = []
        for c, k in enumerate(take):
            mine += pools[c][:k]
            del pools[c][:k]
        shares.append(np.array(mine, dtype=np.int64))
    return shares


def label_histogram(y: np.ndarray, indices: np.ndarray, num_classes: int) -> list:
    """Samples per class in ``indices`` (for the metrics file: how skewed a share is)."""
    return np.bincount(y[indices], minlength=num_classes).astype(int).tolist()


def check_batch_size(batch_size: int, share: int, size: int):
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if batch_size > share:
        raise DataError(f"--batch-size {batch_size} is larger than a rank's share of the "
                        f"training data ({share} samples with {size} ranks): use "
                        f"--batch-size {share} or less, or fewer ranks")


def steps_per_epoch(share: int, batch_size: int) -> int:
    """Full batches only (the last, partial batch is dropped on every rank alike)."""
    return share // batch_size


def batches(indices: np.ndarray, batch_size: int, seed: int, epoch: int, rank: int):
    """This rank's minibatches (index arrays) for one epoch, reshuffled per epoch."""
    rng = np.random.default_rng([seed, epoch, rank, 104729])
    order = indices[rng.permutation(len(indices))]
    for k in range(steps_per_epoch(len(indices), batch_size)):
        yield order[k * batch_size:(k + 1) * batch_size]
