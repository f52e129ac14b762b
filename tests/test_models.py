import re

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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop_rate": "abc"}, "drop_rate must be a number"),
        ({"drop_path_rate": 1.0}, r"\[0, 1\)"),
        ({"drop_rate": True}, "drop_rate"),
        ({"img_size": 0.4}, "img_size must be a whole number"),
        ({"img_size": 0}, "img_size"),
        ({"checkpoint_path": "/nonexistent.pt"}, "--checkpoint"),
        ({"num_classes": 3}, "num_classes"),
        ({"in_chans": 2}, "--in-chans"),
    ],
)
def test_model_kwargs_are_checked_before_timm_sees_them(kwargs, message):
    from loradar_cli.errors import InvalidValueError
    from loradar_cli.models import check_model_kwargs

    with pytest.raises(InvalidValueError) as err:
        check_model_kwargs(kwargs)
    assert re.search(message, err.value.one_line())
    assert check_model_kwargs({"drop_rate": 0.1, "img_size": 32, "global_pool": "avg"})["img_size"] == 32


def test_timm_refusals_are_one_line_errors():
    from loradar_cli.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="rejected its arguments: AssertionError: Invalid pool type: bogus"):
        create_timm_model("test_resnet", num_classes=2, in_chans=1, kwargs={"global_pool": "bogus"})
    with pytest.raises(InvalidValueError, match="rejected its arguments: TypeError"):
        create_timm_model("test_resnet", num_classes=2, in_chans=1, kwargs={"no_such_kwarg": 1})


def test_pretrained_offline_is_a_clear_error_without_a_minute_of_retries():
    import socket
    import time

    from loradar_cli.models import HUB_HOST

    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
        pytest.skip("the Hugging Face Hub is reachable: nothing offline to test")
    except OSError:
        pass
    start = time.perf_counter()
    with pytest.raises(NotFoundError, match="cannot get timm's pretrained weights") as err:
        create_timm_model("test_resnet", num_classes=2, in_chans=1, pretrained=True)
    assert "--checkpoint" in err.value.one_line() and time.perf_counter() - start < 20
