"""``ClassifierModule``: cross-entropy training of one model (a teacher or a student baseline)."""

from torch import Tensor, nn

from kdlight.lit.base import ClassificationSystem, OptimizerFactory, SchedulerFactory


class ClassifierModule(ClassificationSystem):
    """Train ``model`` with cross-entropy on hard labels.

    Args:
        model: any classifier ``nn.Module`` (usually from ``kdlight.models.create_model``).
        optimizer: ``params -> Optimizer`` (Hydra ``_partial_``); default the reference SGD.
        scheduler: ``optimizer -> LRScheduler`` stepped each epoch; default none.
        num_classes: how many classes ``model`` predicts; None (the default): measured, as
            the width of its output on one image of ``input_shape`` (else its last
            ``nn.Linear``'s ``out_features``). Given, it must agree. At ``setup`` the data
            module's ``num_classes`` must agree too: a mismatch is one error line.
        class_names: the per-class report's names; None: the data module's ``classes``
            (at ``setup``), else CIFAR-10's for 10 classes and ``class0``... otherwise.
        compile, channels_last: run the model through torch.compile (training steps; the
            evaluation runs eagerly) / in channels-last memory format (faster on GPUs;
            results are the same up to float rounding).
        input_shape: one image's shape, for the forward pass that measures ``num_classes``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        input_shape: tuple[int, ...] = (3, 32, 32),
    ) -> None:
        super().__init__(
            model, optimizer, scheduler, num_classes, class_names, compile, channels_last,
            input_shape,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self.fast_model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        self.train_acc.update(logits, labels)
        self.log_training({"loss": loss}, len(labels))
        return loss
