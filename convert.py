"""Convert checkpoints between the official layout, Hugging Face, timm and safetensors, both ways, losslessly.

    python convert.py output_dir/checkpoint-799.pth vit-mae-base-here --to hf         # ViTMAEForPreTraining folder
    python convert.py path/to/facebook-vit-mae-base mae_pretrain.pth --to official    # a hub folder as ours
    python convert.py mae_pretrain_vit_base.pth vit_base_mae --to timm                # timm's MAE encoder folder
    python convert.py checkpoint-599.pth mixmim_base.safetensors --to safetensors     # either family
    python convert.py checkpoint-799.pth mae_pretrain_vit_base.pth --to official --encoder_only   # ViTDet, mmseg

SRC is read by its content (a ``.pth`` of ours or the official code, a Hugging Face or timm model folder, a
safetensors file), as ``--finetune`` and ``--resume`` read it. The model is ``--model``, else the one SRC names
(ours record it), else the model table's architecture whose weights have SRC's shapes. Nothing is written over an
existing DST.

- ``--to official``: a ``.pth`` of this project's layout (the official keys; ``args``, ``model_name``,
  ``data_stats`` and ``epoch`` where known). ``--encoder_only``: ``{"model": encoder}`` as the released
  ``mae_pretrain_vit_*.pth``.
- ``--to hf`` (ViT / MAE): a folder ``save_pretrained`` would write: ``ViTMAEForPreTraining`` for a pretraining
  checkpoint with its decoder, ``ViTMAEModel`` for an encoder, ``ViTForImageClassification`` for a cls-token
  classifier, ``ViTModel`` for its encoder (``--encoder_only``). The global-pool classifier has no Hugging Face class.
- ``--to timm`` (ViT / MAE): a folder ``timm.create_model("local-dir:DST", pretrained=True)`` (or ``"hf-hub:..."``
  once uploaded) builds as timm's own ViT: the encoder without decoder, as timm's ``vit_*_224.mae`` weights, or the
  classifier with its head. Neither Hugging Face nor timm holds a linear probe's head (main_linprobe.py's BatchNorm,
  then the linear layer): those conversions are refused, ``--encoder_only`` leaves the head out.
- ``--to safetensors``: one file with the weights and, as metadata, what the scripts need (model name, input size,
  channels, mean / std, epoch, the run's arguments).
"""

import argparse
import logging
import os

import torch

from model_table import ARCHITECTURES, check_buildable, family_of, pretrain_overrides
from util import formats
from util.checkpoint import load_checkpoint_file, save_atomic, saved_args, state_dict_of
from util.cli import run_cli
from util.dist import setup_logging
from util.errors import UsageError
from util.families import family_of_state_dict

logger = logging.getLogger(__name__)

FORMATS = ("official", "hf", "timm", "safetensors")
_TIMM_ARCH = {  # timm's ViTs of the model table's widths: (patch, width, depth, heads) -> architecture
    (16, 192, 12, 3): "vit_tiny_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224",
    (16, 1024, 24, 16): "vit_large_patch16_224",
    (14, 1280, 32, 16): "vit_huge_patch14_224",
}
_WEIGHTS = {"mae": "ViT", "mixmim": "MixMIM"}  # a family's weights, in words


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Convert MAE / MixMIM checkpoints", add_help=False)
    parser.add_argument("src", help="a checkpoint (.pth, safetensors) or a Hugging Face / timm model folder")
    parser.add_argument("dst", help="the file (official, safetensors) or folder (hf, timm) to write; must not exist")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the layout to write")
    parser.add_argument(
        "--encoder_only", action="store_true", help="leave out the decoder, mask token and head (official: as released)"
    )
    parser.add_argument("--model", default=None, help="SRC's model (default: the one SRC names, else by its shapes)")
    return parser


def is_pretraining(state: dict) -> bool:
    """A pretraining checkpoint: MAE's decoder or mask token, MixMIM's decoder."""
    return any(k.startswith("decoder") or k == "mask_token" for k in state)


def has_probe_head(state: dict) -> bool:
    """main_linprobe.py's head: ``head.0`` (BatchNorm without affine) and ``head.1`` (the linear layer)."""
    return any(k.startswith(("head.0.", "head.1.")) for k in state)


