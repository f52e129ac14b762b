"""Image datasets from disk (or scikit-learn's bundled digits) as in-memory tensors in [0, 1].

Specs: `digits`, `mnist:DIR`, `fashion-mnist:DIR`, `cifar10:DIR`, `cifar100:DIR`, `imagefolder:DIR`,
`npz:FILE`. Splits are deterministic given a seed: official test sets stay as they are, validation is a
seeded slice of the training set.
"""

import gzip
import pickle
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from loradar_cli.errors import CorruptError, InvalidValueError, LoradarWarning, NotFoundError, ProvenanceWarning
from loradar_cli.registry import Registry
from loradar_cli.signals import import_held

SPLITS = ("train", "val", "test")
Reader = Callable[[Path | None], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
VAL_FRACTION = 0.1


@dataclass
class ImageData:
    """Images [N, C, H, W] float32 in [0, 1] and labels [N] int64."""

    x: Tensor
    y: Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.y)


def parse_spec(spec: str) -> tuple[str, str | None]:
    kind, _, arg = spec.partition(":")
    if kind not in DATASETS:
        raise InvalidValueError(f"unknown dataset {kind!r} in --data {spec!r}; valid: {', '.join(DATASETS)}")
    if kind != "digits" and not arg:
        raise InvalidValueError(f"--data {kind} needs a path: {kind}:DIR" + (" (FILE)" if kind == "npz" else ""))
    return kind, arg or None


def load_data(
    spec: str,
    split: str = "train",
    *,
    seed: int = 0,
    limit: int | None = None,
    channels: int | None = None,
    size: int | tuple[int, int] | None = None,
    download: bool = False,
    report_limit: bool = True,
) -> ImageData:
    """Load one split of a dataset spec, converted to `channels` and resized to `size` when given.

    A `limit` beyond the split is reported as a warning unless `report_limit` is off (a cap, not a request).
    """
    if split not in SPLITS:
        raise InvalidValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise InvalidValueError(f"--limit must be >= 1, got {limit}")
    kind, arg = parse_spec(spec)
    if download and arg:
        download_dataset(kind, Path(arg))
    train_x, train_y, test_x, test_y = DATASETS.get(kind)(Path(arg) if arg else None)
    train_x, train_y = check_arrays(train_x, train_y, f"{spec} (train)")
    test_x, test_y = check_arrays(test_x, test_y, f"{spec} (test)", allow_empty=True)
    x, y = _split(train_x, train_y, test_x, test_y, split, seed)
    if report_limit and limit is not None and limit > len(y):
        warnings.warn(
            f"--limit {limit} is more than the {len(y)} examples of {spec} {split}; using all {len(y)}",
            LoradarWarning,
            stacklevel=2,
        )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    num_classes = int(max(int(train_y.max()), int(test_y.max() if len(test_y) else 0)) + 1)
    images = to_tensor_images(x)
    images = convert_images(images, channels=channels, size=size)
    return ImageData(images, torch.as_tensor(y, dtype=torch.long), num_classes, spec)


