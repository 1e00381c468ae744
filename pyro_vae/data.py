"""Datasets: scikit-learn's bundled 8x8 digits (no download), the torchvision MNIST family and CIFAR-10,
and user tensors, numpy arrays or DataLoaders.

Every dataset comes back as float tensors in [0, 1] of shape (N, C, H, W) with integer labels, split into
train / validation / test. Nothing is downloaded unless asked: offline, the files must already be in
``data_dir`` (for MNIST: ``data_dir/MNIST/raw/*-ubyte.gz``), and a missing file is a clear error saying
where to put it. Compressed files are checked against their official MD5 sums on every load and extracted
into ``$PYRO_VAE_CACHE/data`` (default ``~/.cache/pyro-vae/data``) under a key of their content; a corrupt
file is an error naming it.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Dataset", "DataError", "load_dataset", "check_data", "check_labels", "binarize", "is_binary",
           "needs_binarization", "prepare_eval_data", "as_batch", "from_arrays", "DATASETS", "default_data_dir",
           "balanced_labels"]

#: the test (and validation) sets of Bernoulli runs are binarized once with this seed
TEST_BINARIZATION_SEED = 20150101


class DataError(ValueError):
    """Bad or missing data; the message names the problem."""


@dataclass
class Dataset:
    """Train / validation / test tensors of one dataset (x in [0, 1], shape (N, *input_shape))."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    y_val: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    num_classes: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def default_data_dir() -> Path:
    """``$PYRO_VAE_DATA`` if set, else ``~/.cache/pyro-vae/data``."""
    return Path(os.environ.get("PYRO_VAE_DATA") or Path.home() / ".cache" / "pyro-vae" / "data")


def _cache_dir() -> Path:
    return Path(os.environ.get("PYRO_VAE_CACHE") or Path.home() / ".cache" / "pyro-vae")


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask (``tempfile.mkstemp`` uses 0o600)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, fsync, then rename: a
    reader sees the old file or the new one, never half of one; the file gets the user's umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0o600; a run's files get the user's umask like open()'s
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write(Path(path), lambda f: f.write(data))


# --------------------------------------------------------------------------- validation
def as_batch(x, input_shape) -> torch.Tensor:
    """Return ``x`` as a floating tensor of shape (N, *input_shape); flat (N, prod(input_shape)) is reshaped.

    Raises ValueError naming the expected and the received shape otherwise.
    """
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.float()
    shape = tuple(input_shape)
    if x.dim() >= 1 and tuple(x.shape[1:]) == shape:
        return x
    if x.dim() == 2 and x.shape[1] == math.prod(shape):
        return x.reshape(-1, *shape)
    raise ValueError(
        f"expected data of shape (batch, {', '.join(map(str, shape))}) or (batch, {math.prod(shape)}), "
        f"got {tuple(x.shape)}"
    )


def check_data(x, input_shape=None, name: str = "data") -> torch.Tensor:
    """Validate a data tensor: non-empty, floating, finite, and of the expected per-point shape.

    Returns ``x`` as a floating tensor (integers become float32; float64 stays float64); raises
    :class:`DataError` naming the problem.
    """
    if isinstance(x, np.ndarray):
        if x.dtype == object or not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{name} must be numeric, got a numpy array of dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name} must be a torch tensor, a numpy array or a DataLoader, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise DataError(f"{name} must be real-valued, got dtype {x.dtype}")
    if not torch.is_floating_point(x):
        x = x.float()
    if x.dim() < 2:
        raise DataError(f"{name} must have a batch dimension and at least one feature dimension, got shape "
                        f"{tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"{name} is empty (0 data points)")
    if input_shape is not None:
        try:
            x = as_batch(x, input_shape)
        except ValueError as e:
            raise DataError(f"{name}: {e}") from None
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0])
        raise DataError(f"{name} contains NaN or infinite values (first in data point {idx})")
    return x


def check_labels(y, n: int, num_classes: int | None = None, name: str = "labels") -> torch.Tensor:
    """Integer labels, one per data point, in range [0, num_classes)."""
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if y.dim() != 1 or y.shape[0] != n:
        raise DataError(f"{name} must be a vector of {n} integers, got shape {tuple(y.shape)}")
    if torch.is_floating_point(y) and not bool((y == y.round()).all()):
        raise DataError(f"{name} must be integers")
    y = y.long()
    if n and int(y.min()) < 0:
        raise DataError(f"{name} must be non-negative, got {int(y.min())}")
    if num_classes is not None and n and int(y.max()) >= num_classes:
        raise DataError(f"{name} out of range: {int(y.max())} >= num_classes={num_classes}")
    return y


