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


def test_new_files_and_folders_follow_the_umask(tmp_path):
    import os
    import stat

    from loradar_cli.files import make_temp_dir, write_new_file

    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "set.safetensors") as tmp:
            tmp.write_bytes(b"x")
        folder = make_temp_dir(tmp_path, ".tmp-x-")
        write_new_file(folder / "f", b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "set.safetensors").stat().st_mode) == 0o640  # mkstemp alone gives 0600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750  # mkdtemp alone gives 0700
    assert stat.S_IMODE((folder / "f").stat().st_mode) == 0o640


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    from loradar_cli.files import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "which").read_text() == "b" and (b / "which").read_text() == "a"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from loradar_cli.files import _host, remove_orphans

    target = tmp_path / "pgd.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited: its id is free (or reused by a live one: then kept)
    orphan = tmp_path / f".{target.name}.abc123.{_host()}.{dead_pid}.part"
    live = tmp_path / f".{target.name}.def456.{_host()}.{os.getpid()}.part"
    elsewhere = tmp_path / f".{target.name}.ghi789.another-machine.{dead_pid}.part"
    unrelated = tmp_path / f".other.safetensors.jkl.{_host()}.{dead_pid}.part"
    for path in (orphan, live, elsewhere, unrelated):
        path.write_text("half")
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(f".{_host()}.{os.getpid()}.part")
        tmp.write_text("done")
    assert target.read_text() == "done"
    left = {p.name for p in tmp_path.iterdir()}
    alive_again = orphan.name in left  # only if the dead process's id was handed to a new process meanwhile
    assert left == {target.name, live.name, elsewhere.name, unrelated.name} | ({orphan.name} if alive_again else set())
    assert remove_orphans(target) == []  # nothing else to remove: the live writer's file stays
