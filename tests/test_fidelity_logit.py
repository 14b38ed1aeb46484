"""KD and DKD as ``kdlight-train experiment=zoo_distill pair=... distiller=kd|dkd`` runs them
equal the official code (mdistiller), step for step and over a short run.

The official wiring is written here from mdistiller's code (never imported: the comments cite
its file and line), and run on the official architectures (:mod:`tests.official.models`)
holding the same weights as kdlight's zoo models:

- one step, on a 3-stage pair (resnet56 -> resnet20) and a 4-stage pair (vgg13 -> vgg8): each
  loss part, the total and the gradient of every student parameter, DKD at three points of
  its warm-up;
- a whole Lightning run of 24 steps over 3 epochs (the learning rate decayed and DKD's
  warm-up weight moved at the epoch boundaries) against a plain loop written the way
  mdistiller's trainer is, on the very batches (order and crops) the Lightning run trained on:
  every step moves the student as the official step does.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning import Callback, Trainer
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdlight.lit import ClassifierModule, DistillationModule
from kdlight.models import create_model
from kdlight.models.published import official_names
from kdlight.models.registry import build_model
from kdlight.train import train
from tests.conftest import compose_config
from tests.official.models import official_copy_of

#: pair: (teacher, student, DKD's beta in mdistiller configs/cifar100/dkd/<pair>.yaml:19)
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20", 2.0),  # res56_res20.yaml
    "vgg13_vgg8": ("vgg13", "vgg8", 6.0),  # vgg13_vgg8.yaml
}
BATCH = 8
#: The relative tolerance of every comparison. float32 rounding of the two programs stays
#: below it: measured, the parts differ by up to 8.4e-6 (DKD's TCKD, a KL divergence of two
#: 2-class distributions that cancels most where they are close: with labels the teacher
#: never predicts it is about 0.03, and the two forms differed by 4.5e-5) and the gradients
#: by up to 2.3e-6, relative to their tensor's largest entry.
RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the official code
# mdistiller mdistiller/engine/cfg.py:61-64 (KD) and :162-167 (DKD): the defaults its
# CIFAR-100 configs keep (configs/cifar100/kd.yaml and dkd/*.yaml set only DKD.BETA).
OFFICIAL_KD = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
OFFICIAL_DKD = {"ce_weight": 1.0, "alpha": 1.0, "temperature": 4.0, "warmup": 20}
# mdistiller engine/cfg.py:41-48 with configs/cifar100/*.yaml's SOLVER (LR 0.05, momentum
# 0.9, weight decay 5e-4, decay rate 0.1); the stages are the test's own (see below).
OFFICIAL_SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def official_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float) -> Tensor:
    """mdistiller distillers/KD.py:8-13."""
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


def official_dkd_parts(
    logits_student: Tensor, logits_teacher: Tensor, target: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """TCKD and NCKD of mdistiller distillers/DKD.py:8-32 with its masks, lines 35-51
    (``dkd_loss`` returns ``alpha * tckd_loss + beta * nckd_loss``, line 32).
    ``size_average=False`` there is the deprecated spelling of ``reduction="sum"``."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t: Tensor) -> Tensor:  # DKD.py:47-51
        t1 = (t * gt_mask).sum(dim=1, keepdims=True)
        t2 = (t * other_mask).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return tckd_loss, nckd_loss


def official_forward_train(
    method: str, logits_student: Tensor, logits_teacher: Tensor, target: Tensor, **settings
) -> dict[str, Tensor]:
    """``losses_dict`` of mdistiller's ``forward_train`` (KD.py:25-39, DKD.py:65-84), with
    the parts before their weights beside it. ``epoch`` is mdistiller's, counted from 1
    (engine/trainer.py:78-87); ``beta`` DKD's for the pair."""
    ce = F.cross_entropy(logits_student, target)
    if method == "kd":
        kd = official_kd_loss(logits_student, logits_teacher, OFFICIAL_KD["temperature"])
        return {
            "loss_ce": OFFICIAL_KD["ce_weight"] * ce,
            "loss_kd": OFFICIAL_KD["kd_weight"] * kd,
            "ce": ce,
            "kd": kd,
        }
    tckd, nckd = official_dkd_parts(
        logits_student, logits_teacher, target, OFFICIAL_DKD["temperature"]
    )
    dkd = OFFICIAL_DKD["alpha"] * tckd + settings["beta"] * nckd
    warmup = min(settings["epoch"] / OFFICIAL_DKD["warmup"], 1.0)
    return {
        "loss_ce": OFFICIAL_DKD["ce_weight"] * ce,
        "loss_kd": warmup * dkd,
        "ce": ce,
        "tckd": tckd,
        "nckd": nckd,
    }


