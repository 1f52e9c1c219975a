"""Datasets: MNIST (local copy, cache or verified download), embedded UCI digits, teachers.

Where MNIST is looked for, in order:

1. ``path=`` given to `load_mnist` (a file or a directory holding ``mnist.npz``);
2. the directory named by the environment variable ``FBALIGN_DATA``;
3. the cache directory: ``$FBALIGN_CACHE``, else ``$XDG_CACHE_HOME/fbalign``, else
   ``~/.cache/fbalign``;
4. a download of the standard ``mnist.npz`` into the cache (unless ``download=False`` or
   ``FBALIGN_OFFLINE=1``), verified by SHA-256 before it is renamed into place.

A file is accepted if its SHA-256 is the standard download's, or if each array's SHA-256 matches
the reference checksums (other faithful conversions of MNIST, such as ``../shared/data``).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
MNIST_SIZE = 11_490_434
MNIST_ARRAY_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
DATA_ENV = "FBALIGN_DATA"
CACHE_ENV = "FBALIGN_CACHE"
OFFLINE_ENV = "FBALIGN_OFFLINE"
MNIST_FILE = "mnist.npz"


class DataError(RuntimeError):
    """A dataset could not be found, downloaded or verified; the message says what to do."""


class Dataset(NamedTuple):
    """Arrays ready for training: float32 inputs ``(n, d)``, integer labels or float targets.

    ``x_val``/``y_val`` are empty (0 rows) when no validation split was asked for.
    ``num_classes`` is 0 for regression.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    @property
    def output_dim(self) -> int:
        return self.num_classes if self.num_classes else int(self.y_train.shape[-1])


# ----------------------------------------------------------------------------------------------
# Locating and verifying MNIST