def encoder_of(state: dict) -> dict:
    """The encoder's weights: no decoder, mask token or head."""
    return {k: v for k, v in state.items() if not (is_pretraining({k: v}) or k.startswith("head."))}


def identify(
    state: dict, args: dict, family: str, name: str | None, src: str = "the checkpoint", flag: bool = True
) -> tuple[str, torch.nn.Module]:
    """The name and model (built on the meta device: shapes only) whose weights ``state`` holds: ``name`` if given,
    else the first architecture of the model table of that ``family`` whose blocks and patch embedding have the same
    shapes. Pretraining checkpoints with their decoder are matched to pretraining models (with the decoder their
    ``args`` state), the rest to classifiers. A ``name`` that is unknown, of the other family or of other shapes is a
    one-line ``UsageError`` naming who named it: ``--model`` (``flag``), else ``src``."""
    if name:
        _check_named_family(name, family, src, flag)
    pretrain = "decoder_embed.weight" in state or "decoder_pred.weight" in state
    kwargs = pretrain_overrides(args) if pretrain else {}
    kwargs.pop("mask_type", None)
    in_chans = int(state["patch_embed.proj.weight"].shape[1])
    candidates = [name] if name else [a.pretrain if pretrain else a.classifier for a in ARCHITECTURES]
    blocks = ("blocks.", "layers.", "patch_embed.proj.weight")
    for candidate in candidates:
        arch = next((a for a in ARCHITECTURES if candidate in (a.pretrain, a.classifier, *a.official_names)), None)
        if candidate is None or arch.family != family:
            continue
        size = args.get("input_size") or arch.input_size
        try:
            model = check_buildable(candidate, size, in_chans, **(kwargs if family == "mae" else {}))
        except UsageError:  # an input size this architecture cannot take: not this one
            if name:
                raise
            continue
        own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(blocks)}
        theirs = {k: tuple(v.shape) for k, v in state.items() if k.startswith(blocks)}
        if own == theirs:
            return candidate, model
        if name:
            raise UsageError(
                f"--model {name} does not have the shapes of the weights in {src}"
                if flag
                else f"{src} names its model {name!r}, whose shapes its weights do not have: name it with --model"
            )
    raise UsageError(
        "the checkpoint's weights have the shapes of none of the models this project builds; name it with --model"
    )


def _check_named_family(name: str, family: str, src: str, flag: bool) -> None:
    """A one-line ``UsageError`` when ``name`` is no model of the table, or one of the other family than ``src``'s
    weights (``family``). ``flag``: the user named it (``--model``), else ``src`` did."""
    try:
        named = family_of(name)
    except UsageError:
        if flag:
            raise  # the unknown --model, with the names there are
        raise UsageError(f"{src} names its model {name!r}, which this project does not build: name its model with "
                         "--model") from None  # fmt: skip
    if named != family:
        raise UsageError(
            f"--model {name} is a {_WEIGHTS[named]} model; {src} holds {_WEIGHTS[family]} weights"
            if flag
            else f"{src} names its model {name!r}, a {_WEIGHTS[named]} model, but holds {_WEIGHTS[family]} weights: "
            "name its model with --model"
        )


def timm_architecture(patch: int, width: int, depth: int, heads: int) -> tuple[str, bool]:
    """timm's ViT architecture for a ViT of these sizes, and whether it is exactly one (else the one of the same
    width, which config.json's ``model_args`` then resize, as timm's own ``save_for_hf`` writes a resized model)."""
    exact = _TIMM_ARCH.get((patch, width, depth, heads))
    if exact:
        return exact, True
    return next((a for (_, w, _, _), a in _TIMM_ARCH.items() if w == width), "vit_base_patch16_224"), False


def _side(size) -> int:
    return int(size[0] if isinstance(size, tuple | list) else size)


