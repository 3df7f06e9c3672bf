import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress.distillation.teacher import FrozenTeacher, load_teacher
from lightning_compress.models import create_model
from lightning_compress.module import ImageClassifier
from tests.toy import ToyConvNet, UserClassifier


def _save_lightning_checkpoint(module: pl.LightningModule, path) -> str:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return str(path)


def test_module_teacher_is_frozen_and_not_trainable():
    net = ToyConvNet()
    teacher = FrozenTeacher(load_teacher(net))
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    out = teacher(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 4) and not out.requires_grad
    net.train()  # a user flipping the module back is undone at the next call
    teacher(torch.randn(2, 3, 16, 16))
    assert not net.training


def test_bf16_precision_casts_weights_and_inputs():
    teacher = FrozenTeacher(ToyConvNet(), precision="bf16")
    assert next(teacher.module.parameters()).dtype == torch.bfloat16
    assert teacher(torch.randn(2, 3, 16, 16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="teacher_precision must be one of"):
        FrozenTeacher(ToyConvNet(), precision="8")


def test_image_classifier_checkpoint_rebuilt_from_hparams(tmp_path):
    clf = ImageClassifier("resnet20", num_classes=5)
    path = _save_lightning_checkpoint(clf, tmp_path / "teacher.ckpt")
    teacher = load_teacher(path)
    assert isinstance(teacher, ImageClassifier) and teacher.hparams.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    clf.eval()
    teacher.eval()
    torch.testing.assert_close(teacher(x), clf(x))


def test_any_lightning_module_class_path(tmp_path):
    user = UserClassifier(num_classes=3)
    path = _save_lightning_checkpoint(user, tmp_path / "user.ckpt")
    teacher = load_teacher(path, teacher_class="tests.toy.UserClassifier")
    assert isinstance(teacher, UserClassifier)
    torch.testing.assert_close(teacher.net.fc.weight, user.net.fc.weight)
    with pytest.raises(ValueError, match="teacher_class 'tests.toy.Nope' cannot be imported"):
        load_teacher(path, teacher_class="tests.toy.Nope")
    with pytest.raises(ValueError, match="must name a LightningModule class"):
        load_teacher(path, teacher_class="tests.toy.ToyConvNet")


def test_zoo_name_with_lightning_checkpoint_and_plain_state_dict(tmp_path):
    clf = ImageClassifier("resnet20", num_classes=7)
    path = _save_lightning_checkpoint(clf, tmp_path / "clf.ckpt")
    teacher = load_teacher("resnet20", checkpoint=path)
    assert not isinstance(teacher, pl.LightningModule)
    torch.testing.assert_close(teacher.state_dict(), clf.model.state_dict())  # num_classes=7 from hparams

    net = create_model("resnet20", num_classes=10)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    teacher = load_teacher("resnet20", checkpoint=str(tmp_path / "plain.pt"))
    torch.testing.assert_close(teacher.state_dict(), net.state_dict())

    with pytest.raises(ValueError, match="do not fit the teacher network"):
        load_teacher("resnet56", checkpoint=path)
    with pytest.raises(ValueError, match="pass checkpoint=<path>"):
        load_teacher("resnet56")


def test_missing_and_unreadable_checkpoints(tmp_path):
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.ckpt.*neither an existing checkpoint file nor a zoo"):
        load_teacher(missing)
    with pytest.raises(FileNotFoundError, match="nope.ckpt' does not exist"):
        load_teacher("resnet20", checkpoint=missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot rebuild the teacher ImageClassifier from checkpoint"):
        load_teacher(str(garbage))
    with pytest.raises(ValueError, match="cannot read teacher checkpoint"):
        load_teacher("resnet20", checkpoint=str(garbage))
    with pytest.raises(ValueError, match="teacher must be an nn.Module"):
        load_teacher(3)  # type: ignore[arg-type]


def test_module_plus_checkpoint_loads_weights(tmp_path):
    src = nn.Linear(3, 2)
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.ckpt")
    dst = load_teacher(nn.Linear(3, 2), checkpoint=str(tmp_path / "w.ckpt"))
    torch.testing.assert_close(dst.weight, src.weight)
