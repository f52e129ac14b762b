"""identifier: a stored identifier loads, checks its base, and reads identifiers stored before feature groups."""

import pytest
import torch

from loradar_cli.errors import IncompatibleError
from loradar_cli.identifier import load_identifier
from loradar_cli.loading import load_model
from loradar_cli.store.store import Store
from tests.conftest import make_adapter, make_base
from tests.jobs.conftest import naive_probs


@pytest.fixture
def pool(store: Store) -> Store:
    """Base 'tiny' with adapters a (pgd) and b (fgsm); base 'other'."""
    make_base(store)
    make_adapter(store, "tiny", "a", seed=1, attack="pgd")
    make_adapter(store, "tiny", "b", seed=2, attack="fgsm")
    make_base(store, "other", seed=5)
    return store


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_identifier_without_feature_groups_loads_as_the_confidence_group(pool, x):
    """An identifier stored before input features (no feature_groups) predicts from member confidences as it did."""
    from loradar_cli.models import weights_fingerprint
    from loradar_cli.ops.identify import IdentifierModel, identity_feature_names, identity_features

    g = torch.Generator().manual_seed(0)
    n_features = len(identity_feature_names(3))
    model = IdentifierModel(
        torch.randn(2, n_features, generator=g),
        torch.zeros(2),
        torch.zeros(n_features),
        torch.ones(n_features),
        ["clean", "pgd"],
    )
    tensors = model.state_dict()
    base = pool.base_meta("tiny")
    meta = {
        "schema_version": 1,
        "name": "old",
        "base": "tiny",
        "base_fingerprint": base.fingerprint,
        "members": ["a", "b", ":base"],
        "member_labels": {"a": "pgd", "b": "fgsm"},
        "classes": ["clean", "pgd"],
        "feature_names": identity_feature_names(3),
        "tensors_sha256": weights_fingerprint(tensors),
    }
    pool.save_identifier("old", meta, tensors)
    ident = load_identifier(pool, "old", base)
    assert ident.meta.feature_groups == ["confidence"] and not ident.needs_input
    probs = dict(
        zip(
            ["a", "b", ":base"],
            torch.cat([naive_probs(pool, ["a", "b"], x), load_model(pool, "tiny")(x).softmax(-1)[None]]),
            strict=True,
        )
    )
    stack = torch.stack([probs[m] for m in ["a", "b", ":base"]])
    expected = [["clean", "pgd"][i] for i in (identity_features(stack) @ model.weight.T).argmax(dim=1).tolist()]
    assert ident.predict(probs) == expected
    with pytest.raises(IncompatibleError, match="fitted on base 'tiny', not on base 'other'"):
        load_identifier(pool, "old", pool.base_meta("other"))
