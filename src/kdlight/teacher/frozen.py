"""The frozen teacher that a distillation system holds (:class:`FrozenTeacher`): the
teacher, its taps, its cache and its test accuracy, as one object whose methods the
system calls from its hooks; and which teacher cache a run reads (:func:`teacher_cache_for`)."""

import contextlib
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn

from kdlight.data import default_data_dir
from kdlight.distillers import Outputs
from kdlight.errors import KDLightError
from kdlight.models.fast import FastForward
from kdlight.models.taps import FeatureTaps
from kdlight.runs.identity import file_identity
from kdlight.teacher.cache import (
    CacheUnavailable,
    TeacherCache,
    agreement_tolerance,
    cache_key,
    disagreement,
    storage_dtype,
)
from kdlight.teacher.loading import freeze

log = logging.getLogger("kdlight")


def teacher_identity(teacher: nn.Module, checkpoint: str | Path | None) -> str:
    """What names the teacher in a cache's key: its checkpoint file's content, or, for a
    teacher given as a module, its weights'."""
    if checkpoint:
        return file_identity(checkpoint)
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return f"weights:{digest.hexdigest()[:16]}"


def teacher_cache_for(
    teacher: nn.Module,
    checkpoint: str | Path | None,
    datamodule,
    precision: str,
    num_classes: int,
) -> TeacherCache:
    """The cache of ``teacher``'s logits on ``datamodule``'s training split (set up) at a
    Trainer's ``precision``, in the data folder's ``teacher_cache/``. Its key holds all
    that changes the answer: the teacher (:func:`teacher_identity`), the whole training
    split's content, the augmentation, the normalisation, the precision (and so the stored
    dtype) and the classes.

    Raises:
        CacheUnavailable: its files cannot be opened or made there.
    """
    source = getattr(datamodule, "train_source", None)
    if source is None or not hasattr(datamodule, "with_augmentation"):
        raise KDLightError(
            "distill.teacher_cache=true needs each training image's index and augmentation: "
            "use a kdlight data module"
        )
    dtype = storage_dtype(precision)
    key = cache_key(
        teacher=teacher_identity(teacher, checkpoint),
        images=source[0],
        augmentation="pad4-crop-flip" if datamodule.hparams.get("augment", True) else "none",
        normalization=[list(datamodule.mean), list(datamodule.std)],
        precision=str(precision),
        stored=str(dtype),
        classes=num_classes,
    )
    folder = Path(getattr(datamodule, "data_dir", None) or default_data_dir()) / "teacher_cache"
    return TeacherCache(folder, key, source[1], num_classes, datamodule.train_positions, dtype)


def recorded_teacher_accuracy(
    teacher_checkpoint: str | Path | None, test_set: str | None, model_name: str | None = None
) -> tuple[float, Path] | None:
    """The teacher's own test accuracy, when its run already measured what a distillation
    test would measure again; ``None`` otherwise.

    A teacher checkpoint ``<run>/checkpoints/last.ckpt`` has its run's test result in
    ``<run>/metrics.json``. It is reused (with that file's path) when that test saw the same
    images (its ``test_set`` equals ``test_set``, and neither is ``None``) and the weights of
    this very checkpoint: ``tested_weights`` is ``last``, the model is ``model_name`` when
    given, and the file was written after the checkpoint. Testing a teacher again costs a
    whole pass over the test set (about 30 s for 10,000 images on a CPU) in every
    distillation run.
    """
    if teacher_checkpoint is None or test_set is None:
        return None
    checkpoint = Path(teacher_checkpoint)
    if checkpoint.name != "last.ckpt" or checkpoint.parent.name != "checkpoints":
        return None
    path = checkpoint.parent.parent / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        written_after = path.stat().st_mtime >= checkpoint.stat().st_mtime
    except (OSError, ValueError):  # no such run, or a file that is not JSON
        return None
    if not isinstance(metrics, dict) or not written_after:
        return None
    accuracy = metrics.get("accuracy")
    same = (
        metrics.get("test_set") == test_set
        and metrics.get("tested_weights") == "last"
        and (model_name is None or metrics.get("model") == model_name)
    )
    if not same or not isinstance(accuracy, int | float) or isinstance(accuracy, bool):
        return None
    return float(accuracy), path.resolve()


