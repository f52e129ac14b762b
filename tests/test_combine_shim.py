"""The old `loradar_cli.combine` import paths (kept one release) give the very objects of their new homes."""

import importlib

import pytest

MOVED = {
    "merge": "loradar_cli.jobs.merge",
    "trim": "loradar_cli.jobs.trim",
    "ensemble": "loradar_cli.jobs.ensemble_vote",
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


def test_old_identify_module_holds_the_objects_of_its_three_new_homes() -> None:
    """combine.identify was split into jobs.identify, jobs.fit_identifier and identifier: every old name still
    resolves, to the very object of its new module."""
    from loradar_cli.combine import identify as old
    from loradar_cli.identifier import load_identifier
    from loradar_cli.jobs.fit_identifier import fit_identifier_from_sets
    from loradar_cli.jobs.identify import identify_sets

    assert (old.load_identifier, old.fit_identifier_from_sets, old.identify_sets) == (
        load_identifier,
        fit_identifier_from_sets,
        identify_sets,
    )
    assert importlib.import_module("loradar_cli.combine.identify") is old
