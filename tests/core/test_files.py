"""Atomic writes: the file appears whole under its final name, or not at all."""

import io
import os
import stat
import zipfile

import pytest
import torch

from lightning_compress.core.files import atomic_path, write_text_atomic, write_zip_deflated


def test_success_leaves_only_the_file_with_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "done")
    assert target.read_text() == "done"
    assert os.listdir(tmp_path / "sub") == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_torch_archives_are_named_after_the_final_file(tmp_path):
    target = tmp_path / "weights.pt"
    with atomic_path(target) as tmp:
        torch.save({"w": torch.ones(2)}, tmp)
    roots = {name.split("/")[0] for name in zipfile.ZipFile(target).namelist()}
    assert roots == {"weights"}
    assert torch.equal(torch.load(target)["w"], torch.ones(2))


def test_deflated_torch_archive_loads_the_same_and_is_smaller(tmp_path):
    state = {"w": torch.zeros(4096), "step": 3}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    target = tmp_path / "sub" / "state.pt"
    write_zip_deflated(buffer.getvalue(), target)
    assert os.listdir(tmp_path / "sub") == ["state.pt"]
    with zipfile.ZipFile(target) as written, zipfile.ZipFile(buffer) as original:
        assert written.namelist() == original.namelist()
        assert {record.compress_type for record in written.infolist()} == {zipfile.ZIP_DEFLATED}
    assert target.stat().st_size < len(buffer.getvalue()) / 10
    loaded = torch.load(target)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
