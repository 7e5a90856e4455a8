"""The model table: every model name the scripts take, its family, its task and its partner, and the builders.

One entry per architecture pairs a pretraining model with its classifier (``mae_vit_base_patch16`` with
``vit_base_patch16``; ``mixmim_base`` with ``mixmim_base_ft``). Every question about a model is answered here: its
family (``family_of``), whether it is a pretraining model (``is_pretrain_model``), the classifier of a pretraining
name and back (``resolve_classifier_name``, ``resolve_pretrain_name``: each script also takes the other kind's name
of the same architecture, and the official MixMIM scripts' names), its default input size, its family's official
defaults (mask ratio, checkpoint cadence). An unknown name or an input size the model cannot take is a
``UsageError``. It sits above the model files (it imports them); which family a checkpoint's keys belong to is
``util/families.py``'s question, below them.
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
from util.cli import input_size_value
from util.errors import UsageError
from util.families import unwrap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    family: str  # "mae" or "mixmim"
    pretrain: str | None  # the pretraining model's registered name (None: a classifier without one)
    classifier: str  # the classifier's registered name
    input_size: int  # the factories' default image side
    official_names: tuple[str, ...] = ()  # other names the official scripts use for these models


ARCHITECTURES = (
    Architecture("mae", "mae_vit_base_patch16", "vit_base_patch16", 224, ("mae_vit_base_patch16_dec512d8b",)),
    Architecture("mae", "mae_vit_large_patch16", "vit_large_patch16", 224, ("mae_vit_large_patch16_dec512d8b",)),
    Architecture("mae", "mae_vit_huge_patch14", "vit_huge_patch14", 224, ("mae_vit_huge_patch14_dec512d8b",)),
    Architecture("mae", "mae_vit_tiny_patch4", "vit_tiny_patch4", 32),
    # the official MixMIM scripts call the pretraining model and its classifier by the same name (mixmim_base):
    # main_finetune.py and main_linprobe.py map it to the classifier
    Architecture("mixmim", "mixmim_base", "mixmim_base_ft", 224),
    Architecture("mixmim", None, "mixmim_base_384_ft", 384, ("mixmim_base_384",)),
    Architecture("mixmim", "mixmim_large", "mixmim_large_ft", 224),
    Architecture("mixmim", None, "mixmim_large_384_ft", 384, ("mixmim_large_384",)),
    Architecture("mixmim", "mixmim_huge", "mixmim_huge_ft", 224),
    Architecture("mixmim", "mixmim_tiny", "mixmim_tiny_ft", 64),
)
# the model classes of each (family, task), for questions about a built model
_CLASSES = {
    models_mae.MaskedAutoencoderViT: ("mae", "pretrain"),
    models_vit.VisionTransformer: ("mae", "classifier"),
    models_mixmim.MixMIM: ("mixmim", "pretrain"),
    models_mixmim.MixMIMClassifier: ("mixmim", "classifier"),
}


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


def _architecture(name: str) -> Architecture | None:
    for arch in ARCHITECTURES:
        if name in (arch.pretrain, arch.classifier) or name in arch.official_names:
            return arch
    return None


def accepted_names(task: str) -> str:
    """The ``--model`` names a pretraining (``task="pretrain"``) or classifier script takes, for messages: each
    model's own name, then the other names that build it (the official aliases, the other kind's name)."""
    entries = []
    for arch in ARCHITECTURES:
        own = arch.pretrain if task == "pretrain" else arch.classifier
        if own is None:
            continue
        others = [n for n in (*arch.official_names, arch.classifier, arch.pretrain) if n and n != own]
        entries.append(f"{own} (also {', '.join(others)})" if others else own)
    return ", ".join(entries)


def _unknown(name: str) -> UsageError:
    return UsageError(
        f"unknown --model {name!r}; pretraining models: {accepted_names('pretrain')}; "
        f"classifiers: {accepted_names('classifier')}"
    )


def _kind(model: nn.Module) -> tuple[str, str]:
    inner = unwrap(model)
    for cls, kind in _CLASSES.items():
        if isinstance(inner, cls):
            return kind
    raise TypeError(f"{type(inner).__name__} is not one of this project's models")


def family_of(name_or_model: str | nn.Module) -> str:
    """``"mae"`` or ``"mixmim"`` for a model name we know, or for a built model (DDP or compiled too)."""
    if isinstance(name_or_model, nn.Module):
        return _kind(name_or_model)[0]
    arch = _architecture(name_or_model)
    if arch is None:
        raise _unknown(name_or_model)
    return arch.family


def is_pretrain_model(model: nn.Module) -> bool:
    """Pretraining models return (loss, pred, mask); classifiers return logits."""
    return _kind(model)[1] == "pretrain"


def default_input_size(name: str) -> int:
    arch = _architecture(name)
    if arch is None:
        raise _unknown(name)
    return arch.input_size


def family_defaults(name_or_model: str | nn.Module) -> FamilyDefaults:
    """The official defaults of the family of a model (or model name)."""
    return FAMILY_DEFAULTS[family_of(name_or_model)]


def resolve_pretrain_name(name: str) -> str:
    """The pretraining model for ``--model`` in main_pretrain.py (a classifier's name gives its pretraining model)."""
    arch = _architecture(name)
    if arch is None:
        raise UsageError(f"unknown pretraining --model {name!r}; choose one of: {accepted_names('pretrain')}")
    if arch.pretrain is None:
        raise UsageError(
            f"there is no pretraining model {name!r}: it is a classifier for fine-tuning at {arch.input_size} "
            f"(pretrain at 224, then fine-tune it with --finetune); pretraining models: {accepted_names('pretrain')}"
        )
    return name if name in arch.official_names and timm.is_model(name) else arch.pretrain


def resolve_classifier_name(name: str) -> str:
    """The classifier for ``--model`` in main_finetune.py / main_linprobe.py (a pretraining model's name, or an
    official MixMIM name, gives its classifier)."""
    arch = _architecture(name)
    if arch is None:
        raise UsageError(f"unknown classifier --model {name!r}; choose one of: {accepted_names('classifier')}")
    return arch.classifier


def _input_stride(model: nn.Module) -> int:
    """The factor the input side must be a multiple of: the patch size, times the downsampling of MixMIM."""
    stride = getattr(model, "encoder_stride", None)  # MixMIM: patch size * 2 ** (stages - 1)
    if stride is not None:
        return int(stride)
    patch = model.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, tuple | list) else patch)


