"""files.atomic_path: the target appears only complete, and a failed write leaves nothing behind."""

import pytest

from loradar_cli.files import atomic_path


def test_success_replaces_the_target_and_failure_leaves_it_untouched(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists() and tmp.parent == target.parent
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary file left
