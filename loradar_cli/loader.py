"""Data as a stream: every command reads batches through a `torch.utils.data` DataLoader.

A *source* is a map-style Dataset indexed by a list of point indices, returning `(indices, x [b, C, H, W] in [0, 1],
y [b])`: the small idx/pickle/npz sets stay in memory (`TensorSource`), an `imagefolder:` is listed once and decoded
batch by batch (`FolderSource`), resized and centre-cropped to the model's input size as timm's evaluation
transform does (resize the shorter side to size / crop_pct, then crop the centre). Training order comes from
DistributedSampler (a seeded permutation per epoch, one shard per process); evaluation order is the points' own,
in fixed batches dealt out to the processes. Training augmentations are a `Registry` applied to whole batches on
the job's device with a seeded CPU generator, so a seed gives the same crops on every device.
"""

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from loradar_cli.data import ImageData, list_imagefolder, load_data, parse_spec, split_arrays
from loradar_cli.device import Engine
from loradar_cli.distributed import local_batches
from loradar_cli.errors import CorruptError, InvalidValueError
from loradar_cli.registry import Registry
from loradar_cli.signals import import_held

Batch = tuple[Tensor, Tensor, Tensor]  # point indices [b], images [b, C, H, W], labels [b]
Augment = Callable[[Tensor, torch.Generator], Tensor]
DEFAULT_CROP_PCT = 0.875  # timm.data.DEFAULT_CROP_PCT: the evaluation crop of most timm models

AUGMENTS: Registry[Augment] = Registry("augmentation")


@AUGMENTS.register("none")
def no_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """The batch as it is."""
    return x


@AUGMENTS.register("crop-flip")
def crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop of the zero-padded image and a horizontal flip with probability 1/2, per sample.

    The CIFAR augmentation of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016, arXiv:1512.03385,
    §4.2): pad 4 pixels, crop back to the original size, flip. `[B, C, H, W]` in, same shape and range out.
    """
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def default_augment(channels: int) -> str:
    """crop-flip for colour images (CIFAR-like), none for one channel (digits, MNIST: flips change the class)."""
    return "crop-flip" if channels == 3 else "none"


def resolve_augment(name: str | None, channels: int) -> str:
    """A registered augmentation name, the data's default when None."""
    name = name or default_augment(channels)
    AUGMENTS.get(name)
    return name


class TensorSource(Dataset):
    """A split held in memory (the small idx, pickle and npz sets)."""

    def __init__(self, data: ImageData) -> None:
        self.data = data
        self.labels = data.y
        self.num_classes = data.num_classes
        self.name = data.name
        self.channels = data.x.shape[1]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: list[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return idx, self.data.x[idx], self.data.y[idx]


@dataclass(frozen=True)
class Geometry:
    """How a decoded image becomes a model input: channels, output size and the centre-crop fraction."""

    channels: int
    size: tuple[int, int]
    crop_pct: float = DEFAULT_CROP_PCT


MMAP_THRESHOLD = 1 << 20  # bytes: larger blocks (whole batches) are mapped, and unmapped when freed


@functools.cache
def fixed_mmap_threshold() -> bool:
    """Make glibc map every block over 1 MiB instead of raising its threshold after the first free (glibc only).

    glibc's dynamic threshold (mallopt(3), M_MMAP_THRESHOLD) moves freed batch-sized blocks onto the heap, where
    the small allocations of decoding interleave with them and the heap grows with the number of batches read:
    a stream of 20,000 images then peaked over 100 MB above one of 2,000. Where there is no glibc, nothing changes.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD in malloc.h
    except (OSError, AttributeError):
        return False


class FolderSource(Dataset):
    """Image files decoded on demand: memory holds the paths, never the images."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray, num_classes: int, name: str, geometry: Geometry) -> None:
        fixed_mmap_threshold()  # peak memory must not grow with the number of images streamed
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.num_classes = num_classes
        self.name = name
        self.geometry = geometry
        self.channels = geometry.channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = torch.stack([decode_image(Path(self.paths[i]), self.geometry) for i in indices])
        return idx, x, self.labels[idx]


def decode_image(path: Path, geometry: Geometry) -> Tensor:
    """One image file -> `[C, H, W]` float in [0, 1]: shorter side resized to size / crop_pct, centre crop."""
    from PIL import Image

    h, w = geometry.size
    try:
        with Image.open(path) as img:
            img = img.convert("L" if geometry.channels == 1 else "RGB")
            scale = math.floor(max(h, w) / geometry.crop_pct)
            factor = scale / min(img.size)
            new = (max(w, round(img.size[0] * factor)), max(h, round(img.size[1] * factor)))
            img = img.resize(new, Image.Resampling.BILINEAR)
            left, top = (new[0] - w) // 2, (new[1] - h) // 2
            array = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8)
    except OSError as err:
        raise CorruptError(f"cannot decode image {path}: {err}") from None
    t = torch.from_numpy(array.copy()).float().div_(255.0)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def crop_pct_of(timm_model: str) -> float:
    """The evaluation crop fraction of a timm model's pretrained config (timm's default when it has none)."""
    timm = import_held("timm")

    try:
        cfg = timm.models.get_pretrained_cfg(timm_model)  # `name` or `name.tag`; None for unknown names
    except (RuntimeError, ValueError):
        cfg = None
    return float(getattr(cfg, "crop_pct", None) or DEFAULT_CROP_PCT)


