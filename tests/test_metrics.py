"""metrics: model_mode restores every module's own flag and leaves a model already in the mode alone;
predict_logits runs in eval mode and gives back the model as it found it."""

import pytest
import torch
from torch import Tensor, nn

from loradar_cli.metrics import accuracy, model_mode, predict_logits


class TrainCalls(nn.Sequential):
    """Counts calls of `train` (which `eval` goes through)."""

    calls = 0

    def train(self, mode: bool = True) -> "TrainCalls":
        TrainCalls.calls += 1
        return super().train(mode)


def test_model_mode_restores_each_module_even_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)))
    model.train()
    model[1].eval()
    with pytest.raises(RuntimeError), model_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
        raise RuntimeError
    assert [m.training for m in model.modules()] == [True, True, False, False, False]
    with model_mode(model, "train"):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, False, False]


def test_model_mode_leaves_a_model_already_in_that_mode_alone() -> None:
    model = TrainCalls(nn.Linear(2, 2), TrainCalls(nn.Dropout())).eval()
    TrainCalls.calls = 0
    with model_mode(model, "eval"):
        pass
    assert TrainCalls.calls == 0
    model[1].train()
    TrainCalls.calls = 0
    with model_mode(model, "eval"):
        assert not model[1].training
    assert TrainCalls.calls > 0 and model[1].training and not model.training


def test_predict_logits_uses_eval_mode_and_keeps_frozen_norm_layers_frozen() -> None:
    """A model training with its norm statistics frozen (BN in eval) gets exactly that state back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Dropout(0.9), nn.LazyLinear(3))
    x = torch.rand(5, 1, 6, 6)
    model(x)
    model.train()
    model[1].eval()
    stats = model[1].running_mean.clone()
    logits = predict_logits(model, x, batch_size=2)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    model[1].eval()
    torch.testing.assert_close(logits, expected)  # dropout off, batched in pieces of 2
    torch.testing.assert_close(predict_logits(model, x), logits)  # deterministic: eval mode
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    assert torch.equal(model[1].running_mean, stats)


def test_accuracy_counts_top1_hits() -> None:
    class Fixed(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.flatten(1)[:, :3]

    x = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [5, 0, 0]]).view(4, 1, 1, 3)
    assert accuracy(Fixed(), x, torch.tensor([0, 1, 0, 2])) == 0.5
    assert accuracy(Fixed(), x[:0], torch.tensor([], dtype=torch.long)) == 0.0