def cache_dir() -> Path:
    """The user cache directory fbalign downloads into."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fbalign"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        # numpy reads a non-zip file as a pickle and then suggests allow_pickle: not for data
        reason = "not a zip archive" if "pickle" in str(err) else str(err)
        raise DataError(
            f"{path} is not a readable .npz file ({reason}); it is truncated or corrupt. Delete it "
            f"and fetch MNIST again (expected SHA-256 {MNIST_SHA256} for the standard download)."
        ) from err


def verify_mnist(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads ``path`` and checks it is MNIST: the standard file's SHA-256 or the array checksums.

    Raises:
      DataError: naming the file and the expected checksums when it does not verify.
    """
    path = Path(path)
    file_ok = path.stat().st_size == MNIST_SIZE and _sha256_file(path) == MNIST_SHA256
    arrays = _read_npz(path)
    missing = [k for k in MNIST_ARRAY_SHA256 if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks the MNIST arrays {missing}; found {sorted(arrays)}.")
    if not file_ok:
        bad = [
            k for k, want in MNIST_ARRAY_SHA256.items()
            if hashlib.sha256(np.ascontiguousarray(arrays[k]).tobytes()).hexdigest() != want
        ]
        if bad:
            raise DataError(
                f"{path} does not verify as MNIST: arrays {bad} have unexpected checksums "
                f"(expected file SHA-256 {MNIST_SHA256} or per-array SHA-256 "
                f"{ {k: MNIST_ARRAY_SHA256[k] for k in bad} }). Delete or replace the file."
            )
    return arrays


def download_verified(url: str, dest: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Downloads ``url`` to a temp file beside ``dest``, checks its SHA-256, renames it in place.

    A failed, cut-short or corrupt download never replaces an existing ``dest`` and leaves no
    temp file; concurrent downloads each write their own temp file and the atomic rename makes
    the last verified one win (readers see a whole verified file or none).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        got = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            expected_len = resp.headers.get("Content-Length")
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
                got += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_len is not None and expected_len.isdigit() and got != int(expected_len):
            raise DataError(
                f"download of {url} was cut short ({got} of {expected_len} bytes); {dest} was "
                f"left untouched (expected SHA-256 {sha256}). Try again."
            )
        if h.hexdigest() != sha256:
            raise DataError(
                f"download of {url} has SHA-256 {h.hexdigest()}, expected {sha256}; "
                f"{dest} was left untouched. Try again or place a verified copy there."
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def find_mnist(
    path: str | os.PathLike | None = None, download: bool = True, verify: bool = True
) -> Path:
    """Returns the path of ``mnist.npz`` (see the module docstring for the search order).

    With ``verify=True`` the file found is checked with `verify_mnist` (a download is always
    checked against the standard SHA-256 before it is renamed into the cache).
    """
    candidates: list[Path] = []
    if path is not None:
        p = Path(path).expanduser()
        candidates.append(p / MNIST_FILE if p.is_dir() else p)
        if not candidates[-1].exists():
            raise DataError(f"no MNIST file at {candidates[-1]}")
    elif os.environ.get(DATA_ENV):
        p = Path(os.environ[DATA_ENV]).expanduser() / MNIST_FILE
        if not p.exists():
            raise DataError(f"{DATA_ENV}={os.environ[DATA_ENV]} but {p} does not exist; put "
                            f"mnist.npz there or unset {DATA_ENV}.")
        candidates.append(p)
    cached = cache_dir() / MNIST_FILE
    if not candidates and cached.exists():
        candidates.append(cached)
    for c in candidates:
        if verify:
            verify_mnist(c)
        return c
    offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
    if not download or offline:
        raise DataError(
            f"MNIST not found. Put mnist.npz in {cache_dir()} or in a directory named by "
            f"{DATA_ENV}, or allow the download from {MNIST_URL}"
            + (f" (unset {OFFLINE_ENV})." if offline else ".")
        )
    try:
        download_verified(MNIST_URL, cached, MNIST_SHA256)
    except (OSError, http.client.HTTPException) as err:
        raise DataError(
            f"could not download MNIST from {MNIST_URL} ({err}). Offline? Put mnist.npz in "
            f"{cache_dir()} or in a directory named by {DATA_ENV}."
        ) from err
    return cached


# ----------------------------------------------------------------------------------------------
# Datasets


def _split_val(x, y, val_fraction: float, seed: int):
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(x) * val_fraction))
    if n_val == 0:
        return x, y, x[:0], y[:0]
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, va = perm[n_val:], perm[:n_val]
    return x[tr], y[tr], x[va], y[va]


def _normalise(x_tr, others, normalize: str):
    if normalize == "none":
        return x_tr, others
    if normalize == "unit":  # inputs already scaled to [0, 1]
        return x_tr, others
    if normalize == "standardize":  # one mean/std over all training inputs (safe for images)
        mean, std = x_tr.mean(), x_tr.std() + 1e-8
        return (x_tr - mean) / std, [(o - mean) / std for o in others]
    raise ValueError(f"unknown normalize {normalize!r}; valid: none, unit, standardize")


def _finish(name, x_tr, y_tr, x_te, y_te, num_classes, val_fraction, normalize, seed):
    x_tr, y_tr, x_va, y_va = _split_val(x_tr, y_tr, val_fraction, seed)
    x_tr, (x_va, x_te) = _normalise(x_tr, [x_va, x_te], normalize)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    lab = (lambda a: a.astype(np.int32)) if num_classes else f32
    return Dataset(name, f32(x_tr), lab(y_tr), f32(x_va), lab(y_va), f32(x_te), lab(y_te),
                   num_classes)


def load_mnist(
    path: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    normalize: str = "standardize",
    download: bool = True,
    seed: int = 0,
) -> Dataset:
    """MNIST (LeCun, Cortes & Burges 1998): 60k/10k images flattened to 784 floats in [0, 1].

    Args:
      path: a file or directory; default: ``$FBALIGN_DATA``, the cache, then the download.
      val_fraction: fraction of the training set held out for validation (seeded).
      normalize: ``"unit"`` ([0, 1]), ``"standardize"`` (zero mean, unit std, statistics of
        the training set over all pixels) or ``"none"``
        (raw 0..255).
      download: allow downloading into the cache when no copy is found.
      seed: seed of the validation split.
    """
    arrays = verify_mnist(find_mnist(path, download, verify=False))
    scale = 1.0 if normalize == "none" else 1.0 / 255.0
    x_tr = arrays["x_train"].reshape(len(arrays["x_train"]), -1).astype(np.float32) * scale
    x_te = arrays["x_test"].reshape(len(arrays["x_test"]), -1).astype(np.float32) * scale
    return _finish("mnist", x_tr, arrays["y_train"], x_te, arrays["y_test"], 10, val_fraction,
                   normalize, seed)


def load_digits(
    val_fraction: float = 0.0,
    normalize: str = "standardize",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """The UCI 8x8 handwritten digits (Alpaydin & Kaynak 1998; CC BY 4.0), shipped in the package.

    1,797 images flattened to 64 floats (``normalize`` as in `load_mnist`); a seeded
    stratification-free test split of
    ``test_fraction`` (default 20%), then an optional validation split of the rest.
    """
    ref = importlib.resources.files("fbalign") / "datasets" / "digits.npz"
    with importlib.resources.as_file(ref) as p, np.load(p, allow_pickle=False) as z:
        x, y = z["images"], z["labels"]
    x = x.reshape(len(x), -1).astype(np.float32) / (1.0 if normalize == "none" else 16.0)
    perm = np.random.default_rng(1234).permutation(len(x))  # fixed test split for all seeds
    n_test = int(round(len(x) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return _finish("digits", x[tr], y[tr], x[te], y[te], 10, val_fraction, normalize, seed)


def load_teacher(
    seed: int = 0,
    n_train: int = 2048,
    n_test: int = 512,
    input_dim: int = 20,
    hidden: int = 32,
    output_dim: int = 10,
    task: str = "classification",
    noise: float = 0.0,
    val_fraction: float = 0.0,
) -> Dataset:
    """A random one-hidden-layer tanh teacher network labels Gaussian inputs (offline, seeded).

    ``task="classification"`` takes the argmax of the teacher's outputs as the label;
    ``"regression"`` returns the outputs (plus Gaussian ``noise``) as targets.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"unknown teacher task {task!r}; valid: classification, regression")
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(input_dim, hidden)) / np.sqrt(input_dim)
    w2 = rng.normal(size=(hidden, output_dim)) / np.sqrt(hidden)
    x = rng.normal(size=(n_train + n_test, input_dim)).astype(np.float32)
    y = np.tanh(x @ w1) @ w2
    if task == "classification":
        t = np.argmax(y, axis=1)
        k = output_dim
    else:
        t = y + noise * rng.normal(size=y.shape)
        k = 0
    return _finish(f"teacher-{task}", x[:n_train], t[:n_train], x[n_train:], t[n_train:], k,
                   val_fraction, "none", seed)


def linear_task(
    seed: int = 0, n_train: int = 10000, n_test: int = 1000, input_dim: int = 30,
    output_dim: int = 10,
) -> Dataset:
    """Lillicrap et al. (2016) linear task: ``y = T x``, ``T ~ U[-1, 1]``, ``x ~ N(0, I)``."""
    rng = np.random.default_rng(seed)
    t_mat = rng.uniform(-1, 1, size=(input_dim, output_dim))
    x = rng.normal(size=(n_train + n_test, input_dim))
    y = x @ t_mat
    return _finish("linear", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 0, 0.0, "none",
                   seed)


DATASETS = ("digits", "mnist", "teacher", "linear")


def load_dataset(name: str, *, val_fraction: float = 0.0, seed: int = 0, **kwargs) -> Dataset:
    """Loads a dataset by name: ``digits`` (embedded), ``mnist``, ``teacher``, ``linear``."""
    if name == "digits":
        return load_digits(val_fraction=val_fraction, seed=seed, **kwargs)
    if name == "mnist":
        return load_mnist(val_fraction=val_fraction, seed=seed, **kwargs)
    if name == "teacher":
        return load_teacher(seed=seed, val_fraction=val_fraction, **kwargs)
    if name == "linear":
        if val_fraction:
            raise ValueError(f"the linear task has no validation split (val_fraction="
                             f"{val_fraction}); it draws its own train and test sets: drop "
                             "val_fraction (--val-fraction)")
        return linear_task(seed=seed, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