def open_split(
    spec: str,
    split: str,
    *,
    seed: int = 0,
    limit: int | None = None,
    channels: int | None = None,
    size: int | tuple[int, int] | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    download: bool = False,
    report_limit: bool = True,
) -> TensorSource | FolderSource:
    """One split of a data spec as a source; `imagefolder:` streams and needs `channels` and `size`."""
    if limit is not None and limit < 1:
        raise InvalidValueError(f"--limit must be >= 1, got {limit}")
    kind, arg = parse_spec(spec)
    if kind != "imagefolder":
        return TensorSource(
            load_data(
                spec,
                split,
                seed=seed,
                limit=limit,
                channels=channels,
                size=size,
                download=download,
                report_limit=report_limit,
            )
        )
    assert arg is not None
    train_x, train_y, test_x, test_y = list_imagefolder(Path(arg))
    paths, labels = split_arrays(train_x, train_y, test_x, test_y, split, seed)
    if limit is not None:
        paths, labels = paths[:limit], labels[:limit]
    hw = (size, size) if isinstance(size, int) else tuple(size or (224, 224))
    geometry = Geometry(channels or 3, hw, crop_pct)  # type: ignore[arg-type]
    return FolderSource(paths, labels, int(train_y.max()) + 1, spec, geometry)


def materialize(source: TensorSource | FolderSource, engine: Engine | None = None) -> ImageData:
    """The whole split in memory (the combination jobs index it freely); in point order."""
    if isinstance(source, TensorSource):
        return source.data
    single = Engine(workers=engine.workers if engine else 0)  # every process reads the whole split
    parts = [(x, y) for _, _, x, y in eval_batches(source, 256, single, to_device=False)]
    x = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, source.channels, *source.geometry.size)
    y = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    return ImageData(x, y, source.num_classes, source.name)


def _loader(source: Dataset, batches: object, engine: Engine) -> DataLoader:
    return DataLoader(
        source,
        sampler=batches,  # type: ignore[arg-type]  # yields lists of indices; the source batches itself
        batch_size=None,
        num_workers=engine.workers,
        pin_memory=engine.pin_memory,
    )


def train_batches(
    source: Dataset, batch_size: int, engine: Engine, *, seed: int, epoch: int, drop_last: bool = False
) -> Iterator[Batch]:
    """This process's share of each global batch of `batch_size`, reshuffled every epoch, on the device.

    The permutation is DistributedSampler's (seeded by seed + epoch); process r takes its points r, r + W, ..., so
    the union of the processes' batch k is the batch k one process would train on.
    """
    world = engine.world
    if batch_size % world.size:
        raise InvalidValueError(f"--batch-size {batch_size} must be a multiple of the {world.size} processes")
    sampler = DistributedSampler(source, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    batches = BatchSampler(sampler, batch_size // world.size, drop_last=drop_last)
    for idx, x, y in _loader(source, batches, engine):
        yield idx, engine.batch(x), y.to(engine.device, non_blocking=engine.pin_memory)


def eval_batches(
    source: Dataset, batch_size: int, engine: Engine, *, to_device: bool = True
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """(global batch number, first point index, x, y) of this process's batches, in point order."""
    mine = local_batches(len(source), batch_size, engine.world)  # type: ignore[arg-type]
    loader = _loader(source, [list(r) for _, r in mine], engine)
    for (number, points), (_, x, y) in zip(mine, loader, strict=True):
        if to_device:
            x, y = engine.batch(x), y.to(engine.device, non_blocking=engine.pin_memory)
        yield number, points.start, x, y


def augment_batch(name: str, x: Tensor, generator: torch.Generator) -> Tensor:
    """Apply a registered augmentation to a batch `[B, C, H, W]`."""
    return AUGMENTS.get(name)(x, generator)
