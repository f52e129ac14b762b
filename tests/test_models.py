import pytest
import timm
import torch
from safetensors.torch import save_file

from loradar_cli.errors import CorruptError, NotFoundError
from loradar_cli.jobs.finetune import finetune_base
from loradar_cli.loading import build_model
from loradar_cli.models import ImageClassifier, create_timm_model, load_checkpoint, weights_fingerprint


def test_normalisation_lives_inside_the_model():
    net = timm.create_model("test_resnet", num_classes=3, in_chans=1).eval()
    model = ImageClassifier(net, [0.5], [0.25]).eval()
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(model(x), net((x - 0.5) / 0.25))
    assert set(model.state_dict()) == {f"model.{k}" for k in net.state_dict()}  # mean/std not persisted


def test_unknown_model_is_a_clear_error():
    with pytest.raises(NotFoundError, match="unknown timm model"):
        create_timm_model("resnet_does_not_exist", num_classes=2, in_chans=3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_becomes_a_base_with_its_exact_weights(store, tmp_path, suffix):
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(net.state_dict(), path)
    else:
        save_file(net.state_dict(), str(path))
    meta = finetune_base(store, "ckpt", model="test_resnet", data="digits", epochs=0, checkpoint=path)
    assert meta.fingerprint == weights_fingerprint(net.state_dict())
    assert meta.input_size == (1, 8, 8) and meta.num_classes == 10
    rebuilt = build_model(store.load_base("ckpt"))
    x = torch.rand(3, 1, 8, 8)
    expected = net.eval()((x - torch.tensor(meta.mean).view(1, -1, 1, 1)) / torch.tensor(meta.std).view(1, -1, 1, 1))
    torch.testing.assert_close(rebuilt(x), expected)


def test_pickled_objects_and_garbage_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptError):
        load_checkpoint(path)
    with pytest.raises(NotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_finetune_learns_digits(store):
    meta = finetune_base(
        store, "fit", model="test_resnet", data="digits", epochs=3, lr=3e-3, img_size=16, limit=600, batch_size=32
    )
    assert meta.metrics["val_clean_acc"] > 0.6
    assert store.load_base("fit").meta == meta