def _create(name: str, input_size: int | tuple[int, int], device: torch.device | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with one-line errors. ``input_size``: a side, or (H, W) (MAE and ViT only). For
    MixMIM on a known ``device`` the attention path is fixed here: SDPA on CUDA, plain elsewhere (on the CPU SDPA with
    a float bias runs its math kernel, measured slower); MAE keeps timm's choice."""
    input_size = input_size_value(input_size)
    if not isinstance(input_size, int):
        if family_of(name) == "mixmim":
            raise UsageError(
                f"--model {name} takes square images only: --input_size S, a size its windows fit (224, 448, ... "
                f"for the released models; see PRETRAIN.md); non-square --input_size H W is for MAE / ViT"
            )
        input_size = tuple(input_size)
    if device is not None and family_of(name) == "mixmim":
        kwargs.setdefault("fused_attn", torch.device(device).type == "cuda")
    shown = input_size if isinstance(input_size, int) else " ".join(map(str, input_size))
    try:
        model = timm.create_model(name, img_size=input_size, **kwargs)
    except (ValueError, AssertionError) as e:
        raise UsageError(f"--model {name} cannot be built for --input_size {shown}: {e}") from e
    stride = _input_stride(model)
    sides = (input_size,) if isinstance(input_size, int) else input_size
    if any(side % stride != 0 for side in sides):
        raise UsageError(f"--input_size {shown} is not a multiple of {stride}, which --model {name} needs")
    return model


def is_pretrain_name(name: str) -> bool:
    """Whether ``name`` is a pretraining model's name."""
    arch = _architecture(name)
    return arch is not None and name in (arch.pretrain, *arch.official_names) and name != arch.classifier


def check_buildable(name: str, input_size: int | tuple[int, int], in_chans: int = 3, **kwargs) -> nn.Module:
    """Build ``name`` for ``input_size`` on the meta device (no memory, no init cost), so that an input size the
    model cannot take fails before any work is done; returns that model (shapes only). ``kwargs``: more keywords for
    the factory."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _create(name, input_size, in_chans=in_chans, **kwargs)


DECODER_ARGS = ("decoder_depth", "decoder_embed_dim", "decoder_num_heads")  # an MAE factory's decoder keywords


def mae_decoder(name: str) -> dict[str, int]:
    """An MAE's own decoder, as its factory builds it: ``{"decoder_depth", "decoder_embed_dim",
    "decoder_num_heads"}`` (8 blocks of 512 wide with 16 heads for B / L / H), read from a model on the meta device."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _create(resolve_pretrain_name(name), default_input_size(name))
    block = model.decoder_blocks[0]
    return dict(
        decoder_depth=len(model.decoder_blocks),
        decoder_embed_dim=model.decoder_embed.out_features,
        decoder_num_heads=block.attn.num_heads,
    )