def official_total(losses: dict[str, Tensor]) -> Tensor:
    """What mdistiller back-propagates: engine/trainer.py:167, the sum of the weighted losses."""
    return sum(losses[key].mean() for key in ("loss_ce", "loss_kd"))


def official_lr(epoch: int, stages: list[int], lr: float = 0.05, rate: float = 0.1) -> float:
    """mdistiller engine/utils.py:72-79 (``adjust_learning_rate``), ``epoch`` counted from 1."""
    steps = np.sum(epoch > np.asarray(stages))
    return lr * (rate**steps) if steps > 0 else lr


# ------------------------------------------------------------------ kdlight, as the CLI builds it
def zoo_config(pair: str, method: str, tmp_path: Path, *overrides: str) -> DictConfig:
    """``kdlight-train experiment=zoo_distill pair=PAIR distiller=METHOD`` on the CPU."""
    command = ["experiment=zoo_distill", f"pair={pair}", f"distiller={method}", "trainer=cpu"]
    return compose_config([*command, *overrides], tmp_path)


def kdlight_module(cfg: DictConfig) -> DistillationModule:
    """The DistillationModule kdlight-train builds from ``cfg`` (kdlight.train.build_module),
    with a teacher of ``distill.teacher_model`` given as a module instead of a checkpoint,
    both models' logits spread as a trained network's (:func:`spread_logits`), and a Trainer
    attached so that ``training_step`` runs as in a fit (the epoch it reads is the
    Trainer's)."""
    torch.manual_seed(0)
    teacher = create_model(cfg.distill.teacher_model, num_classes=cfg.num_classes)
    module = instantiate(
        cfg.module,
        _convert_="partial",
        model=build_model(OmegaConf.to_container(cfg.model, resolve=True)),
        teacher=teacher,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
    )
    module.trainer = Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    module.train()
    spread_logits(module.teacher, fixed_batch()[0], 3.0)
    spread_logits(module.model, fixed_batch()[0], 1.5)
    return module


@torch.no_grad()
def spread_logits(model: nn.Module, images: Tensor, std: float) -> nn.Module:
    """Scale ``model``'s last linear layer so that its logits on ``images``, in its present
    mode, have standard deviation ``std``. Freshly initialised, the zoo's networks give
    logits far from a trained one's few units (resnet56 in eval mode about 6,000: a one-hot
    teacher; vgg8 and vgg13 about 0.01: a KL that is float32 rounding of nearly equal
    terms); a comparison there would test neither."""
    factor = std / model(images).std().item()
    last = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
    last.weight.mul_(factor)
    if last.bias is not None:
        last.bias.mul_(factor)
    return model


def fixed_batch(num_classes: int = 100) -> tuple[Tensor, Tensor]:
    """CIFAR-sized normalised images and fixed labels."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    return images, torch.arange(BATCH) * 7 % num_classes


def assert_close(actual: Tensor, expected: Tensor, what: str, rounding: float = 0.0) -> None:
    """Equal to RTOL of the expected tensor's largest entry (plus ``rounding``): an element
    near 0 (a gradient entry, say) is compared on the scale of its tensor, not on its own,
    where float32's rounding of the larger terms that cancel in it would count against it."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(
        actual.detach(),
        expected.detach(),
        rtol=RTOL,
        atol=RTOL * scale + rounding,
        msg=lambda m: f"{what}: {m}",
    )


def official_gradients(name: str, student: nn.Module) -> dict[str, Tensor]:
    """The gradients of kdlight's ``student`` under the official module names."""
    names = official_names(name, student)
    return {names[key]: parameter.grad for key, parameter in student.named_parameters()}


def assert_same_gradients(gradients: dict[str, Tensor], expected: nn.Module, where: str) -> None:
    """Every parameter's gradient equal to ``expected``'s (:func:`assert_close`), but for
    those whose exact gradient is 0: the bias of a convolution that BatchNorm follows in
    training mode (vgg's), which BatchNorm's mean subtraction cancels. float32 leaves
    rounding noise there (up to 1.7e-6 of the largest gradient entry, measured), with
    nothing to compare it to: both must be 0 to RTOL of the largest entry."""
    official = {key: parameter.grad for key, parameter in expected.named_parameters()}
    assert gradients.keys() == official.keys()
    modules = dict(expected.named_modules())
    largest = max(grad.abs().max().item() for grad in official.values())
    for key, gradient in gradients.items():
        if official[key].abs().max() <= RTOL * largest:
            owner, name = key.rsplit(".", 1)
            assert name == "bias" and isinstance(modules[owner], nn.Conv2d), f"{key}'s is 0"
            assert gradient.abs().max() <= RTOL * largest, f"{where}: {key} should be 0"
        else:
            assert_close(gradient, official[key], f"{where}: the gradient of {key}")


