"""write_atomically: the old file or the new one, never half of either, and no temp file left behind."""

from __future__ import annotations

import os
import stat

import pytest

from beear_jax.io.atomic_file import is_temp_of, write_atomically


def test_writes_text_as_utf8_and_bytes_as_is_readable_by_others(tmp_path):
    target = tmp_path / "report.md"
    write_atomically(target, "größe ✓\n")
    assert target.read_bytes() == "größe ✓\n".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    target.chmod(0o600)  # the user's choice is kept
    write_atomically(target, b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "shared" / "config.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "config.json"
    link.symlink_to(real)
    write_atomically(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_temp_files_are_recognised_by_their_target():
    assert is_temp_of(".config.json.k2j3h4.tmp", ["metrics.jsonl", "config.json"])
    assert not is_temp_of(".config.json.k2j3h4.tmp", ["metrics.jsonl"])
    assert not is_temp_of("config.json", ["config.json"]) and not is_temp_of(".notes.tmp", ["config.json"])


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failure_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the new file is being written

    monkeypatch.setattr(os, failing, interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_missing_directory_is_an_error_not_a_new_tree(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "nowhere" / "file.json", "{}")
    assert not (tmp_path / "nowhere").exists()
