import pytest
import timm
import torch

from loradar_cli.errors import IncompatibleError, NotFoundError
from loradar_cli.lora.inject import (
    default_targets,
    inject_lora,
    lora_layers,
    select_targets,
)
from loradar_cli.lora.spec import LoraSpec


def test_block_conv1_preset_is_the_loradar_placement():
    model = timm.create_model("resnet10t", num_classes=10)
    names = select_targets(model, "block-conv1")
    assert names == [f"layer{i}.0.conv1" for i in range(1, 5)]
    assert default_targets(model) == "block-conv1"


def test_vit_preset_and_head_exclusion():
    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    names = select_targets(model, "attn-mlp")
    assert names and all(n.split(".")[-1] in {"qkv", "proj", "fc1", "fc2"} for n in names)
    assert "patch_embed.proj" not in names
    assert "head" not in select_targets(model, "all")
    assert default_targets(model) == "attn-mlp"


def test_depthwise_convs_excluded_by_presets_and_refused_explicitly():
    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    convs = select_targets(model, "convs")
    assert all(model.get_submodule(n).groups == 1 for n in convs)
    depthwise = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
    with pytest.raises(IncompatibleError, match="depthwise"):
        select_targets(model, depthwise)


def test_unknown_targets_is_a_clear_error():
    with pytest.raises(NotFoundError, match="no layer"):
        select_targets(timm.create_model("test_resnet", num_classes=3), "nothing_like_this")


def test_rank_is_bounded_by_what_each_layer_can_reach():
    """max_rank equals the rank of a random ΔW = B·A at a large r (independent: torch.linalg.matrix_rank)."""
    from loradar_cli.errors import InvalidValueError
    from loradar_cli.lora.inject import check_ranks, max_rank

    model = timm.create_model("test_vit", num_classes=10, img_size=32)
    name = select_targets(model, "attn-mlp")[0]
    layer = model.get_submodule(name)
    limit = max_rank(layer)
    a, b = torch.randn(limit + 5, layer.in_features), torch.randn(layer.out_features, limit + 5)
    assert torch.linalg.matrix_rank(b @ a) == limit
    conv = torch.nn.Conv2d(3, 16, 3, groups=1)
    assert max_rank(conv) == min(16, 3 * 3 * 3)
    check_ranks(model, LoraSpec(r=limit, targets=[name]))
    with pytest.raises(InvalidValueError, match=f"at most {limit}"):
        check_ranks(model, LoraSpec(r=limit + 1, targets=[name]))
    with pytest.raises(InvalidValueError, match="largest dimension"):
        inject_lora(model, LoraSpec(r=10**12, targets=[name]))  # refused before allocating anything
    assert not lora_layers(model)


@pytest.mark.parametrize("pattern", ["(((", "conv[0-9", "*conv"])
def test_bad_regex_targets_are_one_line_errors(pattern):
    from loradar_cli.errors import InvalidValueError

    model = timm.create_model("resnet10t", num_classes=10)
    with pytest.raises(InvalidValueError, match="not a valid regular expression"):
        select_targets(model, pattern)
    with pytest.raises(InvalidValueError, match="must not be empty"):
        select_targets(model, "  ")


def test_a_uniform_rank_is_capped_per_layer_and_keeps_the_scale():
    """`-r 16 --targets all` on 1-channel input: the first conv (ΔW rank ≤ 9) gets rank 9 and alpha 9, the scale 1."""
    import timm

    from loradar_cli.errors import InvalidValueError
    from loradar_cli.jobs.train import lora_spec_for
    from loradar_cli.models import ImageClassifier

    model = ImageClassifier(timm.create_model("test_resnet", num_classes=10, in_chans=1), [0.5], [0.25])
    spec = lora_spec_for(model, r=16, lora_alpha=None, targets="all", train_head=True)
    first = model.model.get_submodule(spec.targets[0])
    cap = first.in_channels * first.kernel_size[0] * first.kernel_size[1]
    assert cap < 16 and spec.rank_of(spec.targets[0]) == cap
    assert all(spec.alpha_of(t) / spec.rank_of(t) == 1.0 for t in spec.targets)
    assert all(spec.rank_of(t) == 16 for t in spec.targets if t not in spec.rank_pattern)
    inject_lora(model.model, spec)  # allocates within every layer's limit
    with pytest.raises(InvalidValueError, match="any target layer"):
        lora_spec_for(model, r=10**9, lora_alpha=None, targets="all", train_head=True)


def test_old_state_dict_names_resolve_to_lora_state():
    """The state-dict helpers moved to lora.state; their old lora.inject names are the same objects for one release."""
    from loradar_cli.lora import inject, state

    for name in ("PEFT_PREFIX", "head_tensors", "load_lora_state_dict", "lora_state_dict", "lora_state_dict_shapes"):
        assert getattr(inject, name) is getattr(state, name)
    with pytest.raises(AttributeError):
        inject.delta_weights  # noqa: B018  (gone: lora.state.stored_deltas)
