"""Load the CIFAR teachers that the knowledge-distillation zoo publishes (RepDistiller's
``ckpt_epoch_240.pth`` files, which mdistiller reuses) into kdlight's models, and write a
kdlight model back in the zoo's layout.

The zoo's training scripts save ``{"epoch", "model": model.state_dict(), "accuracy" or
"best_acc", "optimizer"}`` (``*_last.pth`` adds ``"opt"``, an ``argparse.Namespace``).
kdlight's zoo architectures use the zoo's module names, so their weights load as they are;
only kdlight's own ``resnet8`` / ``resnet20`` name their modules differently, and their keys
are mapped::

    conv1.* / bn1.*                 <->  stem.0.* / stem.1.*
    layer{s}.{b}.*                  <->  stages.{(s - 1) * blocks_per_stage + b}.*
    layer{s}.{b}.downsample.{0,1}.* <->  stages.{i}.shortcut.{0,1}.*
    fc.*                            <->  fc.*
"""

import argparse
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from kdlight.errors import KDLightError
from kdlight.models.registry import create_model
from kdlight.models.resnet import ResNet
from kdlight.trainer.checkpointing import read_checkpoint

#: The registered models whose weights the zoo (RepDistiller, mdistiller) lays out.
PUBLISHED_MODELS = (
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflev1", "shufflev2",
)  # fmt: skip

#: Published models that are kdlight's own :class:`~kdlight.models.resnet.ResNet` (other
#: module names than the zoo's).
_KDLIGHT_NAMED = ("resnet8", "resnet20")
_STAGES = 3  # the zoo's CIFAR ResNets have layer1..layer3


def _kdlight_to_official(key: str, blocks_per_stage: int) -> str:
    """One key of kdlight's CIFAR ResNet in the zoo's naming."""
    if key.startswith("stem.0."):
        return "conv1." + key.removeprefix("stem.0.")
    if key.startswith("stem.1."):
        return "bn1." + key.removeprefix("stem.1.")
    match = re.fullmatch(r"stages\.(\d+)\.(.+)", key)
    if match is None:
        return key
    index, rest = int(match[1]), match[2]
    stage, block = divmod(index, blocks_per_stage)
    return f"layer{stage + 1}.{block}." + re.sub(r"^shortcut\.", "downsample.", rest)


def official_names(model_name: str, model: nn.Module) -> dict[str, str]:
    """``{kdlight key: the zoo's key}`` for every entry of ``model.state_dict()``."""
    keys = list(model.state_dict())
    if model_name not in _KDLIGHT_NAMED:
        return {key: key for key in keys}
    if not isinstance(model, ResNet) or len(model.stages) % _STAGES:
        raise KDLightError(
            f"expected kdlight's CIFAR ResNet for '{model_name}' (3 stages of BasicBlocks), "
            f"found {type(model).__name__}"
        )
    blocks_per_stage = len(model.stages) // _STAGES
    return {key: _kdlight_to_official(key, blocks_per_stage) for key in keys}


def official_state_dict(model_name: str, model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights laid out as the zoo's code names them (what RepDistiller saves
    under ``"model"``), e.g. to share a kdlight-trained teacher with those projects."""
    state = model.state_dict()
    return {official: state[key] for key, official in official_names(model_name, model).items()}


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a zoo checkpoint: its ``"model"`` or ``"state_dict"`` entry, or the
    file itself when it is a plain state dict; ``nn.DataParallel``'s ``module.`` is dropped."""
    # the zoo's *_last.pth files also store its argparse options
    with torch.serialization.safe_globals([argparse.Namespace]):
        content = read_checkpoint(path, what="the published checkpoint")
    state = content.get("model", content.get("state_dict", content))
    if not isinstance(state, dict) or not state or not all(map(torch.is_tensor, state.values())):
        raise KDLightError(
            f"{path} holds no state dict: expected a dict of tensors, or one under 'model' or "
            "'state_dict' (as RepDistiller and mdistiller save them); found keys "
            f"{sorted(content)[:6]}"
        )
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_published(path: str | Path, model_name: str, num_classes: int = 100) -> nn.Module:
    """A registered model with the weights of a RepDistiller / mdistiller checkpoint.

    ``path`` is a file as those projects save it (``{"model": state_dict, "epoch": ...}``),
    a dict with ``"state_dict"``, or a plain state dict. The model is built with
    ``create_model(model_name, num_classes=num_classes)``, kdlight's own ``resnet8`` /
    ``resnet20`` keys are mapped from the zoo's names, and the weights load strictly
    (BatchNorm's ``num_batches_tracked``, absent from files of old PyTorch versions, may be
    missing). A mismatch is a one-line :class:`KDLightError` naming the first missing and
    unexpected keys, or the key whose shape differs with both shapes.
    """
    if model_name not in PUBLISHED_MODELS:
        raise KDLightError(
            f"no published layout for model '{model_name}'; choose one of: "
            f"{', '.join(PUBLISHED_MODELS)}"
        )
    state = _read_state_dict(path)
    model = create_model(model_name, num_classes=num_classes)
    names = official_names(model_name, model)
    missing = [
        official
        for key, official in names.items()
        if official not in state and not key.endswith("num_batches_tracked")
    ]
    expected = set(names.values())
    unexpected = [key for key in state if key not in expected]
    wrong = {"missing": missing, "unexpected": unexpected}
    parts = [f"{len(keys)} {what} (first: {keys[0]!r})" for what, keys in wrong.items() if keys]
    if parts:
        raise KDLightError(
            f"{path} does not hold the weights of '{model_name}': {'; '.join(parts)} keys "
            "(is the model name right?)"
        )
    own = model.state_dict()
    # a num_batches_tracked buffer absent from an old file: the model's own is kept
    loaded = {key: state.get(official, own[key]) for key, official in names.items()}
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for key, official in names.items():
        if loaded[key].shape != own[key].shape:
            hint = ""
            if linears and key.rpartition(".")[0] == linears[-1]:  # the classifier's
                outputs = loaded[key].shape[0]
                hint = f"; the file's classifier has {outputs} outputs: pass num_classes={outputs}"
            raise KDLightError(
                f"{path} does not fit '{model_name}' with num_classes={num_classes}: "
                f"'{official}' has shape {tuple(loaded[key].shape)} in the file, the model "
                f"expects {tuple(own[key].shape)}{hint}"
            )
    model.load_state_dict(loaded)
    return model
