"""The old `loradar_cli.combine` import paths (kept one release) give the very objects of their new homes."""

import importlib

import pytest

MOVED = {
    "merge": "loradar_cli.jobs.merge",
    "trim": "loradar_cli.jobs.trim",
    "ensemble": "loradar_cli.jobs.ensemble_vote",
    "identify": "loradar_cli.jobs.identify",
    "members": "loradar_cli.members",
}


@pytest.mark.parametrize(("old", "new"), MOVED.items())
def test_old_submodule_is_the_new_module(old: str, new: str) -> None:
    assert importlib.import_module(f"loradar_cli.combine.{old}") is importlib.import_module(new)


def test_package_names_are_the_new_objects() -> None:
    import loradar_cli.combine as combine
    from loradar_cli.jobs.ensemble_vote import vote_sets
    from loradar_cli.jobs.merge import merge_adapters
    from loradar_cli.members import load_members

    assert (combine.merge_adapters, combine.vote_sets, combine.load_members) == (
        merge_adapters,
        vote_sets,
        load_members,
    )
    assert all(hasattr(combine, name) for name in combine.__all__)
