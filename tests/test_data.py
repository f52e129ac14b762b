import gzip
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from loradar_cli.data import channel_stats, check_provenance, convert_images, load_data, read_idx
from loradar_cli.errors import CorruptError, InvalidValueError, LoradarWarning, NotFoundError, ProvenanceWarning


def test_digits_splits_are_deterministic_disjoint_and_in_range():
    train = load_data("digits", "train", seed=0)
    val = load_data("digits", "val", seed=0)
    test = load_data("digits", "test", seed=0)
    assert len(train) + len(val) + len(test) == 1797
    assert train.x.shape[1:] == (1, 8, 8) and train.x.min() >= 0 and train.x.max() <= 1
    assert torch.equal(load_data("digits", "val", seed=0).x, val.x)
    assert not torch.equal(load_data("digits", "val", seed=1).x, val.x)
    assert train.num_classes == 10
    assert len(load_data("digits", "test", limit=7)) == 7


def test_convert_channels_and_size():
    x = torch.rand(2, 1, 8, 8)
    rgb = convert_images(x, channels=3, size=16)
    assert rgb.shape == (2, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 2])
    gray = convert_images(torch.ones(1, 3, 4, 4) * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1), channels=1)
    torch.testing.assert_close(gray, torch.full((1, 1, 4, 4), 0.299))
    mean, std = channel_stats(rgb)
    assert len(mean) == 3 and all(s > 0 for s in std)


def _write_idx(path, array, gz=True):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_mnist_idx_reader_on_a_written_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28))
    labels = rng.integers(0, 10, 30)
    _write_idx(raw / "train-images-idx3-ubyte.gz", images)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(raw / "t10k-images-idx3-ubyte", images[:5], gz=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[:5], gz=False)
    test = load_data(f"mnist:{tmp_path}", "test")
    assert torch.equal(test.y, torch.as_tensor(labels[:5]))
    torch.testing.assert_close(test.x[:, 0] * 255, torch.as_tensor(images[:5], dtype=torch.float32))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02")
    with pytest.raises(CorruptError):
        read_idx(raw / "t10k-labels-idx1-ubyte")


