import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.distillation import IndexedDataset, KnowledgeDistillation, distillation_loss
from lightning_compress.module import ImageClassifier
from tests.toy import ToyConvNet, UserClassifier, random_images, random_loader


def _trainer(callbacks, **kw) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    options.update(kw)
    return pl.Trainer(callbacks=callbacks, **options)


class Recorder(pl.Callback):
    """Keeps the step outputs and the logged distill/* values of every training batch."""

    def __init__(self):
        self.losses, self.metrics = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("distill/")})


class CountingTeacher(nn.Module):
    """A teacher that records the inputs it is called with."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.net = ToyConvNet(num_classes)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.net(x)


def test_loss_is_the_mix_of_task_and_kd_loss():
    student = UserClassifier(lr=0.0)  # lr=0: weights stay as they are, so the loss can be recomputed
    teacher = ToyConvNet()
    rec = Recorder()
    kd = KnowledgeDistillation(teacher, temperature=3.0, alpha=0.7)
    loader = random_loader(32, batch_size=16)
    _trainer([kd, rec], max_steps=2).fit(student, loader)
    student.eval()
    for (x, y), loss, logged in zip(loader, rec.losses, rec.metrics):
        s_logits = student.net.train()(x)  # training-mode BN, as in the step (lr=0, BN stats only)
        t_logits = teacher(x)
        task = F.cross_entropy(s_logits, y)
        kd_loss = distillation_loss(s_logits, t_logits, 3.0)
        assert loss.item() == pytest.approx((0.3 * task + 0.7 * kd_loss).item(), rel=1e-4)
        assert logged["distill/kd_loss"] == pytest.approx(kd_loss.item(), rel=1e-4)
        assert logged["distill/task_loss"] == pytest.approx(task.item(), rel=1e-4)
        agreement = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean().item()
        assert logged["distill/agreement"] == pytest.approx(agreement)
        assert logged["distill/alpha"] == pytest.approx(0.7)


class NoisyUser(UserClassifier):
    """Augments inside training_step with fresh random noise each call."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x + torch.randn_like(x)), y)


def test_teacher_sees_exactly_the_augmented_input_and_wrapper_is_removed():
    student, teacher = NoisyUser(), CountingTeacher()
    seen = []
    student.net.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()) if m.training else None)
    _trainer([KnowledgeDistillation(teacher)], max_steps=3).fit(student, random_loader(48, batch_size=16))
    assert len(teacher.inputs) == 3
    for t_in, s_in in zip(teacher.inputs, seen):
        assert torch.equal(t_in, s_in)
    assert "training_step" not in student.__dict__
    assert len(student.net._forward_hooks) == 1  # only the test's own hook is left


def test_distillation_pulls_student_to_teacher():
    teacher = ToyConvNet()
    student = UserClassifier(lr=0.05)
    rec = Recorder()
    loader = random_loader(64, batch_size=16, shuffle=True)
    _trainer([KnowledgeDistillation(teacher, alpha=1.0, temperature=2.0), rec], max_epochs=6).fit(student, loader)
    first, last = rec.metrics[0]["distill/kd_loss"], rec.metrics[-1]["distill/kd_loss"]
    assert last < 0.5 * first


