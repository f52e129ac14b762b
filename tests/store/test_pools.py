"""Pool manifests: atomic write, refusal of taken names, and expansion of pool names into members."""

import json

import pytest

from loradar_cli.errors import CorruptError, ExistsError, IncompatibleError, NotFoundError
from loradar_cli.store.pools import PoolManifest, expand_pools, load_pool, pool_path, save_pool
from tests.conftest import make_adapter, make_base


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


def _pool_of_two(store):
    base = make_base(store)
    make_adapter(store, base.name, "a", seed=1)
    make_adapter(store, base.name, "b", seed=2)
    save_pool(store.root, _manifest(name="p", members=("a", "b")))


def test_removing_a_pool_member_is_refused_unless_forced_and_the_pool_is_then_an_orphan(store):
    from loradar_cli.jobs.rm import remove_entries

    _pool_of_two(store)
    with pytest.raises(IncompatibleError, match="pool 'p' uses it as member"):
        remove_entries(store, ["a"])
    assert store.has_adapter("a")
    report = remove_entries(store, ["a"], force=True)
    assert [(o.kind, o.name, o.missing) for o in report.orphans] == [("pool", "p", "adapter a")]


def test_rm_and_mv_of_a_pool_touch_its_manifest_only(store):
    from loradar_cli.jobs.mv import rename_entry
    from loradar_cli.jobs.rm import remove_entries

    _pool_of_two(store)
    assert store.resolve_kind("p") == "pool"
    report = rename_entry(store, "p", "q")
    assert (report.kind, report.orphans) == ("pool", [])
    assert not pool_path(store.root, "p").exists() and load_pool(store.root, "q").name == "q"
    assert expand_pools(store, ["pool:q"]) == ["a", "b"]
    remove_entries(store, ["q"])
    assert store.names("pool") == [] and store.adapter_names() == ["a", "b"]


def test_renaming_a_pool_onto_a_taken_name_is_refused_and_changes_nothing(store):
    from loradar_cli.jobs.mv import rename_entry

    _pool_of_two(store)
    save_pool(store.root, _manifest(name="other", members=("b",)))
    with pytest.raises(ExistsError):
        rename_entry(store, "p", "other")
    assert load_pool(store.root, "p").members == ["a", "b"] and load_pool(store.root, "other").members == ["b"]


def test_verify_names_a_pool_with_a_missing_member_and_a_corrupt_pool(store):
    from loradar_cli.jobs.rm import remove_entries
    from loradar_cli.jobs.verify import verify

    _pool_of_two(store)
    assert verify(store).problems == []
    remove_entries(store, ["b"], force=True)
    pool_path(store.root, "broken").write_text("{not json")
    problems = verify(store).problems
    assert any(p.startswith("pool p:") and "member adapter 'b' is not in the store" in p for p in problems), problems
    assert any(p.startswith("pool broken:") and "not a valid pool manifest" in p for p in problems), problems


def test_list_shows_pools_with_their_members(store):
    from loradar_cli.jobs.browse import list_entries

    _pool_of_two(store)
    listing = list_entries(store)
    pools = [r for r in listing.rows if r.kind == "pool"]
    assert [(r.name, r.attack, r.recipe) for r in pools] == [("p", "a, b", "amt")]
    assert [m["members"] for m in listing.as_json()["pools"]] == [["a", "b"]]
    assert [r.kind for r in list_entries(store, kind="pool").rows] == ["pool"]