def compare_one_step(pair: str, method: str, tmp_path: Path, *overrides: str) -> None:
    """One kdlight training step of the composed config and the official step on copies of the
    same weights, at the start of epoch 0 and (DKD) mid-warm-up and after it: every part, the
    total and the gradient of every student parameter agree."""
    teacher_name, student_name, beta = PAIRS[pair]
    module = kdlight_module(zoo_config(pair, method, tmp_path, *overrides))
    # mdistiller's Distiller.train keeps the teacher in eval mode (_base.py:12-20)
    assert not module.teacher.training
    student = official_copy_of(student_name, module.model)
    teacher = official_copy_of(teacher_name, module.teacher).eval()
    images, labels = fixed_batch()
    with torch.no_grad():  # the teacher right on half the batch, as a trained one mostly is
        labels[::2] = module.teacher(images).argmax(1)[::2]
    # kdlight's epochs, counted from 0; DKD's warm-up weight there: 1/20, 1/2 and 1
    for epoch in [0] if method == "kd" else [0, 9, 25]:
        module.trainer.fit_loop.epoch_progress.current.completed = epoch
        module.model.zero_grad()
        parts = module.training_step((images, labels), 0)
        parts["loss"].backward()
        student.zero_grad()
        logits_student = student(images)
        with torch.no_grad():
            logits_teacher = teacher(images)
        official = official_forward_train(
            method, logits_student, logits_teacher, labels, epoch=epoch + 1, beta=beta
        )
        total = official_total(official)
        total.backward()
        where = f"{pair} {method} epoch {epoch}"
        for part in ("ce", "kd") if method == "kd" else ("ce", "tckd", "nckd"):
            assert_close(parts[part], official[part], f"{where}: {part}")
        assert_close(parts["loss"], total, f"{where}: the total")
        assert_same_gradients(official_gradients(student_name, module.model), student, where)


