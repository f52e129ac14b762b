"""Device resolution, autocast and loss scaling, and a store that stays device-free."""

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loradar_cli.cli._engine_options import PRECISION_NAMES
from loradar_cli.cli.app import app
from loradar_cli.device import DEVICE_ENV, PRECISIONS, Engine, engine_for, resolve_device
from loradar_cli.errors import EXIT_CODES, InvalidValueError, NotFoundError
from loradar_cli.store.store import ADAPTER_WEIGHTS
from tests.conftest import make_base

NO_CUDA = not torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(NO_CUDA, reason="needs CUDA")


def test_explicit_device_beats_the_environment_which_beats_auto(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(InvalidValueError, match=r"auto\|cpu"):
        resolve_device(None)
    assert resolve_device("cpu") == torch.device("cpu")  # the option wins over a bad environment
    monkeypatch.delenv(DEVICE_ENV)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
def test_missing_cuda_is_an_error_not_a_fallback():
    with pytest.raises(NotFoundError, match="no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
def test_cli_device_cuda_without_cuda_exits_with_one_line(tiny):
    store, base, _, _ = tiny
    result = CliRunner().invoke(app, ["eval", "--base", base.name, "--store", str(store.root), "--device", "cuda"])
    assert result.exit_code == EXIT_CODES["NotFoundError"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cuda" in lines[0] and "not available" in lines[0]
    assert result.stdout == ""


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize(
    "args",
    [
        ["finetune", "--name", "b"],
        ["train", "--base", "b", "--attack", "pgd", "--name", "a"],
        ["attack", "--base", "b", "--attack", "pgd", "--out", "x.safetensors"],
        ["quickstart"],
        ["merge", "a", "b", "--name", "m", "--method", "tts"],
        ["trim", "a", "--name", "t", "--full-weight"],
        ["ensemble-vote", "a", "b"],
        ["identify-attack", "a", "b"],
        ["fit-identifier", "a", "b", "--name", "i"],
    ],
)
def test_every_computing_command_refuses_a_missing_device(args, tmp_path):
    result = CliRunner().invoke(app, [*args, "--device", "cuda:1", "--store", str(tmp_path)])
    assert result.exit_code == EXIT_CODES["NotFoundError"], result.output
    assert result.stderr.strip().splitlines() == [
        "error: device cuda:1 is not available: torch sees no CUDA device "
        f"(use --device cpu or auto (or set {DEVICE_ENV}))"
    ]
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_precision_names_are_the_registry():
    assert sorted(PRECISION_NAMES) == PRECISIONS.names()
    with pytest.raises(NotFoundError, match="valid: bf16, fp16, fp32"):
        Engine(precision="fp8")


def test_autocast_runs_matmuls_in_the_chosen_dtype_and_fp32_is_untouched():
    layer = torch.nn.Linear(4, 3)
    x = torch.rand(2, 4)
    with Engine(precision="bf16").autocast():
        assert layer(x).dtype == torch.bfloat16
    with Engine(precision="fp32").autocast():
        assert layer(x).dtype == torch.float32
    assert Engine(precision="fp16").scaler().is_enabled()
    assert not Engine(precision="bf16").scaler().is_enabled()


def test_channels_last_moves_models_and_batches_to_nhwc():
    engine = Engine(channels_last=True)
    conv = engine.model(torch.nn.Conv2d(3, 8, 3))
    x = engine.batch(torch.rand(2, 3, 8, 8))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_engine_for_outside_torchrun_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    engine = engine_for("cpu", "bf16", workers=2)
    assert engine.describe() == {
        "device": "cpu",
        "precision": "bf16",
        "channels_last": False,
        "workers": 2,
        "world_size": 1,
    }


def _train_tiny(store, engine: Engine, name: str):
    from loradar_cli.jobs.train import train_and_store_adapter
    from loradar_cli.recipes.loop import TrainConfig

    return train_and_store_adapter(
        store,
        name,
        base="tiny",
        attack="fgsm",
        data="digits",
        attack_options={"eps": 0.05},
        config=TrainConfig(epochs=1, batch_size=32, lr=1e-2),
        limit=64,
        val_limit=32,
        engine=engine,
    )


def test_low_precision_nhwc_training_writes_plain_fp32_tensors_that_reload(store):
    """bf16 autocast and channels_last change how training runs, not what the store holds."""
    from loradar_cli.loading import load_model

    make_base(store)
    meta = _train_tiny(store, Engine(precision="bf16", channels_last=True), "lowp")
    tensors = load_file(str(store.adapter_dir("lowp") / ADAPTER_WEIGHTS))
    assert all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it did train
    run = meta.combination["run"]
    assert (run["precision"], run["channels_last"], run["world_size"]) == ("bf16", True, 1)
    assert run["images_per_s"] > 0 and run["augment"] == "none"  # 1-channel digits: no crop-flip by default
    reloaded = load_model(store, "tiny", "lowp")
    assert torch.isfinite(reloaded(torch.rand(4, 1, 16, 16))).all()


@needs_cuda
def test_adapter_trained_on_gpu_reloads_on_cpu_with_the_same_logits(store):
    from loradar_cli.loading import load_model

    make_base(store)
    _train_tiny(store, Engine(torch.device("cuda")), "gpu")
    x = torch.rand(8, 1, 16, 16)
    on_cpu = load_model(store, "tiny", "gpu")(x)
    on_gpu = load_model(store, "tiny", "gpu").cuda()(x.cuda()).cpu()
    torch.testing.assert_close(on_cpu, on_gpu, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_bf16_training_on_cuda_runs_and_stores_fp32(store):
    make_base(store)
    meta = _train_tiny(store, Engine(torch.device("cuda"), precision="bf16"), "gpu-bf16")
    tensors = load_file(str(store.adapter_dir("gpu-bf16") / ADAPTER_WEIGHTS))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert meta.combination["run"]["device"].startswith("cuda")