def check_arrays(x: np.ndarray, y: np.ndarray, what: str, *, allow_empty: bool = False) -> tuple[np.ndarray, ...]:
    """Images and labels as a reader returned them, checked: numeric NHW/NHWC/NCHW images in range, one
    non-negative integer label per image. Returns the labels as int64; anything else is `CorruptError`."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "uif" or x.ndim not in (3, 4):
        raise CorruptError(f"{what}: images must be a numeric array of 3 or 4 dimensions, got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype.kind not in "uifb" or y.dtype.kind == "b":
        raise CorruptError(f"{what}: labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise CorruptError(f"{what}: {len(x)} images but {len(y)} labels")
    if not len(y) and not allow_empty:
        raise CorruptError(f"{what} holds no examples")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise CorruptError(f"{what}: labels must be whole numbers (found NaN, infinite or fractional values)")
    if len(y) and y.min() < 0:
        raise CorruptError(f"{what}: labels must be >= 0, found {y.min()}")
    if x.dtype.kind == "f" and len(x) and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise CorruptError(f"{what}: float images must be finite and in [0, 1] (uint8 images may be 0..255)")
    if x.dtype.kind in "iu" and x.dtype != np.uint8 and len(x) and (x.min() < 0 or x.max() > 255):
        raise CorruptError(f"{what}: integer images must be in 0..255")
    if x.dtype.kind in "iu" and x.dtype != np.uint8:
        x = x.astype(np.uint8)
    return x, y.astype(np.int64)


def check_provenance(
    data: ImageData, *, dataset: str, num_classes: int, mean: list[float], std: list[float], stats: bool = True
) -> None:
    """Warn (ProvenanceWarning, an error under --strict) when data does not look like what a base was fitted on.

    Checks the dataset kind, the number of classes and, unless the base uses pretrained statistics, the
    per-channel mean and std of the images against the base's (a mean off by more than 0.15, or a std off by
    more than a factor of 2, means a different distribution, and accuracy on it means little).
    """
    problems = []
    kind, base_kind = parse_spec(data.name)[0], dataset.partition(":")[0]
    if kind != base_kind:
        problems.append(f"the base was fitted on {base_kind}, this is {kind}")
    if data.num_classes != num_classes:
        problems.append(f"{data.num_classes} classes here, {num_classes} in the base")
    if stats and len(data) > 1 and len(mean) == data.x.shape[1]:
        here_mean, here_std = channel_stats(data.x)
        mean_gap = max(abs(a - b) for a, b in zip(here_mean, mean, strict=True))
        std_ratio = max(max(a / b, b / a) for a, b in zip(here_std, std, strict=True))
        if mean_gap > 0.15 or std_ratio > 2:
            problems.append(f"image mean/std {_fmt(here_mean)}/{_fmt(here_std)} vs the base's {_fmt(mean)}/{_fmt(std)}")
    if problems:
        warnings.warn(
            f"{data.name} does not match the base's data: {'; '.join(problems)}", ProvenanceWarning, stacklevel=2
        )


def _fmt(values: list[float]) -> str:
    return ",".join(f"{v:.2f}" for v in values)


def _split(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, split: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val split of the training data; the test split is the official one, in order."""
    if split == "test":
        return test_x, test_y
    order = np.random.default_rng(seed).permutation(len(train_y))
    n_val = max(1, round(VAL_FRACTION * len(order)))
    idx = order[:n_val] if split == "val" else order[n_val:]
    return train_x[idx], train_y[idx]


def to_tensor_images(x: np.ndarray) -> Tensor:
    """uint8 (or float in [0,1]) NHW / NHWC / NCHW arrays -> float32 NCHW in [0, 1]."""
    t = torch.from_numpy(np.array(x, copy=True, order="C"))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.dim() != 4:
        raise CorruptError(f"images must be 3-D or 4-D arrays, got shape {tuple(x.shape)}")
    return t.clamp_(0, 1).contiguous()


def convert_images(x: Tensor, *, channels: int | None = None, size: int | tuple[int, int] | None = None) -> Tensor:
    """Grayscale<->RGB conversion (repeat / ITU-R 601 luma) and bilinear resizing with antialiasing."""
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, channels, -1, -1).contiguous()
        elif x.shape[1] == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise InvalidValueError(
                f"cannot convert {x.shape[1]}-channel images to {channels} channels",
                hint="loradar converts between grayscale (1) and RGB (3) only",
            )
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else (size,)
        if len(hw) != 2 or not all(isinstance(v, int) and v >= 1 for v in hw):
            raise InvalidValueError(f"image size must be whole numbers >= 1, got {size}")
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return x


def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images [N, C, H, W] (the normalisation a fitted base uses)."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------- readers: each returns train x/y, test x/y


def _read_digits(_: Path | None) -> tuple[np.ndarray, ...]:
    """scikit-learn's bundled 8×8 digits (values 0..16): 20 % seeded-fixed test split, the rest train."""
    load_digits = import_held("sklearn.datasets").load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(1797).permutation(len(images))
    n_test = len(images) // 5
    test, train = order[:n_test], order[n_test:]
    return images[train], digits.target[train], images[test], digits.target[test]


def _find(root: Path, names: tuple[str, ...], subdirs: tuple[str, ...]) -> Path:
    for sub in subdirs:
        for name in names:
            for candidate in (root / sub / name, root / sub / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    raise NotFoundError(f"{names[0]} not found under {root}", hint=f"looked in {', '.join(s or '.' for s in subdirs)}")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain): big-endian header, magic 0x0803 images / 0x0801 labels, unsigned bytes.

    The header's dimensions must account for every byte after it: a short or long file is `CorruptError`.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("bad magic (only unsigned-byte idx files are supported)")
        if not 1 <= ndim <= 4:
            raise ValueError(f"{ndim} dimensions (1 to 4 expected)")
        dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        count, offset = int(np.prod(dims, dtype=np.int64)), 4 + 4 * ndim
        if len(data) - offset != count:
            raise ValueError(f"the header says {dims} = {count} bytes, the file holds {len(data) - offset}")
        return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
    except (OSError, ValueError, EOFError, struct.error) as err:
        raise CorruptError(f"cannot read idx file {path}: {err}") from None


