"""One place that turns ``--model`` into a model, for both families and every script.

Pretraining takes the pretraining models (``mae_vit_*``, ``mixmim_*``); fine-tuning and linear probing take the
classifiers (``vit_*``, MixMIM's fine-tuning models). Each script also accepts the other kind's name of the same
architecture and maps it (``vit_base_patch16`` -> ``mae_vit_base_patch16`` in pretraining; ``mixmim_base`` -> its
classifier in fine-tuning, as the official MixMIM scripts name both the same). An unknown name or an input size the
model cannot take is a ``UsageError``.
"""

import logging
import warnings
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

import models_mae
import models_mixmim
import models_vit
from util.errors import UsageError

logger = logging.getLogger(__name__)


def _names(module) -> list[str]:
    return timm.list_models(module=module.__name__.split(".")[-1])


def _mixmim_classifier_names() -> set[str]:
    return set(models_mixmim.FINETUNE_NAMES.values())


def pretrain_model_names() -> list[str]:
    mixmim = [n for n in _names(models_mixmim) if n not in _mixmim_classifier_names()]
    return sorted(_names(models_mae) + mixmim)


def classifier_model_names() -> list[str]:
    return sorted(_names(models_vit) + sorted(_mixmim_classifier_names()))


def family_of(name: str) -> str:
    """``"mae"`` or ``"mixmim"`` for any model name we know."""
    if name in _names(models_mae) or name in _names(models_vit):
        return "mae"
    if name in _names(models_mixmim):
        return "mixmim"
    raise UsageError(f"unknown --model {name!r}; pretraining models: {', '.join(pretrain_model_names())}; "
                     f"classifiers: {', '.join(classifier_model_names())}")


@dataclass(frozen=True)
class FamilyDefaults:
    """The official scripts' defaults that differ between the two families (one parser here serves both)."""

    mask_ratio: float  # --mask_ratio of main_pretrain.py
    pretrain_save_freq: int  # a numbered checkpoint every N pretraining epochs
    finetune_save_freq: int  # ... and fine-tuning epochs


FAMILY_DEFAULTS = {
    "mae": FamilyDefaults(mask_ratio=0.75, pretrain_save_freq=20, finetune_save_freq=1),
    "mixmim": FamilyDefaults(mask_ratio=0.5, pretrain_save_freq=10, finetune_save_freq=5),
}


def family_defaults(name: str) -> FamilyDefaults:
    """The official defaults of ``name``'s family (MAE or MixMIM)."""
    return FAMILY_DEFAULTS[family_of(name)]


def resolve_pretrain_name(name: str) -> str:
    """The pretraining model for ``--model`` in main_pretrain.py."""
    known = pretrain_model_names()
    if name in known:
        return name
    if f"mae_{name}" in known:  # a ViT classifier name: its MAE
        return f"mae_{name}"
    for pre, ft in models_mixmim.FINETUNE_NAMES.items():  # a MixMIM classifier name: its pretraining model
        if ft == name and pre in known:
            return pre
    raise UsageError(f"unknown pretraining --model {name!r}; choose one of: {', '.join(known)}")


def resolve_classifier_name(name: str) -> str:
    """The classifier for ``--model`` in main_finetune.py / main_linprobe.py."""
    known = classifier_model_names()
    mapped = models_mixmim.finetune_model_name(name)  # the official MixMIM names (mixmim_base, mixmim_base_384, ...)
    if mapped in known:
        return mapped
    if name in known:
        return name
    if name.startswith("mae_"):  # an MAE name: its ViT encoder as classifier
        vit = name[len("mae_") :].removesuffix("_dec512d8b")
        if vit in known:
            return vit
    raise UsageError(f"unknown classifier --model {name!r}; choose one of: {', '.join(known)}")


def _input_stride(model: nn.Module) -> int:
    """The factor the input side must be a multiple of: the patch size, times the downsampling of MixMIM."""
    stride = getattr(model, "encoder_stride", None)  # MixMIM: patch size * 2 ** (stages - 1)
    if stride is not None:
        return int(stride)
    patch = model.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, tuple | list) else patch)


def _create(name: str, input_size: int, **kwargs) -> nn.Module:
    try:
        model = timm.create_model(name, img_size=input_size, **kwargs)
    except (ValueError, AssertionError) as e:
        raise UsageError(f"--model {name} cannot be built for --input_size {input_size}: {e}") from e
    stride = _input_stride(model)
    if input_size % stride != 0:
        raise UsageError(f"--input_size {input_size} is not a multiple of {stride}, which --model {name} needs")
    return model


def check_buildable(name: str, input_size: int) -> None:
    """Build ``name`` for ``input_size`` on the meta device (no memory, no init cost), so that an input size the
    model cannot take fails before any work is done."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _create(name, input_size)


def build_pretrain_model(name: str, input_size: int, **kwargs) -> nn.Module:
    """A pretraining model (MAE or MixMIM) for square images of side ``input_size``."""
    return _create(resolve_pretrain_name(name), input_size, **kwargs)


def build_classifier(
    name: str, input_size: int, num_classes: int, drop_path_rate: float, global_pool: bool | None = None
) -> nn.Module:
    """A classifier (ViT or MixMIM) for fine-tuning or linear probing.

    ``global_pool`` picks mean pooling or the cls token for ViTs; MixMIM always pools (``--cls_token`` is ignored).
    """
    resolved = resolve_classifier_name(name)
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate)
    if family_of(resolved) == "mae":
        kwargs["global_pool"] = bool(global_pool)
    elif global_pool is False:
        logger.warning("--cls_token is ignored for %s: MixMIM classifiers pool the last stage's tokens", resolved)
    return _create(resolved, input_size, **kwargs)


def compile_model(model: nn.Module, mode: str | None = None) -> nn.Module:
    """``torch.compile`` for ``--compile``, keeping eager mode's random draws.

    Inductor otherwise generates its own random numbers inside the fused kernels, so a compiled run would draw other
    masks (and drop-path decisions) than an eager run with the same seed. ``fallback_random`` makes the compiled
    model call the same random ops as eager mode: ``--compile`` changes the speed, not the run. The setting is
    process-wide (inductor's config), which suits the scripts: they compile one model.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    return torch.compile(model, mode=mode)
