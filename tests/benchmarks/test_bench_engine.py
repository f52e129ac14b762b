"""benchmarks.bench_engine: the scaling rows' test images are labelled with the base's own predictions."""

from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_engine
from loradar_cli.data import load_data
from loradar_cli.loading import load_model
from loradar_cli.store.store import Store


def test_labelled_by_base_holds_the_images_and_the_base_predictions(tmp_path: Path) -> None:
    store = tmp_path / "store"
    bench_engine._resnet18_base(store)
    source = bench_engine._data_spec(tmp_path)
    spec = bench_engine._labelled_by_base(source, store, tmp_path, 12)
    model = load_model(Store(store), "r18").eval()
    original, labelled = load_data(source, "test", limit=12), load_data(spec, "test")
    assert torch.equal(labelled.x, original.x)  # uint8 images survive the round trip exactly
    with torch.no_grad():
        assert torch.equal(labelled.y, model(original.x).argmax(1))
    assert labelled.num_classes == 10 and len(np.load(spec.removeprefix("npz:"))["y_train"]) == 12
