"""The DataLoader layer: augmentations, training and evaluation order, and image folders that stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loradar_cli.cli._engine_options import AUGMENT_NAMES
from loradar_cli.data import ImageData
from loradar_cli.device import Engine
from loradar_cli.distributed import World
from loradar_cli.loader import (
    AUGMENTS,
    FolderSource,
    TensorSource,
    crop_flip,
    default_augment,
    eval_batches,
    materialize,
    open_split,
    resolve_augment,
    train_batches,
)

REPO = Path(__file__).resolve().parent.parent


def test_cli_augment_names_are_the_registry():
    assert sorted(AUGMENT_NAMES) == AUGMENTS.names()


def test_crop_flip_is_seeded_and_keeps_shape_and_range():
    x = torch.rand(16, 3, 12, 12)
    a = crop_flip(x, torch.Generator().manual_seed(3))
    b = crop_flip(x, torch.Generator().manual_seed(3))
    c = crop_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1


def test_crop_flip_output_is_a_crop_of_the_padded_image_maybe_mirrored():
    """Every output is one of the 9×9×2 crops of the 4-pixel zero-padded input, and crops vary across the batch."""
    x = torch.rand(24, 2, 6, 6) + 0.1  # strictly positive, so padding zeros are recognisable
    out = crop_flip(x, torch.Generator().manual_seed(0))
    padded = F.pad(x, (4, 4, 4, 4))
    found = set()
    for i in range(len(x)):
        hits = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy : dy + 6, dx : dx + 6]))
        ]
        assert hits, f"sample {i} is not a crop of its padded input"
        found.add(hits[0])
    assert len(found) > 10 and {flip for _, _, flip in found} == {False, True}


def test_augmentation_defaults_by_channels():
    assert default_augment(1) == "none" and default_augment(3) == "crop-flip"
    assert resolve_augment(None, 1) == "none" and resolve_augment("none", 3) == "none"
    with pytest.raises(Exception, match="valid: crop-flip, none"):
        resolve_augment("mixup", 3)


def _toy(n: int = 50) -> TensorSource:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2) / n
    return TensorSource(ImageData(x.contiguous(), torch.arange(n) % 3, 3, "toy"))


def test_two_process_shards_of_a_global_batch_are_the_one_process_batch():
    source = _toy(48)
    one = [idx.tolist() for idx, _, _ in train_batches(source, 8, Engine(), seed=5, epoch=2)]
    shards = [
        [idx.tolist() for idx, _, _ in train_batches(source, 8, Engine(world=World(r, 2)), seed=5, epoch=2)]
        for r in (0, 1)
    ]
    assert [sorted(a + b) for a, b in zip(*shards, strict=True)] == [sorted(b) for b in one]
    assert sorted(i for b in one for i in b) == list(range(48))
    epoch3 = [idx.tolist() for idx, _, _ in train_batches(source, 8, Engine(), seed=5, epoch=3)]
    assert epoch3 != one  # reshuffled every epoch
    with pytest.raises(Exception, match="multiple of the 3 processes"):
        next(train_batches(source, 8, Engine(world=World(0, 3)), seed=5, epoch=0))


def test_evaluation_batches_are_in_point_order_and_dealt_out_by_number():
    source = _toy(50)
    one = [(number, start, y.tolist()) for number, start, _, y in eval_batches(source, 16, Engine())]
    assert [(n, s) for n, s, _ in one] == [(0, 0), (1, 16), (2, 32), (3, 48)]
    assert [v for _, _, ys in one for v in ys] == (torch.arange(50) % 3).tolist()
    ranks = [[n for n, _, _, _ in eval_batches(source, 16, Engine(world=World(r, 2)))] for r in (0, 1)]
    assert ranks == [[0, 2], [1, 3]]


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def test_folder_images_are_resized_and_centre_cropped_not_shrunk_to_the_smallest(tmp_path):
    """A wide image keeps its centre: the white middle half fills a square crop; shapes follow the model."""
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, 16:48] = 255  # black quarters left and right, white centre
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        _png(tmp_path / split / "a" / "wide.png", wide)
        _png(tmp_path / split / "a" / "small.png", np.full((8, 8, 3), 128, dtype=np.uint8))
    source = open_split(f"imagefolder:{tmp_path}", "test", channels=3, size=16, crop_pct=1.0)
    assert isinstance(source, FolderSource) and len(source) == 2
    _, x, y = source[[0, 1]]
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 0]
    small, wide_crop = x[0], x[1]  # sorted file names: small.png, wide.png
    assert torch.allclose(small, torch.full_like(small, 128 / 255), atol=1 / 255)
    assert wide_crop[:, :, 1:-1].min() > 0.99 and wide_crop.mean() > 0.97  # the white centre fills the crop
    grey = open_split(f"imagefolder:{tmp_path}", "test", channels=1, size=(8, 8), crop_pct=1.0)
    assert materialize(grey).x.shape == (2, 1, 8, 8)


def test_workers_give_the_same_batches(tmp_path):
    source = _toy(40)
    serial = [x for _, _, x, _ in eval_batches(source, 8, Engine())]
    parallel = [x for _, _, x, _ in eval_batches(source, 8, Engine(workers=2))]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


_RSS_SCRIPT = """
import resource, sys
from loradar_cli.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _folder(root: Path, n_test: int, image: Path) -> Path:
    """An image folder of hard links to one PNG per class: n_test test images, a few training ones."""
    for split, n in (("train", 4), ("test", n_test)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n // 2):
                os.link(image, root / split / f"c{c}" / f"{i:06d}.png")
    return root


def _eval_rss(store: Path, folder: Path) -> tuple[int, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["eval", "--base", "rgb", "--data", f"imagefolder:{folder}", "--store", str(store), "--json", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, *args, "--batch-size", "256", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rss = int(done.stderr.split("maxrss_kb")[-1].split()[0])
    return rss, json.loads(done.stdout)


@pytest.mark.slow
def test_eval_over_an_image_folder_streams(tmp_path, store):
    """Peak RSS over 20,000 images of 64×64 grows by < 150 MB over 2,000 (decoded whole: about 1 GB more)."""
    _rgb_base(store)
    image = tmp_path / "one.png"
    _png(image, (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    small_rss, small = _eval_rss(store.root, _folder(tmp_path / "small", 2_000, image))
    large_rss, large = _eval_rss(store.root, _folder(tmp_path / "large", 20_000, image))
    assert (small["rows"][0]["n"], large["rows"][0]["n"]) == (2_000, 20_000)
    assert small["rows"][0]["clean"] == large["rows"][0]["clean"] == 0.5  # one image, two labels
    print(f"peak RSS: {small_rss / 1024:.0f} MB over 2,000 images, {large_rss / 1024:.0f} MB over 20,000")
    assert (large_rss - small_rss) / 1024 < 150, (small_rss, large_rss)


def _rgb_base(store) -> None:
    import timm

    from loradar_cli.models import weights_fingerprint
    from loradar_cli.store.meta import BaseMeta

    torch.manual_seed(0)
    net = timm.create_model("test_vit", num_classes=2, in_chans=3, img_size=64)  # the cheapest tiny model at 64×64
    meta = BaseMeta(
        name="rgb",
        timm_model="test_vit",
        model_kwargs={"img_size": 64},
        num_classes=2,
        input_size=(3, 64, 64),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        dataset="imagefolder",
        fingerprint=weights_fingerprint(net.state_dict()),
    )
    store.save_base(meta, net.state_dict())


def test_finetune_streams_an_image_folder_at_the_requested_size_with_crop_flip(tmp_path, store):
    """Mixed image sizes become --img-size inputs; 3-channel data gets crop-flip by default, recorded."""
    from loradar_cli.jobs.finetune import finetune_base

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(6):
                h, w = (20, 30) if i % 2 else (40, 24)
                _png(tmp_path / split / f"c{c}" / f"{i}.png", (rng.random((h, w, 3)) * 255).astype(np.uint8))
    meta = finetune_base(
        store, "folder", model="test_resnet", data=f"imagefolder:{tmp_path}", epochs=1, batch_size=4, img_size=16
    )
    assert meta.input_size == (3, 16, 16) and meta.num_classes == 2
    assert meta.training["augment"] == "crop-flip" and meta.training["world_size"] == 1
    assert len(meta.mean) == 3 and all(0 < m < 1 for m in meta.mean)


def test_crop_fraction_comes_from_the_timm_config():
    import timm

    from loradar_cli.loader import DEFAULT_CROP_PCT, crop_pct_of

    assert crop_pct_of("vit_base_patch16_224") == timm.models.get_pretrained_cfg("vit_base_patch16_224").crop_pct
    assert crop_pct_of("resnet18.a1_in1k") == timm.models.get_pretrained_cfg("resnet18.a1_in1k").crop_pct
    assert crop_pct_of("no_such_model") == DEFAULT_CROP_PCT
