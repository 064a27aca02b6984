"""Atomic writes: the order that makes them survive a crash (the file's bytes reach the disk,
then the rename, then the folder's entry), and a failed write leaves the old file alone."""

import errno
import os
import re
import secrets
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


def test_temporary_file_is_a_short_hidden_name_next_to_the_target_with_the_usual_mode(tmp_path, monkeypatch):
    """``.<name>.<12 hex digits>.tmp`` in the target's folder (short: a long target name still
    fits the file-name limit), created with mode 0o666 minus the umask like any new file."""
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.path.basename(src), stat.S_IMODE(os.stat(src).st_mode)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    old_umask = os.umask(0o022)
    try:
        fileio.atomic_write_text(tmp_path / "report.csv", "a,b\n")
    finally:
        os.umask(old_umask)
    [(name, mode)] = seen
    assert re.fullmatch(r"\.report\.csv\.[0-9a-f]{12}\.tmp", name), name
    assert mode == 0o644, oct(mode)
    assert stat.S_IMODE(os.stat(tmp_path / "report.csv").st_mode) == 0o644


def test_an_existing_temporary_name_is_never_reused(tmp_path, monkeypatch):
    """The temporary file is created exclusively: a name already there (another writer's) is
    skipped, its bytes left alone, and the next random name tried."""
    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes: next(names))
    other = tmp_path / ".model.npz.aaaaaaaaaaaa.tmp"
    other.write_bytes(b"another writer's")
    fileio.atomic_write_text(tmp_path / "model.npz", "mine")
    assert other.read_bytes() == b"another writer's"
    assert (tmp_path / "model.npz").read_text() == "mine"


def test_no_free_temporary_name_after_a_hundred_tries_is_file_exists(tmp_path, monkeypatch):
    tries = []
    monkeypatch.setattr(secrets, "token_hex", lambda nbytes: tries.append(nbytes) or "cccccccccccc")
    (tmp_path / ".model.npz.cccccccccccc.tmp").write_bytes(b"")
    with pytest.raises(FileExistsError) as caught:
        fileio.atomic_write_text(tmp_path / "model.npz", "mine")
    assert len(tries) == 100
    assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (
        errno.EEXIST, "could not create a unique temporary file", str(tmp_path))
    assert not (tmp_path / "model.npz").exists()


@pytest.mark.skipif(os.name == "nt", reason="folders cannot be fsync'ed on Windows")
def test_folder_fsync_ignores_only_the_errors_of_folders_that_cannot_be_synced(tmp_path, monkeypatch):
    """A file system that cannot fsync a folder (EINVAL and the like) is not an error; a real
    I/O error is raised, not swallowed."""
    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", failing(errno.EINVAL))
    fileio.fsync_directory(tmp_path)
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError) as caught:
        fileio.fsync_directory(tmp_path)
    assert caught.value.errno == errno.EIO
