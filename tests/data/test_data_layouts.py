"""Each on-disk layout, the decode cache, atomic extraction and every bad input, on tiny generated data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from lightning_compress.data import CIFARDataModule, layouts, readers
from tests.data.cifar_fakes import CIFAR10_CLASSES, write_cifar_pickles, write_image_tree, write_tarball


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def loaded(root, tmp_path: Path, **kw) -> CIFARDataModule:
    """A DataModule after ``prepare_data`` + ``setup``, with no validation split unless asked."""
    kw = {"download": False, "val_size": 0, "cache_dir": str(tmp_path / "cache"), **kw}
    dm = CIFARDataModule(str(root), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def assert_split(dataset, images: np.ndarray, labels: list[int]) -> None:
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape[1:] == (3, 32, 32)
    assert torch.equal(dataset.images, nchw(images))
    assert dataset.labels.tolist() == labels


# ---------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_torchvision_pickles_are_read_exactly(tmp_path, dataset):
    written = write_cifar_pickles(tmp_path / "data", dataset)
    dm = loaded(tmp_path / "data", tmp_path, dataset=dataset)
    assert dm.num_classes == (10 if dataset == "cifar10" else 100)
    assert_split(dm.train_set, *written["train"])
    assert_split(dm.test_set, *written["test"])
    assert dm.classes == written["classes"]
    # Pickled batches are already arrays: nothing is cached for them.
    assert not (tmp_path / "cache").exists()


def test_fake_pickles_match_torchvisions_own_reader(tmp_path, monkeypatch):
    """The generated batches are in torchvision's exact format: torchvision reads the same pixels."""
    write_cifar_pickles(tmp_path / "data")
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    reference = tv_cifar.CIFAR10(str(tmp_path / "data"), train=True, download=False)
    dm = loaded(tmp_path / "data", tmp_path)
    assert torch.equal(dm.train_set.images, nchw(reference.data))
    assert dm.train_set.labels.tolist() == reference.targets
    assert dm.classes == reference.classes


def test_download_delegates_to_torchvision(tmp_path, monkeypatch):
    """With download=True and no data, torchvision's downloader is called (here: faked, no network)."""
    calls = []

    def fake_download(self):
        calls.append(self.root)
        write_cifar_pickles(Path(self.root))

    monkeypatch.setattr(tv_cifar.CIFAR10, "download", fake_download)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    dm = loaded(tmp_path / "data", tmp_path, download=True)
    assert calls == [str(tmp_path / "data")]
    assert len(dm.train_set) == 5 * 4


def test_png_tree_is_read_exactly_with_sorted_classes(tmp_path):
    written = write_image_tree(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "notes.txt").write_text("not a class")  # files beside classes are ignored
    (tmp_path / "tree" / "train" / "cat" / "notes.txt").write_text("not an image")
    dm = loaded(tmp_path / "tree", tmp_path)
    assert dm.classes == CIFAR10_CLASSES
    assert_split(dm.train_set, *written["train"])
    assert_split(dm.test_set, *written["test"])


