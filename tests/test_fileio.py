"""Atomic writes: the order that makes them survive a crash (the file's bytes reach the disk,
then the rename, then the folder's entry), and a failed write leaves the old file alone."""

import os
import stat

import pytest

from xpcnn import fileio


@pytest.fixture
def recorded(monkeypatch):
    """Every fsync (of a file or a folder) and rename, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(os.name == "nt", reason="folders cannot be fsync'ed on Windows")
def test_file_is_synced_then_renamed_then_its_folder_synced(tmp_path, recorded):
    target = tmp_path / "history.json"
    fileio.atomic_write_text(target, "new")
    assert recorded == ["fsync file", "replace", "fsync folder"]
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]      # no temporary file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, recorded):
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with fileio.atomic_write(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert "replace" not in recorded
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]