def _read_mnist_like(folder: str) -> Reader:
    def reader(root: Path | None) -> tuple[np.ndarray, ...]:
        assert root is not None
        subdirs = ("", "raw", f"{folder}/raw", "mnist/raw", f"{folder.lower()}/raw")
        parts = [
            read_idx(_find(root, (name,), subdirs))
            for name in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        ]
        for images, labels, which in ((parts[0], parts[1], "train"), (parts[2], parts[3], "t10k")):
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise CorruptError(
                    f"{which} idx files under {root}: images {images.shape} and labels {labels.shape} do not pair up"
                )
        return parts[0], parts[1].astype(np.int64), parts[2], parts[3].astype(np.int64)

    return reader


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers, bytes/str/numbers and plain numpy arrays.

    A pickle names the callables it runs; a CIFAR batch needs only numpy's array and scalar reconstructors,
    `ndarray`, `dtype` and `_codecs.encode` (protocol-2 bytes). Anything else would execute code chosen by the file's
    author, so it is refused before it is looked up.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and builtins)")
        return super().find_class(module, name)


def safe_unpickle(path: Path) -> object:
    """Read a pickle with `_RestrictedUnpickler`; any decoding problem becomes `CorruptError` naming the file."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except OSError as err:
        raise CorruptError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # a crafted or truncated pickle may raise anything while decoding
        raise CorruptError(f"cannot read {path}: {err}") from None
    _reject_object_arrays(obj, path)
    return obj


def _reject_object_arrays(obj: object, path: Path) -> None:
    """Object-dtype arrays may hide arbitrary Python objects: a data file never needs one."""
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise CorruptError(f"cannot read {path}: object arrays are not allowed in data files")
    for item in items:
        _reject_object_arrays(item, path)


def _unpickle(path: Path) -> dict:
    obj = safe_unpickle(path)
    if not isinstance(obj, dict):
        raise CorruptError(f"CIFAR batch {path} is a {type(obj).__name__}, not a dict")
    return obj


def _cifar_rows(batches: list[tuple[Path, dict]], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Stack CIFAR batches after checking each one's keys, dtype, row length and labels."""
    xs, ys = [], []
    for path, batch in batches:
        if "data" not in batch or label_key not in batch:
            raise CorruptError(f"CIFAR batch {path} lacks 'data' or {label_key!r}")
        data, labels = batch["data"], batch[label_key]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise CorruptError(f"CIFAR batch {path}: 'data' must be a uint8 array of N x 3072 rows")
        try:
            y = np.asarray(labels, dtype=np.int64)
        except (TypeError, ValueError):
            raise CorruptError(f"CIFAR batch {path}: {label_key!r} must be a list of integers") from None
        if y.ndim != 1 or len(y) != len(data) or (len(y) and y.min() < 0):
            raise CorruptError(f"CIFAR batch {path}: {len(data)} images but labels of shape {y.shape}")
        xs.append(data)
        ys.append(y)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def _cifar_dir(root: Path, name: str) -> Path:
    for candidate in (root, root / name):
        if candidate.is_dir() and any(candidate.glob("*test*")):
            return candidate
    raise NotFoundError(f"no CIFAR batches under {root}", hint=f"expected {root}/{name}/")


def _read_cifar10(root: Path | None) -> tuple[np.ndarray, ...]:
    assert root is not None
    folder = _cifar_dir(root, "cifar-10-batches-py")
    train_files = sorted(folder.glob("data_batch_*"))
    if not train_files:
        raise NotFoundError(f"no data_batch_* files in {folder}")
    train_x, train_y = _cifar_rows([(p, _unpickle(p)) for p in train_files], "labels")
    test_x, test_y = _cifar_rows([(folder / "test_batch", _unpickle(folder / "test_batch"))], "labels")
    return train_x, train_y, test_x, test_y


