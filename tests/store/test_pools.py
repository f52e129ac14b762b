"""Pool manifests: atomic write, refusal of taken names, and expansion of pool names into members."""

import json

import pytest

from loradar_cli.errors import CorruptError, ExistsError, NotFoundError
from loradar_cli.store.pools import PoolManifest, expand_pools, load_pool, pool_path, save_pool


def _manifest(name="P", members=("a", "b")):
    return PoolManifest(name=name, key="eps", values=["1/255", "2/255"], members=list(members), recipe="amt")


def test_save_load_round_trip_and_overwrite_refusal(store):
    path = save_pool(store.root, _manifest())
    assert path == store.root / "pools" / "P.json"
    assert load_pool(store.root, "P") == _manifest()
    assert [p.name for p in path.parent.iterdir()] == ["P.json"]  # no temporary file left behind
    with pytest.raises(ExistsError):
        save_pool(store.root, _manifest(members=("c",)))
    save_pool(store.root, _manifest(members=("c",)), overwrite=True)
    assert load_pool(store.root, "P").members == ["c"]


def test_missing_and_corrupt_pools_are_one_line_errors(store):
    save_pool(store.root, _manifest(name="Q"))
    with pytest.raises(NotFoundError) as err:
        load_pool(store.root, "P")
    assert err.value.hint == "pools: Q"
    pool_path(store.root, "Q").write_text(json.dumps({"name": "Q"}))
    with pytest.raises(CorruptError):
        load_pool(store.root, "Q")


def test_expansion_prefers_adapters_and_honours_the_prefix(tiny):
    store, _, adapter, _ = tiny
    save_pool(store.root, _manifest(name="P", members=("m1", "m2")))
    save_pool(store.root, _manifest(name=adapter.name, members=("x",)))  # a pool named like an adapter
    assert expand_pools(store, ["P", adapter.name]) == ["m1", "m2", adapter.name]
    assert expand_pools(store, [f"pool:{adapter.name}", "nope"]) == ["x", "nope"]