def pretrain_overrides(args: dict) -> dict:
    """The factory keywords that a pretraining run's arguments (``vars(args)``, or a checkpoint's ``saved_args``)
    ask for beyond the named model's own: main_pretrain.py's MAE ablations, ``--decoder_*`` when given and
    ``--mask_type`` when not ``random``, and the LayerNorm eps of weights that state theirs (``layer_norm_eps``).
    main_pretrain.py builds with them, so a checkpoint's model is rebuilt from its name, input size and these; {}
    for the defaults (and for checkpoints that do not record them)."""
    kwargs = {k: int(args[k]) for k in DECODER_ARGS if args.get(k) is not None}
    if args.get("mask_type") not in (None, "random"):
        kwargs["mask_type"] = str(args["mask_type"])
    if args.get("layer_norm_eps") is not None:  # weights from Hugging Face (util/formats.py)
        kwargs["layer_norm_eps"] = float(args["layer_norm_eps"])
    return kwargs


def build_pretrain_model(
    name: str, input_size: int | tuple[int, int], device: torch.device | None = None, **kwargs
) -> nn.Module:
    """A pretraining model (MAE or MixMIM) for images of side ``input_size`` (MAE: or (H, W)), to run on ``device``;
    ``kwargs`` for the factory (``in_chans``, ``norm_pix_loss``)."""
    return _create(resolve_pretrain_name(name), input_size, device, **kwargs)


def build_classifier(
    name: str,
    input_size: int | tuple[int, int],
    num_classes: int,
    drop_path_rate: float,
    global_pool: bool | None = None,
    device: torch.device | None = None,
    in_chans: int = 3,
    layer_norm_eps: float | None = None,
) -> nn.Module:
    """A classifier (ViT or MixMIM) for fine-tuning or linear probing, for images of ``in_chans`` channels.
    ``layer_norm_eps``: the eps its weights need when they state one (ViT; ``util.checkpoint.saved_norm_eps``).

    ``global_pool`` picks mean pooling or the cls token for ViTs; MixMIM classifiers always pool their last stage
    (``False``, an explicit ``--cls_token``, is warned about; None is no choice).
    """
    resolved = resolve_classifier_name(name)
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, in_chans=in_chans)
    if family_of(resolved) == "mae":
        kwargs["global_pool"] = bool(global_pool)
        if layer_norm_eps is not None:
            kwargs["layer_norm_eps"] = layer_norm_eps
    elif global_pool is False:
        logger.warning("--cls_token is ignored for %s: MixMIM classifiers pool the last stage's tokens", resolved)
    return _create(resolved, input_size, device, **kwargs)


def add_probe_head(model: nn.Module) -> None:
    """Replace ``model.head`` by BatchNorm1d (no affine, eps 1e-6) + the head, and freeze everything else."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True


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