def test_checkpoint_has_no_teacher_and_dict_outputs_work(tmp_path):
    class DictUser(UserClassifier):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": torch.tensor(1.0)}

    student, rec = DictUser(), Recorder()
    trainer = _trainer([KnowledgeDistillation(ImageClassifier("resnet20", num_classes=4)), rec], max_steps=2)
    trainer.fit(student, random_loader(32, batch_size=16))
    assert rec.metrics[-1]["distill/kd_loss"] > 0
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    checkpoint = torch.load(tmp_path / "student.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == set(UserClassifier().state_dict())
    assert not any(isinstance(v, torch.Tensor) for s in checkpoint["callbacks"].values() for v in s.values())
    UserClassifier.load_from_checkpoint(tmp_path / "student.ckpt")  # loads into the plain class


def test_image_classifier_student_network_detected():
    student = ImageClassifier("resnet20", num_classes=4, lr=0.01)
    rec = Recorder()
    _trainer([KnowledgeDistillation(ToyConvNet(), temperature=2.0), rec], max_steps=2).fit(
        student, random_loader(32, batch_size=16)
    )
    assert len(rec.metrics) == 2 and rec.metrics[-1]["distill/kd_loss"] > 0


def test_alpha_schedule_reaches_final_value():
    rec = Recorder()
    kd = KnowledgeDistillation(ToyConvNet(), alpha=1.0, final_alpha=0.0, alpha_schedule="linear")
    _trainer([kd, rec], max_steps=4).fit(UserClassifier(), random_loader(64, batch_size=16))
    assert [m["distill/alpha"] for m in rec.metrics] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_shape_mismatch_fails_before_any_optimizer_step():
    student = UserClassifier()
    before = copy.deepcopy(student.state_dict())
    trainer = _trainer([KnowledgeDistillation(ToyConvNet(num_classes=10))], max_steps=2)
    with pytest.raises(ValueError, match=r"teacher logits shape \(16, 10\) != student logits shape \(16, 4\)"):
        trainer.fit(student, random_loader(32, batch_size=16))
    assert trainer.global_step == 0
    for name, value in student.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, before[name]), name
    assert "training_step" not in student.__dict__


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\], got -0.1"),
        ({"temperature": 0}, "temperature must be a number > 0, got 0"),
        ({"temperature": -2.0}, "temperature must be a number > 0"),
        ({"alpha_schedule": "step", "final_alpha": 0.1}, "alpha_schedule must be one of"),
        ({"alpha_schedule": "linear"}, "final_alpha goes with"),
        ({"final_alpha": 0.1}, "final_alpha goes with"),
        ({"final_alpha": 2.0, "alpha_schedule": "cosine"}, r"final_alpha must be in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KnowledgeDistillation(ToyConvNet(), **kwargs)


def test_missing_and_unreadable_checkpoint_fail_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        KnowledgeDistillation(str(tmp_path / "missing.ckpt"))
    (tmp_path / "bad.ckpt").write_text("garbage")
    with pytest.raises(ValueError, match="cannot read teacher checkpoint"):
        KnowledgeDistillation("resnet56", checkpoint=str(tmp_path / "bad.ckpt"))


def test_contract_violations_fail_clearly():
    class TwoForwards(UserClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y) + F.cross_entropy(self(x.flip(3)), y)

    with pytest.raises(RuntimeError, match="called exactly once per training_step, it was called 2 times"):
        _trainer([KnowledgeDistillation(ToyConvNet())], max_steps=1).fit(TwoForwards(), random_loader(16))

    class TupleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ToyConvNet()

        def forward(self, x):
            return self.inner(x), x.mean()

    class TupleUser(UserClassifier):
        def __init__(self):
            super().__init__()
            self.net = TupleNet()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0])[0], batch[1])

    with pytest.raises(TypeError, match="returned tuple, KnowledgeDistillation needs it to return a tensor"):
        _trainer([KnowledgeDistillation(ToyConvNet())], max_steps=1).fit(TupleUser(), random_loader(16))

    class Manual(UserClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="needs automatic optimization"):
        _trainer([KnowledgeDistillation(ToyConvNet())], max_steps=1).fit(Manual(), random_loader(16))

    with pytest.raises(ValueError, match="network attribute 'backbone' is not a submodule"):
        _trainer([KnowledgeDistillation(ToyConvNet(), network="backbone")], max_steps=1).fit(
            UserClassifier(), random_loader(16))

    with pytest.raises(ValueError, match="KnowledgeDistillation and KnowledgeDistillation each changes the loss"):
        _trainer([KnowledgeDistillation(ToyConvNet()), KnowledgeDistillation(ToyConvNet())], max_steps=1).fit(
            UserClassifier(), random_loader(16))


class SwapNetwork(pl.Callback):
    """Replaces the student network object mid-run, as QAT does with its GraphModule."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            pl_module.net = copy.deepcopy(pl_module.net)
            trainer.strategy.setup_optimizers(trainer)


def test_hook_follows_a_replaced_network():
    student, rec = UserClassifier(), Recorder()
    original = student.net
    _trainer([SwapNetwork(), KnowledgeDistillation(ToyConvNet()), rec], max_steps=3).fit(
        student, random_loader(48, batch_size=16))
    assert student.net is not original and len(rec.metrics) == 3
    assert not student.net._forward_hooks and not original._forward_hooks


def test_logit_cache_reuses_teacher_outputs_and_matches_online():
    kd_losses = {}
    for cache in (False, True):
        torch.manual_seed(1)
        teacher, student, rec = CountingTeacher(), UserClassifier(lr=0.0), Recorder()
        kd = KnowledgeDistillation(teacher, cache_logits=cache)
        data = IndexedDataset(random_images(32)) if cache else random_images(32)
        loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
        _trainer([kd, rec], max_epochs=3).fit(student, loader)
        kd_losses[cache] = [m["distill/kd_loss"] for m in rec.metrics]
        # 4 batches per epoch: online = 12 teacher calls; cached = 4 (epoch 1) + 1 (check at the first hit)
        assert len(teacher.inputs) == (5 if cache else 12)
        assert len(kd.cache) == (32 if cache else 0)
    assert kd_losses[True] == pytest.approx(kd_losses[False], rel=1e-5)


def test_logit_cache_detects_random_augmentation_and_missing_indices():
    kd = KnowledgeDistillation(ToyConvNet(), cache_logits=True)
    with pytest.raises(RuntimeError, match="changed since they were cached.*random augmentation"):
        _trainer([kd], max_epochs=2).fit(NoisyUser(), DataLoader(IndexedDataset(random_images(16)), batch_size=8))
    with pytest.raises(ValueError, match="wrap the training dataset in .*IndexedDataset"):
        _trainer([KnowledgeDistillation(ToyConvNet(), cache_logits=True)], max_steps=1).fit(
            UserClassifier(), random_loader(16))