def write_official(checkpoint: dict, state: dict, dst: str, encoder_only: bool) -> None:
    eps = saved_args(checkpoint).get("layer_norm_eps")
    if encoder_only and eps is not None and float(eps) != formats.OFFICIAL_EPS:
        logger.warning("the released encoder layout has no arguments: the LayerNorm eps %g these weights need is not "
                       "recorded (the scripts will build 1e-6); --to safetensors keeps it", eps)  # fmt: skip
    if encoder_only:
        save_atomic({"model": encoder_of(state)}, dst)
        return
    keep = {k: checkpoint[k] for k in ("args", "model_name", "data_stats", "epoch") if checkpoint.get(k) is not None}
    save_atomic({"model": state, **keep}, dst)


def write_hf(checkpoint: dict, state: dict, model: torch.nn.Module, dst: str, encoder_only: bool) -> str:
    """A Hugging Face folder for a ViT / MAE checkpoint; returns the class written."""
    args = saved_args(checkpoint)
    if "fc_norm.weight" in state and "norm.weight" not in state:
        raise UsageError(
            "a global-pool fine-tuned ViT (mean of the tokens, then fc_norm) has no Hugging Face class: --to timm or "
            "--to safetensors keep it whole; the pretraining checkpoint it came from converts to ViTMAEModel"
        )
    size = args.get("input_size")
    if isinstance(size, list | tuple) and len(set(size)) > 1:
        raise UsageError(f"input size {size[0]}x{size[1]}: Hugging Face's ViTMAE builds a square position grid only; "
                         "--to timm or --to safetensors keep non-square checkpoints")  # fmt: skip
    if "head.weight" in state or has_probe_head(state):  # a probe: its encoder only (its head is refused above)
        kind = "ViTModel" if encoder_only else "ViTForImageClassification"
    elif "decoder_embed.weight" in state and not encoder_only:
        kind = "ViTMAEForPreTraining"
    else:
        kind = "ViTMAEModel"
    keep = state if kind in ("ViTMAEForPreTraining", "ViTForImageClassification") else encoder_of(state)
    decoder_heads = model.decoder_blocks[0].attn.num_heads if kind == "ViTMAEForPreTraining" else None
    num_labels = int(state["head.weight"].shape[0]) if kind == "ViTForImageClassification" else 0
    config = formats.hf_config(kind, keep, args, model.blocks[0].attn.num_heads, decoder_heads, num_labels)
    _, prefix = formats.HF_CLASSES[kind]
    extra = {}
    stats = checkpoint.get("data_stats")
    if stats:  # what HF's image processor normalises with
        extra["preprocessor_config.json"] = {
            "image_mean": stats["mean"], "image_std": stats["std"], "do_normalize": True, "do_rescale": True,
            "do_resize": True, "image_processor_type": "ViTImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": _hw(config["image_size"]),
        }  # fmt: skip
    formats.save_hf_folder(formats.official_to_hf(keep, prefix), config, dst, extra)
    return kind


def _hw(size) -> dict:
    h, w = (size, size) if isinstance(size, int) else size
    return {"height": int(h), "width": int(w)}


def write_timm(checkpoint: dict, state: dict, model: torch.nn.Module, dst: str, encoder_only: bool) -> str:
    """A timm model folder (config.json + model.safetensors) of timm's own ViT; returns its architecture, in words."""
    args = saved_args(checkpoint)
    eps = args.get("layer_norm_eps")
    if eps is not None and float(eps) != formats.OFFICIAL_EPS:
        logger.warning("timm's ViT has LayerNorm eps 1e-6; these weights were trained with %g: outputs differ a little",
                       eps)  # fmt: skip
    classifier = "head.weight" in state and not encoder_only
    keep = encoder_of(state) if not classifier else state
    patch = model.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, tuple | list) else patch)
    width, depth, heads = int(state["cls_token"].shape[-1]), len(model.blocks), int(model.blocks[0].attn.num_heads)
    architecture, exact = timm_architecture(patch, width, depth, heads)
    size = args.get("input_size") or model.patch_embed.img_size
    h, w = (size, size) if isinstance(size, int) else size
    if not exact:
        what = (f"ViT (no timm architecture has patch {patch}, width {width}, depth {depth}; config.json builds it "
                f"with {architecture}'s factory and its model_args)")  # fmt: skip
    else:
        what = architecture if (int(h), int(w)) == (224, 224) else f"{architecture} at {h}x{w}"
    in_chans = int(state["patch_embed.proj.weight"].shape[1])
    global_pool = "avg" if "fc_norm.weight" in state and "norm.weight" not in state else "token"
    num_classes = int(state["head.weight"].shape[0]) if classifier else 0
    stats = checkpoint.get("data_stats") or {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": width,
        "global_pool": global_pool,
        "model_args": {
            "img_size": [int(h), int(w)],
            "patch_size": patch,
            "in_chans": in_chans,
            "embed_dim": width,
            "depth": depth,
            "num_heads": heads,
            "global_pool": global_pool,
        },
        "pretrained_cfg": {
            "tag": "mae" if not classifier else "mae_ft",
            "input_size": [in_chans, int(h), int(w)],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": list(stats["mean"]),
            "std": list(stats["std"]),
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "cc-by-nc-4.0",
        },
    }
    formats.save_hf_folder(keep, config, dst)
    return what