def test_jpeg_tree_matches_pillow_decoding(tmp_path):
    write_image_tree(tmp_path / "tree", fmt="jpg", n_train=2, n_test=1)
    dm = loaded(tmp_path / "tree", tmp_path)
    files = sorted((tmp_path / "tree" / "train").rglob("*.jpg"))
    expected = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(dm.train_set.images, nchw(expected))
    assert dm.train_set.labels.tolist() == [i // 2 for i in range(20)]


@pytest.mark.parametrize(
    ("name", "top_folder"), [("c.tar.gz", None), ("c.tgz", "cifar10"), ("c.tar", "cifar10")]
)
def test_archive_of_tree_is_extracted_once_and_read_exactly(tmp_path, name, top_folder):
    written = write_image_tree(tmp_path / "tree")
    archive = write_tarball(tmp_path / "tree", tmp_path / name, top_folder)
    dm = loaded(archive, tmp_path)
    assert_split(dm.train_set, *written["train"])
    assert_split(dm.test_set, *written["test"])
    extracted = list((tmp_path / "cache" / "extracted").iterdir())
    assert [p.name.startswith(name) for p in extracted] == [True]  # one entry, no temporary leftovers
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 1


# ------------------------------------------------------------------------------------------ cache


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again although the cache is warm")

    monkeypatch.setattr(readers, "decode_images", fail)
    monkeypatch.setattr(layouts, "extract_archive", fail)


@pytest.mark.parametrize("archived", [False, True])
def test_second_setup_loads_the_cache_without_decoding(tmp_path, monkeypatch, archived):
    written = write_image_tree(tmp_path / "tree")
    root = write_tarball(tmp_path / "tree", tmp_path / "c.tar.gz") if archived else tmp_path / "tree"
    loaded(root, tmp_path)
    cached = list((tmp_path / "cache" / "decoded").glob("*.pt"))
    mtime = cached[0].stat().st_mtime_ns
    forbid_decoding(monkeypatch)
    dm = loaded(root, tmp_path)  # a fresh DataModule, as in a later run
    assert_split(dm.train_set, *written["train"])
    assert list((tmp_path / "cache" / "decoded").glob("*.pt")) == cached
    assert cached[0].stat().st_mtime_ns == mtime


def test_changed_tree_is_decoded_again(tmp_path):
    write_image_tree(tmp_path / "tree")
    loaded(tmp_path / "tree", tmp_path)
    extra = tmp_path / "tree" / "train" / "cat" / "9999.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(extra)
    dm = loaded(tmp_path / "tree", tmp_path)
    assert len(dm.train_set) == 31
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2


def test_cache_dir_defaults_to_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_COMPRESS_CACHE", str(tmp_path / "envcache"))
    write_image_tree(tmp_path / "tree", n_train=1, n_test=1)
    dm = CIFARDataModule(str(tmp_path / "tree"), download=False, val_size=0)
    dm.setup("fit")
    assert len(list((tmp_path / "envcache" / "decoded").glob("*.pt"))) == 1


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("keep_fraction", [0.5, 0.0])
def test_truncated_or_empty_archive_names_file_and_leaves_no_cache(tmp_path, keep_fraction):
    write_image_tree(tmp_path / "tree")
    archive = write_tarball(tmp_path / "tree", tmp_path / "c.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * keep_fraction)])
    dm = CIFARDataModule(str(archive), download=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"cannot extract archive .*c\.tar\.gz.*corrupt or truncated"):
        dm.prepare_data()
    leftovers = [p for p in (tmp_path / "cache").rglob("*")] if (tmp_path / "cache").exists() else []
    assert [p for p in leftovers if p.is_file() or p.name != "extracted"] == []


def test_garbage_file_with_archive_name_is_a_corrupt_archive(tmp_path):
    archive = tmp_path / "c.tar.gz"
    archive.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="c.tar.gz"):
        loaded(archive, tmp_path)


def test_archive_without_train_and_test_is_rejected(tmp_path):
    write_image_tree(tmp_path / "tree")
    archive = write_tarball(tmp_path / "tree", tmp_path / "c.tar", top_folder="a/b")
    with pytest.raises(ValueError, match=r"c\.tar holds no 'train/' and 'test/' folders"):
        loaded(archive, tmp_path)


@pytest.mark.parametrize("missing", ["nothing_here", "empty_dir", "data.tar.gz"])
def test_missing_root_names_path_and_the_three_layouts(tmp_path, missing):
    root = tmp_path / missing
    if missing == "empty_dir":
        root.mkdir()
    dm = CIFARDataModule(str(root), download=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(root) in message
    if missing != "data.tar.gz":
        assert "cifar-10-batches-py" in message and "ImageFolder" in message and ".tar.gz" in message


def test_class_count_must_match_dataset(tmp_path):
    write_image_tree(tmp_path / "tree", classes=["cat", "dog", "frog"])
    expected = r"train has 3 classes \(cat, dog, frog\) but dataset='cifar10' has 10"
    with pytest.raises(ValueError, match=expected):
        loaded(tmp_path / "tree", tmp_path)
    with pytest.raises(ValueError, match="has 3 classes .* but dataset='cifar100' has 100"):
        loaded(tmp_path / "tree", tmp_path, dataset="cifar100")


def test_cached_tree_is_still_checked_against_the_dataset(tmp_path):
    write_image_tree(tmp_path / "tree", n_train=1, n_test=1)
    loaded(tmp_path / "tree", tmp_path)
    with pytest.raises(ValueError, match="has 10 classes .* but dataset='cifar100' has 100"):
        loaded(tmp_path / "tree", tmp_path, dataset="cifar100")


def test_train_and_test_classes_must_agree(tmp_path):
    write_image_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "truck").rename(tmp_path / "tree" / "test" / "lorry")
    expected = r"different class folders \(in only one of them: \['lorry', 'truck'\]"
    with pytest.raises(ValueError, match=expected):
        loaded(tmp_path / "tree", tmp_path)


def test_image_of_wrong_size_is_named_unless_resize(tmp_path):
    write_image_tree(tmp_path / "tree", n_train=1, n_test=1)
    odd = tmp_path / "tree" / "train" / "dog" / "0000.png"
    Image.new("RGB", (40, 36), (10, 200, 30)).save(odd)
    with pytest.raises(ValueError, match=rf"image {odd} is 40x36, not 32x32; pass resize=True"):
        loaded(tmp_path / "tree", tmp_path)
    dm = loaded(tmp_path / "tree", tmp_path, resize=True)
    dog = dm.train_set.images[dm.classes.index("dog")]
    assert dog.shape == (3, 32, 32)
    assert dog[:, 5, 5].tolist() == [10, 200, 30]  # a uniform image stays uniform after resizing


def test_undecodable_image_is_named(tmp_path):
    write_image_tree(tmp_path / "tree", n_train=1, n_test=1)
    bad = tmp_path / "tree" / "test" / "cat" / "0000.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"cannot decode image {bad}"):
        loaded(tmp_path / "tree", tmp_path)


def test_corrupt_pickle_is_named(tmp_path):
    write_cifar_pickles(tmp_path / "data")
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR pickle batch"):
        loaded(tmp_path / "data", tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "svhn"}, r"dataset must be one of \['cifar10', 'cifar100'\], got 'svhn'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"val_size": -1}, "val_size must be an integer >= 0, got -1"),
        ({"num_workers": 1.5}, "num_workers must be an integer >= 0, got 1.5"),
        ({"eval_batch_size": 0}, "eval_batch_size must be an integer >= 1, got 0"),
        ({"seed": True}, "seed must be an integer >= 0, got True"),
        ({"resize": "yes"}, "resize must be True or False, got 'yes'"),
        ({"root": ""}, "root must be a non-empty path"),
    ],
)
def test_invalid_arguments_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFARDataModule(**{"root": "data", **kwargs})


def test_val_size_must_leave_training_images(tmp_path):
    write_cifar_pickles(tmp_path / "data")
    with pytest.raises(ValueError, match="val_size must be smaller than the 20 training images, got 20"):
        loaded(tmp_path / "data", tmp_path, val_size=20)