@pytest.mark.parametrize("method", ["kd", "dkd"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_one_step_equals_the_official_code(pair: str, method: str, tmp_path: Path):
    compare_one_step(pair, method, tmp_path)


@pytest.mark.parametrize(
    ("method", "wrong"),
    [
        ("dkd", "distiller.beta=8.0"),  # every pair's DKD before the pairs set beta (issue 19)
        ("kd", "distill.alpha=0.5"),  # another weight of the soft term than mdistiller's 0.9
    ],
)
def test_the_comparison_catches_a_setting_that_is_not_the_official_one(
    method: str, wrong: str, tmp_path: Path
):
    with pytest.raises(AssertionError, match="vgg13_vgg8"):
        compare_one_step("vgg13_vgg8", method, tmp_path, wrong)


# ------------------------------------------------------------------ the trajectory
def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class RecordSteps(Callback):
    """Keep what a run trained on and how its student moved: the teacher's weights, the
    student's before the first step, and for each step the batch as the student saw it
    (after kdlight's augmentation and normalisation), its epoch, learning rate and the
    student's weights after it; saved to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.run: dict = {"steps": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.run |= {"initial": state_of(pl_module.model), "teacher": state_of(pl_module.teacher)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        step = {"images": batch[0].clone(), "labels": batch[1].clone(), "lr": lr}
        self.run["steps"].append(step | {"epoch": trainer.current_epoch})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.run["steps"][-1]["after"] = state_of(pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.run, self.path)


#: 64 synthetic CIFAR-100 training images in batches of 8 (no validation split: the run
#: validates on 8 test images), 3 epochs: 24 steps, lr / 10 from the third epoch on.
TRAJECTORY = [
    "data.source=synthetic", "data.synthetic_train_size=64", "data.val_size=0",
    "data.synthetic_test_size=8", "data.batch_size=8", "data.eval_batch_size=8",
    "trainer.max_epochs=3", "scheduler.milestones=[2]", "test=false",
    "trainer.log_every_n_steps=8", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]  # fmt: skip
MILESTONES = [2]  # mdistiller's LR_DECAY_STAGES for the same decay (see official_lr)


@pytest.fixture(scope="module")
def resnet56_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet56 teacher checkpoint for 100 classes, as experiment=zoo_teacher writes one, at
    its zoo initialisation with its logits spread as a trained one's."""
    torch.manual_seed(1)
    teacher = create_model("resnet56", num_classes=100).eval()
    spread_logits(teacher, torch.randn(64, 3, 32, 32), 3.0)
    module = ClassifierModule(teacher, num_classes=100)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("teacher") / "last.ckpt"
    torch.save(checkpoint, path)
    return path


class OfficialTraining:
    """mdistiller's training loop (engine/trainer.py:77-110 and 153-169), one step at a
    time: SGD on the student's parameters (trainer.py:38-48, _base.py:22-24), the learning
    rate set at each epoch's start (trainer.py:93, utils.py:72-79), epochs counted from 1
    (trainer.py:78), the teacher in eval mode (_base.py:12-20)."""

    def __init__(self, method: str, student: nn.Module, teacher: nn.Module, beta: float) -> None:
        self.method, self.student, self.teacher, self.beta = method, student, teacher, beta
        self.optimizer = torch.optim.SGD(student.parameters(), **OFFICIAL_SGD)
        student.train()
        teacher.eval()

    def step(self, image: Tensor, target: Tensor, epoch: int) -> float:
        """One training step at ``epoch`` (counted from 1); returns its learning rate."""
        lr = official_lr(epoch, MILESTONES)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        logits_student = self.student(image)
        with torch.no_grad():
            logits_teacher = self.teacher(image)
        losses = official_forward_train(
            self.method, logits_student, logits_teacher, target, epoch=epoch, beta=self.beta
        )
        official_total(losses).backward()
        self.optimizer.step()
        return lr


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_a_run_moves_its_student_as_the_official_loop_does(
    method: str, tmp_path: Path, resnet56_teacher: Path
):
    """24 steps of ``kdlight-train experiment=zoo_distill pair=resnet56_resnet20`` over 3
    epochs (the learning rate decayed and DKD's warm-up weight moved at each boundary): each
    step moves the student, BatchNorm statistics included, as the official loop's step does
    from the same weights, on the same batch (order and crops), with the official momentum
    accumulated over the same steps.

    Step by step, not two free runs compared at the end: in float32, two programs that round
    differently drift apart through the ReLUs. After one step the two students here differ by
    1.5e-8 (rounding); at the next, one ReLU input of 819,200 lies within that of 0 and takes
    the other sign, which moves the gradient of the first convolution by 3e-4 (of 0.06),
    and after 24 steps the two free runs differ by up to 0.1 (measured): chaos, not wiring.
    Shadowing kdlight's run, every step is compared at RTOL."""
    record = tmp_path / "record.pt"
    callback = f"+callbacks.record={{_target_:{__name__}.RecordSteps,path:'{record}'}}"
    cfg = zoo_config(
        "resnet56_resnet20", method, tmp_path / "run", *TRAJECTORY, callback,
        f"distill.teacher_checkpoint={resnet56_teacher}",
    )  # fmt: skip
    train(cfg)
    run = torch.load(record, weights_only=True)
    steps = run["steps"]
    assert [step["epoch"] for step in steps] == [0] * 8 + [1] * 8 + [2] * 8

    kdlight_student = create_model("resnet20", num_classes=100)
    kdlight_student.load_state_dict(run["initial"])
    kdlight_teacher = create_model("resnet56", num_classes=100)
    kdlight_teacher.load_state_dict(run["teacher"])  # as kdlight read it from the checkpoint
    student = official_copy_of("resnet20", kdlight_student.train())
    teacher = official_copy_of("resnet56", kdlight_teacher.eval())
    official = OfficialTraining(method, student, teacher, PAIRS["resnet56_resnet20"][2])
    names = official_names("resnet20", kdlight_student)
    before = run["initial"]
    for number, step in enumerate(steps):
        # kdlight's weights and statistics before the step, in place: the momentum stays
        student.load_state_dict({names[key]: value for key, value in before.items()})
        lr = official.step(step["images"], step["labels"], epoch=step["epoch"] + 1)
        assert step["lr"] == pytest.approx(lr)  # kdlight's scheduler
        moved = state_of(student)
        for key, value in step["after"].items():
            where = f"{method}, step {number} (epoch {step['epoch']}): {key}"
            if value.is_floating_point():
                # the step itself is compared, to RTOL and the rounding of storing it in the
                # weights: their float32 spacing, itself about 1e-4 of the smaller steps here
                rounding = 2 * torch.finfo(value.dtype).eps * before[key].abs().max().item()
                update, official_update = value - before[key], moved[names[key]] - before[key]
                assert_close(update, official_update, where, rounding)
            else:
                assert torch.equal(value, moved[names[key]]), where  # BatchNorm's step counts
        before = step["after"]
    assert lr == pytest.approx(0.005)