def balanced_labels(y, n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` points balanced per class: n // C of every class and one more of the first n % C
    classes, each class's points drawn without replacement by a generator seeded with ``seed`` (the same
    labels for the same data, seed and n). Sorted. The semi-supervised runs' ``--labels N``."""
    y = check_labels(y, len(y), num_classes)
    if isinstance(n, bool) or not isinstance(n, int) or not num_classes <= n <= len(y):
        raise DataError(f"--labels must be an integer from {num_classes} (one per class) to {len(y)} (the training "
                        f"points), got {n!r}")
    generator = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(y == c)[:, 0]
        want = n // num_classes + (1 if c < n % num_classes else 0)
        if want > len(members):
            raise DataError(f"--labels {n} needs {want} points of class {c}, but the training set has "
                            f"{len(members)}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:want]])
    return torch.cat(chosen).sort().values


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Bernoulli draw per pixel with probability x: dynamic binarization (Salakhutdinov & Murray, 2008)."""
    return torch.bernoulli(x, generator=generator)


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


BINARIZE_MODES = ("auto", "dynamic", "none")


def needs_binarization(likelihood, x: torch.Tensor, mode: str = "auto") -> bool:
    """Whether ``x`` is binarized for ``likelihood``: ``"dynamic"`` always for a binary likelihood,
    ``"auto"`` when the data are not already binary, ``"none"`` never. Data to binarize must lie in [0, 1]
    (:class:`DataError` otherwise)."""
    if mode not in BINARIZE_MODES:
        raise ValueError(f"unknown binarize mode {mode!r}; choose {', '.join(BINARIZE_MODES)}")
    if likelihood is None:  # a model of the user's own: binarization is the data option alone
        return mode == "dynamic" and _check_unit_interval(x, "binarize mode 'dynamic'")
    if mode == "dynamic" and not likelihood.binary:  # would do nothing: refused rather than ignored
        raise DataError(f"binarize mode 'dynamic' (--binarize dynamic) applies to binary likelihoods (bernoulli), "
                        f"not {getattr(likelihood, 'name', type(likelihood).__name__)}")
    if mode == "none" or not likelihood.binary:
        return False
    if mode == "auto" and is_binary(x):
        return False
    return _check_unit_interval(x, f"the {getattr(likelihood, 'name', 'binary')} likelihood")


def _check_unit_interval(x: torch.Tensor, who: str) -> bool:
    """True, or :class:`DataError` when ``x`` (to be binarized, each value a probability) leaves [0, 1]."""
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
    if lo < 0 or hi > 1:  # torch.bernoulli would fail on them with a raw error
        raise DataError(f"{who} binarizes grayscale data, each value the probability of a 1, so it needs values "
                        f"in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]: scale them to [0, 1] or choose another "
                        "likelihood")
    return True


def prepare_eval_data(vae, x: torch.Tensor, binarize_mode: str = "auto") -> torch.Tensor:
    """Validation / test data as ``vae.likelihood`` sees it: a binary likelihood's data are binarized once, with
    a fixed seed, so every run and every evaluation uses the same binary test set. Checked for its support."""
    likelihood = getattr(vae, "likelihood", None)
    if needs_binarization(likelihood, x, binarize_mode):
        x = binarize(x, torch.Generator(device=x.device).manual_seed(TEST_BINARIZATION_SEED))
    if likelihood is not None:
        likelihood.check_data(x)
    return x


# --------------------------------------------------------------------------- splits
def _split(x, y, fraction: float, seed: int):
    """Split off a random ``fraction`` (at least one point) for validation."""
    n = x.shape[0]
    if not 0 <= fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = max(1, int(round(n * fraction))) if fraction > 0 else 0
    if n - n_val < 1:
        raise DataError(f"a dataset of {n} point(s) is too small to split off a validation set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n_val:], perm[:n_val]
    pick = (lambda t, i: None if t is None else t[i])
    return x[tr], pick(y, tr), x[va], pick(y, va)


# --------------------------------------------------------------------------- datasets
@functools.lru_cache(maxsize=1)
def _digits_arrays():
    """scikit-learn's 8x8 digits as (images in [0, 1], labels), read from disk once per process."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


def _digits(data_dir, val_fraction, seed, download):
    x, y = _digits_arrays()
    # a fixed test split (20%), independent of the run's seed, so test numbers compare across runs
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = x.shape[0] // 5
    te, tr = perm[:n_test], perm[n_test:]
    xtr, ytr, xva, yva = _split(x[tr], y[tr], val_fraction, seed)
    return Dataset("digits", xtr, ytr, xva, yva, x[te], y[te], num_classes=10)


_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _corrupt(path: Path, got: str, expected: str) -> DataError:
    return DataError(f"{path} is corrupt or not the official file (MD5 {got}, expected {expected}): replace it "
                     "with the official file (--download fetches it again where there is internet)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _idx_problem(path: Path) -> str | None:
    """Why the IDX file at ``path`` cannot be read (missing, bad header, wrong length), or None if it looks whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\0\0\x08" or not 1 <= head[3] <= 4:
                return "not an IDX file of unsigned bytes (bad header)"
            dims = f.read(4 * head[3])
    except OSError as e:
        return e.strerror or str(e)
    if len(dims) < 4 * head[3]:
        return "truncated header"
    shape = [int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4)]
    expected = 4 + len(dims) + math.prod(shape)
    if size != expected:
        return f"{'x'.join(map(str, shape))} values need {expected} bytes, the file has {size}"
    return None


def _atomic_extract(write, target: Path) -> None:
    """Write ``target`` (its folder created) atomically: never a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, write)


def _prepare_mnist_root(root: Path, cls, download: bool) -> tuple[Path, bool]:
    """Find the IDX files for a torchvision MNIST-family class; return (root to use, download flag).

    Extracted files in ``root/<Class>/raw`` are read in place. ``.gz`` files are checked against the official
    MD5 sums (torchvision's ``cls.resources``) on every load, then extracted once into the cache
    ``$PYRO_VAE_CACHE/data/<Class>-<md5>/``, keyed by the files' content, so the user's folder (possibly
    read-only or shared) is never written to and a changed source is never hidden by an old extraction. A
    missing or corrupt file is a :class:`DataError` naming it; only ``download=True`` lets torchvision fetch.
    """
    folder = cls.__name__
    raw = root / folder / "raw"
    if all((raw / f).exists() for f in _MNIST_FILES):
        return root, False
    official = {name.removesuffix(".gz"): md5 for name, md5 in cls.resources}
    missing = [f + ".gz" for f in _MNIST_FILES if not (raw / (f + ".gz")).exists()]
    if missing:
        if download:
            return root, True
        raise DataError(
            f"{folder} files not found: put {', '.join(missing)} in {raw}/ (or pass --data-dir / set "
            f"PYRO_VAE_DATA to the folder that holds {folder}/raw; --download fetches them where there is internet)"
        )
    for f in _MNIST_FILES:
        got = _md5(raw / (f + ".gz"))
        if got != official[f]:
            if download:
                return root, True  # torchvision replaces the file and checks it again
            raise _corrupt(raw / (f + ".gz"), got, official[f])
    key = hashlib.md5("".join(official[f] for f in _MNIST_FILES).encode(), usedforsecurity=False).hexdigest()[:12]
    cache = _cache_dir() / "data" / f"{folder}-{key}"
    for f in _MNIST_FILES:
        target = cache / folder / "raw" / f
        if not target.exists() or _idx_problem(target) is not None:
            with gzip.open(raw / (f + ".gz"), "rb") as src:
                _atomic_extract(lambda out: shutil.copyfileobj(src, out, 1 << 20), target)
    return cache, False


def _torchvision_mnist_family(cls_name):
    def load(data_dir, val_fraction, seed, download):
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        root, dl = _prepare_mnist_root(Path(data_dir), cls, download)
        raw = root / cls_name / "raw"
        try:
            train = cls(str(root), train=True, download=dl)
            test = cls(str(root), train=False, download=False)
        except Exception as e:  # corrupt / truncated IDX files, no network
            for f in _MNIST_FILES:
                problem = _idx_problem(raw / f)
                if problem:
                    raise DataError(f"could not read {cls_name}: {raw / f} is corrupt or truncated "
                                    f"({problem})") from None
            what = f"download {cls_name} into" if dl else f"read {cls_name} from"
            raise DataError(f"could not {what} {raw}: {_first_line(e)}") from None
        x = train.data.float().div_(255).unsqueeze(1)
        xte = test.data.float().div_(255).unsqueeze(1)
        xtr, ytr, xva, yva = _split(x, train.targets.long(), val_fraction, seed)
        return Dataset(cls_name.lower(), xtr, ytr, xva, yva, xte, test.targets.long(), num_classes=10)

    return load


def _cifar_problem(cls, root: Path) -> str | None:
    """The first file of an extracted CIFAR-10 folder that is missing or fails its official MD5 sum."""
    folder = root / cls.base_folder
    for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        if not (folder / name).exists():
            return f"{folder / name} is missing"
        got = _md5(folder / name)
        if got != md5:
            return str(_corrupt(folder / name, got, md5))
    return None


def _cifar_from_tarball(cls, tarball: Path, md5: str, fresh: bool = False) -> Path:
    """Extract a verified ``cifar-10-python.tar.gz`` once into ``$PYRO_VAE_CACHE/data/cifar10-<md5>/``."""
    cache = _cache_dir() / "data" / f"cifar10-{md5[:12]}"
    if (cache / cls.base_folder).is_dir() and not fresh:
        return cache  # torchvision checks the extracted files' MD5 sums when it reads them
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(cache / cls.base_folder, ignore_errors=True)
        os.replace(tmp / cls.base_folder, cache / cls.base_folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _cifar10(data_dir, val_fraction, seed, download):
    import torchvision

    cls = torchvision.datasets.CIFAR10
    root = Path(data_dir)
    tarball = root / cls.filename
    use, dl = root, False
    if (root / cls.base_folder).is_dir():
        problem = _cifar_problem(cls, root)
        if problem and not download:
            raise DataError(problem)
        dl = problem is not None
    elif tarball.exists():
        got = _md5(tarball)
        if got == cls.tgz_md5:
            use = _cifar_from_tarball(cls, tarball, got)
        elif download:
            dl = True  # torchvision replaces the file and checks it again
        else:
            raise _corrupt(tarball, got, cls.tgz_md5)
    elif download:
        dl = True
    else:
        raise DataError(f"CIFAR-10 files not found: put {cls.filename} (or its extracted {cls.base_folder}/ "
                        f"folder) in {root}/ (--download fetches it where there is internet)")
    for attempt in range(2):
        try:
            train = cls(str(use), train=True, download=dl)
            test = cls(str(use), train=False, download=False)
            break
        except Exception as e:
            if use != root and attempt == 0:  # a damaged cache entry: extract the verified tarball again
                use = _cifar_from_tarball(cls, tarball, cls.tgz_md5, fresh=True)
                continue
            what = "download CIFAR-10 into" if dl else "read CIFAR-10 from"
            raise DataError(f"could not {what} {use}: {_first_line(e)}") from None
    to_x = lambda a: torch.from_numpy(a).float().div_(255).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    xtr, ytr, xva, yva = _split(to_x(train.data), torch.tensor(train.targets), val_fraction, seed)
    return Dataset("cifar10", xtr, ytr, xva, yva, to_x(test.data), torch.tensor(test.targets), num_classes=10)


DATASETS = {
    "digits": _digits,
    "mnist": _torchvision_mnist_family("MNIST"),
    "fashion-mnist": _torchvision_mnist_family("FashionMNIST"),
    "kmnist": _torchvision_mnist_family("KMNIST"),
    "cifar10": _cifar10,
}


def load_dataset(name: str = "digits", data_dir=None, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = False) -> Dataset:
    """Load a dataset by name: ``digits`` (bundled), ``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``.

    ``data_dir`` defaults to :func:`default_data_dir`. The validation split is drawn with ``seed``.
    """
    try:
        loader = DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None
    return loader(Path(data_dir) if data_dir is not None else default_data_dir(), val_fraction, seed, download)


def from_arrays(x, y=None, *, input_shape=None, val_fraction: float = 0.1, seed: int = 0,
                name: str = "user") -> Dataset:
    """Wrap user data (tensor or numpy array, optional labels) as a :class:`Dataset`; the test set is the
    validation split."""
    x = check_data(x, input_shape)
    if x.dim() == 2:  # plain feature vectors
        x = x.unsqueeze(1)
    y = None if y is None else check_labels(y, x.shape[0])
    xtr, ytr, xva, yva = _split(x, y, val_fraction, seed) if val_fraction > 0 else (x, y, x[:0], None)
    num_classes = None if y is None else int(y.max()) + 1
    return Dataset(name, xtr, ytr, xva, yva, xva, yva, num_classes=num_classes)
