"""relay.durable: the write-fsync-rename sequence, in the order each caller asks for (the fsynced
file is named through /proc, so the test sees which name it had when it was synced)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay import durable
from relay.gateways.maildir import write_maildir


@pytest.mark.parametrize(("before", "after"), [(False, True), (True, True), (True, False), (False, False)])
def test_commit_fsyncs_where_asked(tmp_path: Path, synced: list[str], before: bool, after: bool) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tmp, middle, final = tmp_path / "t", tmp_path / "a" / "x", tmp_path / "b" / "x"
    durable.commit(
        tmp, b"data", (middle, final), fsync_before_rename=before, fsync_after_rename=after, mtime=5.0
    )
    assert synced == [str(tmp)] * before + [str(final)] * after
    assert final.read_bytes() == b"data" and final.stat().st_mtime == 5.0
    assert not tmp.exists() and not middle.exists()


def test_commit_removes_the_temporary_file_when_the_rename_fails(tmp_path: Path) -> None:
    tmp = tmp_path / "t"
    with pytest.raises(FileNotFoundError):
        durable.commit(
            tmp, b"x", (tmp_path / "missing" / "x",), fsync_before_rename=True, fsync_after_rename=True
        )
    assert list(tmp_path.iterdir()) == []


def test_commit_never_overwrites_an_existing_temporary_name(tmp_path: Path) -> None:
    tmp = tmp_path / "t"
    tmp.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        durable.commit(tmp, b"x", (tmp_path / "x",), fsync_before_rename=False, fsync_after_rename=False)
    assert not (tmp_path / "x").exists()
    assert tmp.read_bytes() == b"someone else's"


def test_a_maildir_copy_is_synced_before_its_rename_then_its_directory(
    tmp_path: Path, synced: list[str]
) -> None:
    folder = tmp_path / "box"
    write_maildir(folder, b"x", "host")  # creates the folder (its own directory fsyncs)
    synced.clear()
    stored = write_maildir(folder, b"Subject: hi\n\nbody\n", "host")
    assert synced == [str(folder / "tmp" / stored.name), str(folder / "new")]
    assert stored.read_bytes() == b"Subject: hi\n\nbody\n"
    assert os.listdir(folder / "tmp") == []


def test_commit_writes_parts_in_order_through_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header and a body go out with writev, never joined first; a writev that writes less
    than asked (as the kernel may) is continued where it stopped, across part boundaries."""
    real = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return real(fd, [b"".join(buffers)[:5]])  # what the kernel may do: a prefix, here 5 bytes

    monkeypatch.setattr(durable.os, "writev", short_writev)
    parts = (b"MRQ1 {header}\n", b"", b"the body", b"!")
    durable.commit(
        tmp_path / "t", parts, (tmp_path / "x",), fsync_before_rename=False, fsync_after_rename=False
    )
    assert (tmp_path / "x").read_bytes() == b"".join(parts)
    assert len(calls) > 3