def convert(src: str, dst: str, to: str, encoder_only: bool = False, model_name: str | None = None) -> str:
    """Read ``src`` (any layout) and write it to ``dst`` in layout ``to``; returns what was written, in words."""
    if os.path.exists(dst):
        raise UsageError(f"{dst} exists: give a new path (nothing is written over a file or folder)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UsageError(f"the folder {parent} that would hold {dst} does not exist")
    checkpoint = load_checkpoint_file(src)
    state = {k: v for k, v in state_dict_of(checkpoint).items() if isinstance(v, torch.Tensor)}
    family = family_of_state_dict(state)
    if family is None:
        raise UsageError(f"{src} holds neither ViT (blocks.*) nor MixMIM (layers.*) weights")
    if to in ("hf", "timm") and family == "mixmim":
        name = "Hugging Face" if to == "hf" else "timm"
        raise UsageError(f"{name} has no MixMIM model: --to safetensors or --to official keep MixMIM checkpoints")
    if to in ("hf", "timm") and has_probe_head(state) and not encoder_only:
        name = "Hugging Face" if to == "hf" else "timm"
        raise UsageError(
            f"{src} holds a linear-probe head (head.0 BatchNorm, head.1 Linear: main_linprobe.py's), which {name} "
            "has no classifier for: --to safetensors or --to official keep it whole; --encoder_only writes the encoder "
            "alone"
        )
    flag = model_name is not None
    model_name = model_name or checkpoint.get("model_name") or saved_args(checkpoint).get("model")
    model_name, model = identify(state, saved_args(checkpoint), family, model_name, src, flag)
    heads = saved_args(checkpoint).get("num_heads")
    if family == "mae" and heads is not None and int(heads) != model.blocks[0].attn.num_heads:
        raise UsageError(f"{src} states {heads} attention heads; {model_name}, whose shapes its weights have, has "
                         f"{model.blocks[0].attn.num_heads}")  # fmt: skip
    # what the weights need that SRC may not say (the official files): the model's input size and channels
    size = model.patch_embed.img_size
    size = list(size) if isinstance(size, tuple | list) and size[0] != size[1] else int(_side(size))
    args = {"input_size": size, "in_chans": int(state["patch_embed.proj.weight"].shape[1]), **saved_args(checkpoint)}
    checkpoint = {**checkpoint, "model_name": model_name, "args": args}
    if to == "official":
        write_official(checkpoint, state, dst, encoder_only)
        what = "encoder (official layout)" if encoder_only else "official layout"
    elif to == "safetensors":
        formats.save_safetensors({**checkpoint, "model": encoder_of(state) if encoder_only else state}, dst)
        what = "safetensors with metadata"
    elif to == "hf":
        what = "Hugging Face " + write_hf(checkpoint, state, model, dst, encoder_only)
    else:
        what = "timm " + write_timm(checkpoint, state, model, dst, encoder_only)
    logger.info("wrote %s: %s", dst, what)
    return what


def main(args: argparse.Namespace) -> str:
    setup_logging(True)
    if args.encoder_only and args.to == "timm":
        logger.info("--encoder_only: the head is left out")
    return convert(args.src, args.dst, args.to, args.encoder_only, args.model)


if __name__ == "__main__":
    run_cli(argparse.ArgumentParser("MAE / MixMIM checkpoint converter", parents=[get_args_parser()]), main)