class FrozenTeacher:
    """A distillation system's teacher and all that goes with it: the system holds one and
    calls it from its hooks.

    ``module`` is frozen for good: eval mode, ``requires_grad=False``, run under
    ``no_grad``; the system keeps it so (:class:`kdlight.lit.distillation.DistillationSystem`).
    Held here: its forward for training steps (``fast``), hooks on the modules that any
    student's method reads (``taps``, each once), the cache of its logits (``cache``) and
    its test accuracy, which is measured alongside the students' unless its own run
    already measured it on the same images (:func:`recorded_teacher_accuracy`).

    A damaged cache (:meth:`open_cache`) stops the run with one line naming its files: each
    epoch's first batch's hits are checked against the live teacher, within the precision's
    tolerance (:func:`~kdlight.teacher.cache.agreement_tolerance`), which also stops a cache
    filled on a device whose answers differ by more; and a NaN or infinite cached logit
    (read as a miss, so the student never sees it) stops the run at that check or at the
    epoch's end. Under DDP every process stops together: each check is reduced over all.
    """

    def __init__(
        self,
        module: nn.Module,
        checkpoint: str | Path | None,
        num_classes: int,
        taps: Sequence[str] = (),
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.module = freeze(module)
        self.checkpoint = checkpoint
        self.num_classes = num_classes
        self.fast = FastForward(module, compile, channels_last)
        self.taps = FeatureTaps(module, list(dict.fromkeys(taps)), "teacher")
        self._quiet = contextlib.ExitStack()  # the eval-mode warning's filter, during a fit
        self.cache: TeacherCache | None = None
        #: whether a fit asked for the cache (an evaluation alone records nothing about it)
        self.cache_asked = False
        #: the method whose strong view the cache does not serve (the teacher runs live on it)
        self.strong_view_method: str | None = None
        #: hits and lookups of every process so far in this fit (summed at each epoch's end)
        self.cache_totals: tuple[int, int] = (0, 0)
        #: whether the next training batch's hits are to be checked against the live teacher
        self.check_hits_now = False
        self.strategy = None  # the fit's, for the cache's checks over every process
        #: the test accuracy (percent) and the metrics.json it comes from, if reused
        self.reused: tuple[float, Path] | None = None
        self.test_counts: Tensor | None = None  # correct answers and images, this process
        self.accuracy: float | None = None

    @property
    def model_name(self) -> str | None:
        """The registered model's name; None for a model of the user's."""
        return getattr(self.module, "spec", {}).get("name")

    # ------------------------------------------------------------------ eval-mode notice
    def announce(self, system: nn.Module) -> None:
        """Say once that the teacher is frozen, instead of Lightning's warning about modules
        in eval mode at the start of training, which the teacher sets off on purpose.

        Lightning's warning is silenced only for this fit's own check (until
        :meth:`end_quiet`), and only when the teacher's modules are all that it would count:
        a student module left in eval mode is still warned about (then with the teacher's
        modules in the count).
        """
        self.end_quiet()  # left over from a fit that failed before training
        teacher = {id(module) for module in self.module.modules()}
        in_eval = [module for _, module in system.named_modules() if not module.training]
        frozen = sum(id(module) in teacher for module in in_eval)
        rank_zero_only(log.info)("teacher frozen: %d modules in eval mode, no gradients", frozen)
        if in_eval and frozen == len(in_eval):
            self._quiet.enter_context(warnings.catch_warnings())
            warnings.filterwarnings(
                "ignore",
                message=re.escape(f"Found {len(in_eval)} module(s) in eval mode at the start"),
                category=PossibleUserWarning,
            )

    def end_quiet(self) -> None:
        """Put the warnings filters back as :meth:`announce` found them."""
        self._quiet.close()

    # ------------------------------------------------------------------ training
    def open_cache(
        self, trainer: L.Trainer, feature_method: str | None, strong_view_method: str | None = None
    ) -> None:
        """Open the cache for a fit, and have the training batches carry each image's
        index and augmentation; a method that reads the teacher's features
        (``feature_method``, its name), or a cache whose files cannot be opened or made in
        any process, keeps the teacher live, said in one line. The cache serves the weak
        (usual) view only: where a method trains on a strong view too
        (``strong_view_method``), the teacher runs live on that view, said in one line and
        in :meth:`cache_record`."""
        self.cache_asked = True
        if feature_method is not None:
            rank_zero_only(log.info)(
                "distill.teacher_cache: not used: distiller=%s reads the teacher's features, "
                "which are too large to cache; the teacher runs live",
                feature_method,
            )
            return
        datamodule = trainer.datamodule
        cache, reason = None, "another DDP process cannot open it"
        try:
            cache = teacher_cache_for(
                self.module, self.checkpoint, datamodule, str(trainer.precision), self.num_classes
            )
        except CacheUnavailable as err:
            reason = str(err)
        if trainer.world_size > 1:  # all processes use it, or none does
            opened = torch.tensor(int(cache is not None), device=trainer.strategy.root_device)
            if not int(trainer.strategy.reduce(opened, reduce_op="min")):
                cache = None
        if cache is None:
            rank_zero_only(log.warning)(
                "distill.teacher_cache: not used: %s; the teacher runs live", reason
            )
            return
        self.cache, self.strategy = cache, trainer.strategy
        for note in cache.notes:
            rank_zero_only(log.warning)("%s", note)
        datamodule.with_augmentation = True
        self.cache_totals = (0, 0)
        rank_zero_only(log.info)("teacher cache: %s", cache.path)
        self.strong_view_method = strong_view_method
        if strong_view_method is not None:
            rank_zero_only(log.info)(
                "distill.teacher_cache: serves the weak view only: distiller=%s's strong view "
                "runs the teacher live",
                strong_view_method,
            )

    def outputs(self, images: Tensor, extra: list[Tensor]) -> Outputs:
        """The teacher's outputs of a training batch: with the cache, its logits looked up
        by ``extra``'s indices and augmentation (the batch's last two entries), the teacher
        run on the misses only and its answers stored (on a writable cache); without, the
        live teacher's logits and the tapped features."""
        if self.cache is None:
            return self.live(images)
        index, params = extra[0], extra[-1]
        cached, hit = self.cache.lookup(index, params)
        if self.check_hits_now:
            self.check_hits_now = False
            self._check_hits(images, cached, hit)
        logits = cached.to(images.device, non_blocking=True)
        miss = ~hit
        if miss.any():
            on_device = miss.to(images.device)
            with torch.no_grad():
                live = self.fast(images[on_device])
            if self.cache.writable:
                stored = self.cache.store(index.cpu()[miss], params.cpu()[miss], live)
            else:
                stored = self.cache.round(live)
            logits[on_device] = stored.to(images.device)  # as a later hit will read it
        return Outputs(logits)

    def live(self, images: Tensor) -> Outputs:
        """The live teacher's logits of ``images`` and the tapped features, without gradient."""
        with torch.no_grad(), self.taps.capture() as features:
            return Outputs(self.fast(images), features)

    def _check_hits(self, images: Tensor, cached: Tensor, hit: Tensor) -> None:
        """The class docstring's check of a batch's hits (every process its own batch)."""
        tolerance = agreement_tolerance(self.cache.dtype, images.device)
        apart, farthest = 0, 0.0
        if hit.any():
            with torch.no_grad():
                live = self.fast(images[hit.to(images.device)])
            apart, farthest = disagreement(cached[hit], self.cache.round(live), tolerance)
        found = torch.tensor([apart, farthest, self.cache.non_finite], device=images.device)
        apart, farthest, non_finite = self.strategy.reduce(found, reduce_op="max").tolist()
        self._stop_if_damaged(int(non_finite))
        if apart:
            raise KDLightError(
                f"teacher cache {self.cache.path}.logits: cached logits differ from the live "
                f"teacher's by up to {farthest:.3g} times the row's largest logit, beyond the "
                f"{str(self.cache.dtype).removeprefix('torch.')} tolerance {tolerance:.3g} "
                "(checked on this epoch's first batch): it is damaged, or was filled on a "
                f"device whose answers differ; {self._remedy()}"
            )

    def _stop_if_damaged(self, non_finite: int) -> None:
        if non_finite:
            raise KDLightError(
                f"teacher cache {self.cache.path}.logits holds NaN or infinite logits "
                f"({non_finite} of the entries read): it is damaged; {self._remedy()}"
            )

    def _remedy(self) -> str:
        path = self.cache.path
        return (
            f"delete {path.name}.logits and {path.name}.filled in {path.parent} and launch "
            "again (the runs, or kdlight-cache-teacher, fill it anew)"
        )

    def start_epoch(self) -> None:
        self.check_hits_now = self.cache is not None

    def end_epoch(self) -> float | None:
        """The cache's hit rate over this epoch's lookups of every process (None without a
        cache or a lookup); stops the run if a cached logit read was not finite."""
        if self.cache is None:
            return None
        mine = torch.tensor(
            [self.cache.hits, self.cache.lookups, self.cache.non_finite],
            device=self.strategy.root_device,
        )
        hits, lookups, non_finite = (int(n) for n in self.strategy.reduce(mine, reduce_op="sum"))
        self._stop_if_damaged(non_finite)
        before_hits, before_lookups = self.cache_totals
        self.cache_totals = (hits, lookups)
        if lookups > before_lookups:
            return (hits - before_hits) / (lookups - before_lookups)
        return None

    def cache_record(self) -> dict:
        """``{"teacher_cache": {used, hit_rate, path}}`` when a fit asked for the cache: the
        hit rate over every process's lookups in this fit (None before the first epoch
        ended); ``{}`` otherwise. A used cache where a method trains on a strong view too
        adds ``"strong_view": "live"``: it served the weak view only."""
        if not self.cache_asked:
            return {}
        used = self.cache is not None
        hits, lookups = self.cache_totals
        record = {
            "used": used,
            "hit_rate": hits / lookups if used and lookups else None,
            "path": str(self.cache.path) if used else None,
        }
        if used and self.strong_view_method is not None:
            record["strong_view"] = "live"
        return {"teacher_cache": record}

    # ------------------------------------------------------------------ testing
    def start_test(self, trainer: L.Trainer) -> None:
        """Decide whether the teacher's test accuracy has to be measured again."""
        test_set = getattr(trainer.datamodule, "test_set_id", None)
        self.reused = recorded_teacher_accuracy(self.checkpoint, test_set, self.model_name)
        self.test_counts = torch.zeros(2, dtype=torch.long, device=trainer.strategy.root_device)

    def test(self, images: Tensor, labels: Tensor) -> None:
        """Count the teacher's right answers on a test batch, unless its accuracy is reused."""
        if self.reused is None:
            with torch.no_grad():
                right = (self.fast.eager(images).argmax(dim=1) == labels).sum()
            self.test_counts += torch.stack([right, right.new_tensor(len(labels))])

    def end_test(self, trainer: L.Trainer) -> float:
        """The teacher's test accuracy in percent, over every process's images (call it in
        every process); also what :meth:`record` says."""
        if self.reused is not None:
            self.accuracy = self.reused[0]
        else:
            right, seen = trainer.strategy.reduce(self.test_counts, reduce_op="sum").tolist()
            self.accuracy = 100.0 * right / max(seen, 1)
        return self.accuracy

    def record(self) -> dict:
        """The teacher's part of ``metrics.json``: its model, checkpoint and test accuracy,
        and where that accuracy comes from (its run's ``metrics.json``, or ``measured``)."""
        checkpoint = self.checkpoint
        return {
            "teacher_model": self.model_name or type(self.module).__name__,
            "teacher_checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "teacher_accuracy": self.accuracy,
            "teacher_accuracy_from": "measured" if self.reused is None else str(self.reused[1]),
        }