def test_cifar_reader_on_written_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [("data_batch_1", 12), ("test_batch", 4)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    test = load_data(f"cifar10:{tmp_path}", "test")
    ref = pickle.loads((folder / "test_batch").read_bytes())
    assert test.x.shape == (4, 3, 32, 32)
    torch.testing.assert_close(test.x[1, 2] * 255, torch.as_tensor(ref["data"][1, 2048:].reshape(32, 32)).float())


class _WritesCanary:
    """Unpickling this runs `Path.write_text(canary)`: what a malicious CIFAR batch would do."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (type(self.canary).write_text, (self.canary, "pwned"))


@pytest.mark.parametrize("payload", ["reduce", "os-system", "object-array"])
def test_crafted_cifar_pickle_cannot_run_code(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    canary = tmp_path / "canary"
    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    evil = {
        "reduce": {"data": _WritesCanary(canary), "labels": [0, 1]},
        "os-system": {"data": good["data"], "labels": [0, 1], "x": _Shell(f"touch {canary}")},
        "object-array": {"data": np.array([_WritesCanary(canary)], dtype=object), "labels": [0]},
    }[payload]
    (folder / "data_batch_1").write_bytes(pickle.dumps(good, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(CorruptError, match="test_batch"):
        load_data(f"cifar10:{tmp_path}", "test")
    assert not canary.exists()
    # control: the plain pickle module would have run the payload
    if payload != "os-system":
        pickle.loads((folder / "test_batch").read_bytes())
        assert canary.exists()


class _Shell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@pytest.mark.parametrize(
    "batch",
    [
        {"labels": [0]},
        {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]},
        {"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]},
        {"data": np.zeros((2, 3072), np.uint8), "labels": [0]},
        {"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]},
        {"data": np.zeros((2, 3072), np.uint8), "labels": [-1, 0]},
        [1, 2, 3],
    ],
    ids=["no-data", "row-length", "dtype", "label-count", "label-strings", "negative-label", "not-a-dict"],
)
def test_malformed_cifar_batches_are_corrupt(tmp_path, batch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(CorruptError, match="batch"):
        load_data(f"cifar10:{tmp_path}", "test")


def test_truncated_cifar_pickle_is_corrupt(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=2)
    (folder / "data_batch_1").write_bytes(data)
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptError, match="test_batch"):
        load_data(f"cifar10:{tmp_path}", "test")


def test_npz_and_imagefolder(tmp_path):
    from PIL import Image

    np.savez(
        tmp_path / "d.npz",
        x_train=np.zeros((6, 5, 5, 3), np.uint8),
        y_train=np.arange(6) % 2,
        x_test=np.full((2, 5, 5, 3), 255, np.uint8),
        y_test=np.array([0, 1]),
    )
    assert load_data(f"npz:{tmp_path / 'd.npz'}", "test").x.min() == 1.0
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            Image.new("RGB", (6, 6), (255, 0, 0) if cls == "cat" else (0, 0, 255)).save(
                tmp_path / "imgs" / split / cls / "a.png"
            )
    test = load_data(f"imagefolder:{tmp_path / 'imgs'}", "test")
    assert test.y.tolist() == [0, 1] and test.x[0, 0].mean() == 1.0


def test_bad_specs():
    with pytest.raises(InvalidValueError, match="unknown dataset"):
        load_data("imagenet:/x")
    with pytest.raises(InvalidValueError, match="needs a path"):
        load_data("mnist")
    with pytest.raises(NotFoundError):
        load_data("cifar10:/does/not/exist")


def test_real_mnist_and_cifar_layouts(real_data):
    mnist = load_data(f"mnist:{real_data / 'mnist'}", "test", limit=10)
    assert mnist.x.shape == (10, 1, 28, 28) and mnist.num_classes == 10
    cifar = load_data(f"cifar10:{real_data}", "test", limit=10)
    assert cifar.x.shape == (10, 3, 32, 32)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, np.nan, 3] * 5), "whole numbers"),
        (np.array([0, 1, 2.5, 3] * 5), "whole numbers"),
        (np.array([0, -1, 2, 3] * 5), ">= 0"),
        (np.arange(19) % 4, r"20 images but labels of shape \(19,\)"),
        (np.ones((20, 2), dtype=np.int64), r"labels of shape \(20, 2\)"),
        (np.array(["a"] * 20), "1-D integer"),
    ],
)
def test_npz_labels_are_checked_against_the_images(tmp_path, labels, message):
    spec = _npz(tmp_path / "d.npz", x=np.zeros((20, 4, 4), np.uint8), y=labels)
    with pytest.raises(CorruptError, match=message):
        load_data(spec, "test")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "cannot read"), (b"PK\x03\x04garbage", "cannot read"), (None, "holds x, y_other")],
)
def test_empty_truncated_and_keyless_npz_files_are_corrupt(tmp_path, content, message):
    path = tmp_path / "d.npz"
    if content is None:
        np.savez(path, x=np.zeros((4, 2, 2)), y_other=np.zeros(4))
    else:
        path.write_bytes(content)
    with pytest.raises(CorruptError, match=message) as err:
        load_data(f"npz:{path}", "test")
    assert str(path) in err.value.message


def test_npz_strings_objects_and_float_images_out_of_range_are_refused(tmp_path):
    y = np.arange(20) % 3
    for x, message in [
        (np.array([["a"] * 4] * 20), "numeric array"),
        (np.full((20, 4, 4), 3.0), r"\[0, 1\]"),
        (np.full((20, 4, 4), np.nan), r"\[0, 1\]"),
    ]:
        with pytest.raises(CorruptError, match=message):
            load_data(_npz(tmp_path / "d.npz", x=x, y=y), "test")
    np.savez(tmp_path / "o.npz", x=np.zeros((20, 4, 4)), y=np.array([object()] * 20, dtype=object))
    with pytest.raises(CorruptError, match=r"o\.npz"):
        load_data(f"npz:{tmp_path / 'o.npz'}", "test")


def test_idx_header_must_account_for_every_byte(tmp_path):
    labels = np.arange(6)
    _write_idx(tmp_path / "ok", labels, gz=False)
    assert read_idx(tmp_path / "ok").tolist() == labels.tolist()
    header = struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 9)  # claims 9 labels, holds 6
    (tmp_path / "count").write_bytes(header + labels.astype(np.uint8).tobytes())
    (tmp_path / "ndim0").write_bytes(struct.pack(">HBB", 0, 8, 0))
    (tmp_path / "long").write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 3) + bytes(6))
    for name, message in [
        ("count", r"\(9,\) = 9 bytes, the file holds 6"),
        ("ndim0", "0 dimensions"),
        ("long", "holds 6"),
    ]:
        with pytest.raises(CorruptError, match=message):
            read_idx(tmp_path / name)


def test_corrupt_png_in_an_imagefolder_names_the_file(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / split / cls / "ok.png")
    assert len(load_data(f"imagefolder:{tmp_path}", "test")) == 2
    bad = tmp_path / "val" / "dog" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    with pytest.raises(CorruptError, match=r"bad\.png"):
        load_data(f"imagefolder:{tmp_path}", "test")


def test_only_grayscale_rgb_conversions_exist():
    with pytest.raises(InvalidValueError, match="1-channel images to 2"):
        convert_images(torch.rand(1, 1, 4, 4), channels=2)
    with pytest.raises(InvalidValueError, match="whole numbers"):
        convert_images(torch.rand(1, 1, 4, 4), size=0)


def test_limit_beyond_the_split_is_reported():
    with pytest.warns(LoradarWarning, match="--limit 5000 is more than the 359 examples"):
        data = load_data("digits", "test", limit=5000)
    assert len(data) == 359
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_data("digits", "test", limit=5000, report_limit=False)


def test_provenance_warns_on_other_kind_classes_or_statistics():
    digits = load_data("digits", "test", channels=1, size=8)
    mean, std = channel_stats(digits.x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_provenance(digits, dataset="digits", num_classes=10, mean=mean, std=std)
    with pytest.warns(ProvenanceWarning, match="fitted on cifar10, this is digits"):
        check_provenance(digits, dataset="cifar10:/x", num_classes=10, mean=mean, std=std)
    with pytest.warns(ProvenanceWarning, match="10 classes here, 100 in the base"):
        check_provenance(digits, dataset="digits", num_classes=100, mean=mean, std=std)
    with pytest.warns(ProvenanceWarning, match="mean/std"):
        check_provenance(digits, dataset="digits", num_classes=10, mean=[m + 0.3 for m in mean], std=std)
    with pytest.warns(ProvenanceWarning, match="mean/std"):
        check_provenance(digits, dataset="digits", num_classes=10, mean=mean, std=[3 * s for s in std])