def _read_cifar100(root: Path | None) -> tuple[np.ndarray, ...]:
    assert root is not None
    folder = _cifar_dir(root, "cifar-100-python")
    train_x, train_y = _cifar_rows([(folder / "train", _unpickle(folder / "train"))], "fine_labels")
    test_x, test_y = _cifar_rows([(folder / "test", _unpickle(folder / "test"))], "fine_labels")
    return train_x, train_y, test_x, test_y


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _read_image_dir(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).glob("*")):
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                images.append(_read_image(path))
                labels.append(label)
    if not images:
        raise NotFoundError(f"no images in {folder}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        size = min(s[0] for s in shapes), min(s[1] for s in shapes)
        images = [np.asarray(Image.fromarray(im).resize(size[::-1])) for im in images]
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _read_image(path: Path) -> np.ndarray:
    """One image file as RGB uint8; a file PIL cannot decode is `CorruptError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise CorruptError(f"cannot decode image {path}: {type(err).__name__}") from None


def _imagefolder_parts(root: Path) -> tuple[Path, Path, list[str]]:
    train = root / "train"
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train.is_dir() or test is None:
        raise NotFoundError(f"imagefolder {root} needs train/ and val/ or test/ subfolders")
    return train, test, sorted(p.name for p in train.iterdir() if p.is_dir())


def _read_imagefolder(root: Path | None) -> tuple[np.ndarray, ...]:
    assert root is not None
    train, test, classes = _imagefolder_parts(root)
    return (*_read_image_dir(train, classes), *_read_image_dir(test, classes))


def list_imagefolder(root: Path) -> tuple[np.ndarray, ...]:
    """Paths (str arrays) and labels of an image folder's train and test images, decoding none of them."""
    train, test, classes = _imagefolder_parts(root)
    out: list[np.ndarray] = []
    for folder in (train, test):
        pairs = [
            (str(path), label)
            for label, cls in enumerate(classes)
            for path in sorted((folder / cls).glob("*"))
            if path.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not pairs:
            raise NotFoundError(f"no images in {folder}")
        out += [np.array([p for p, _ in pairs]), np.array([lbl for _, lbl in pairs], dtype=np.int64)]
    return tuple(out)


def split_arrays(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, split: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded split `load_data` uses, for arrays read elsewhere (e.g. the paths of a streamed folder)."""
    if split not in SPLITS:
        raise InvalidValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return _split(train_x, train_y, test_x, test_y, split, seed)


def _read_npz(path: Path | None) -> tuple[np.ndarray, ...]:
    assert path is not None
    if not path.is_file():
        raise NotFoundError(f"npz file {path} does not exist")
    keys = ({"x_train", "y_train", "x_test", "y_test"}, {"x", "y"})
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise CorruptError(f"{path} is a single .npy array, not an npz archive")
            if keys[0] <= set(z.files):
                return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
            if keys[1] <= set(z.files):
                x, y = z["x"], z["y"]
                if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
                    raise CorruptError(f"{path}: {len(x) if x.ndim else 0} images but labels of shape {y.shape}")
                n_test = len(y) // 5
                return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
            found = ", ".join(z.files) or "nothing"
    except CorruptError:
        raise
    except Exception as err:  # empty, truncated or pickled archives raise EOFError, BadZipFile, ValueError, ...
        raise CorruptError(
            f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    raise CorruptError(f"{path} needs arrays x_train/y_train/x_test/y_test (or x/y); it holds {found}")


DATASETS: Registry[Reader] = Registry("dataset")
"""Dataset kinds of `--data KIND[:PATH]`: each reader returns train x/y and test x/y as numpy arrays.

To add a dataset, write a reader and register it here with one line (and its name in `loradar_cli.names`).
"""
for _kind, _reader in {
    "digits": _read_digits,
    "mnist": _read_mnist_like("MNIST"),
    "fashion-mnist": _read_mnist_like("FashionMNIST"),
    "cifar10": _read_cifar10,
    "cifar100": _read_cifar100,
    "imagefolder": _read_imagefolder,
    "npz": _read_npz,
}.items():
    DATASETS.add(_kind, _reader)
DATASET_KINDS: tuple[str, ...] = tuple(DATASETS)


def download_dataset(kind: str, root: Path) -> None:
    """Fetch a dataset with torchvision's downloaders (needs network); the readers then find the usual layout."""
    from torchvision import datasets

    classes = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }
    if kind not in classes:
        raise InvalidValueError(f"--download supports {', '.join(classes)}; {kind} is read from disk only")
    for train in (True, False):
        classes[kind](str(root), train=train, download=True)
