"""Checkpoints: atomic saves, ``--resume PATH|auto``, and ``--finetune`` loading of pretrained weights.

A checkpoint is a plain dict, ``{"model", "optimizer", "scaler", "epoch", "args" (a dict), "model_name",
"data_stats"}`` (``data_stats``: the per-channel ``mean`` and ``std`` lists the images were normalised with), that
loads with ``torch.load(weights_only=True)``. Every write goes to a temporary file in the same folder that is
renamed over the target, so a file named ``checkpoint-*.pth`` is always complete. Official checkpoints (which
pickle an ``argparse.Namespace``) load too: that one class is allow-listed, nothing else.
"""

import argparse
import codecs
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv

from util import faults, formats, pos_embed
from util.cli import args_to_dict
from util.dist import get_world_size, is_main_process
from util.errors import UsageError
from util.families import FAMILY_TITLE, family_of_module, family_of_state_dict, unwrap
from util.files import NPY_MAGIC, decodes_as_utf8, fsync_dir, image_format, temp_path, write_atomic

logger = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")
_TEMP = re.compile(r"^\.checkpoint-(\d+|last)\.pth\.tmp\.\d+$")


# ----------------------------------------------------------------------------- files


def load_checkpoint_file(path: str | os.PathLike, weights: bool = True) -> dict:
    """``torch.load`` on the CPU with ``weights_only=True`` (``argparse.Namespace`` allowed for official files).

    One-line ``UsageError`` for a file that is no checkpoint (JSON, text, an image, ... told apart by its first
    bytes before torch reads it), a truncated or corrupt one, one that pickles objects other than plain data (the
    first such class named; loading it with ``weights_only=False`` could run any code, so nothing suggests that),
    and, with ``weights``, a dict without model weights (no tensor where ``state_dict_of`` looks)."""
    path = str(path)
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} does not exist")
    checkpoint = formats.read_checkpoint(path)  # a Hugging Face / timm folder, a safetensors file
    if checkpoint is not None:
        return _checked(checkpoint, path, weights)
    with open(path, "rb") as f:
        head = f.read(4096)
    kind = _not_torch_kind(head)
    if kind:
        raise UsageError(f"{path} is not a checkpoint ({kind}); give a .pth file written by torch.save, a "
                         "safetensors file or a Hugging Face / timm model folder")  # fmt: skip
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: never repeat that
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if found:
            raise UsageError(
                f"checkpoint {path} holds a pickled `{found.group(1)}` object, not plain data; only plain dicts / "
                f"tensors (and the official argparse.Namespace) are read"
            ) from None
        if not head.startswith((b"PK\x03\x04", _LEGACY_MAGIC)):
            raise UsageError(f"{path} is not a checkpoint (it looks like a Python pickle that torch.save did "
                             "not write); give a .pth file written by torch.save") from None  # fmt: skip
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({_unpickler_reason(e)})") from None
    except Exception as e:  # a torn or foreign file fails in many ways inside the unpickler / zip reader
        kind = _foreign_zip(path)
        if kind:
            raise UsageError(f"{path} is not a checkpoint ({kind}); give a .pth file written by torch.save") from e
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]  # torch's reason, not its speculation
        first = first or ("the file ends early" if isinstance(e, EOFError) else "no reason given")
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first})") from e
    return _checked(checkpoint, path, weights)


def _checked(checkpoint, path: str, weights: bool) -> dict:
    if not isinstance(checkpoint, dict):
        raise UsageError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    if weights and not any(isinstance(v, torch.Tensor) for v in _weights_of(checkpoint).values()):
        keys = ", ".join(map(str, list(checkpoint)[:6])) + (", ..." if len(checkpoint) > 6 else "")
        raise UsageError(
            f"checkpoint {path} holds no model weights: a dict of {{{keys}}} without tensors under 'model', "
            f"'state_dict' or at its top level"
        )
    return checkpoint


_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save before PyTorch 1.6: a pickled magic number


def _not_torch_kind(head: bytes) -> str | None:
    """What a file whose first bytes are ``head`` looks like when torch.save did not write it, else None."""
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a pickle (its legacy format): torch decides
        return None
    if not head:
        return "it is empty"
    if head.startswith(NPY_MAGIC):
        return "it looks like a NumPy .npy array"
    if head.startswith(b"\x89HDF"):
        return "it looks like an HDF5 file"
    fmt = image_format(head)
    if fmt:
        return f"it looks like a {fmt} image"
    if not decodes_as_utf8(head):
        return "it is binary data of another format"
    text = head.removeprefix(codecs.BOM_UTF8).decode("utf-8", "ignore")  # "ignore": a character cut at the end
    return "it looks like JSON text" if text.lstrip().startswith(("{", "[")) else "it looks like text"


def _unpickler_reason(e: Exception) -> str:
    """The first sentence of the unpickler's own line in torch's weights-only error, without torch's advice."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    line = found.group(1) if found else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    return line.strip().split(". ")[0]


def _foreign_zip(path: str) -> str | None:
    """For a zip archive that torch.save did not write (a NumPy ``.npz``, ...): what it holds; else None."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):  # a torn checkpoint: not a readable zip at all
        return None
    if not names or any(n.endswith("data.pkl") for n in names):
        return None
    return f"it is a zip archive of {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` through ``write_atomic``: ``path`` is always a complete checkpoint.

    A process killed partway through leaves ``path`` as it was and a ``.{name}.tmp.{pid}`` file behind, which
    ``--resume`` never reads and ``remove_stale_temp_files`` deletes.
    """
    write_atomic(path, lambda f: torch.save(obj, faults.writer(f, "save", obj.get("epoch"))))


def _link_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (hard link, else a copy), atomically."""
    tmp = temp_path(dst)
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def save_checkpoint(
    args: argparse.Namespace,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_scaler,
    numbered: bool,
    position: dict | None = None,
) -> None:
    """Write ``checkpoint-last.pth`` and, if ``numbered``, ``checkpoint-{epoch}.pth`` (main process only).

    ``position``: for a checkpoint inside epoch ``epoch``, ``{"step": the next step, "rng": every rank's RNG
    states}``; stored as the checkpoint's ``step`` and ``rng``.
    """
    if not args.output_dir or not is_main_process():
        return
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": loss_scaler.state_dict(),
        "epoch": epoch,
        "args": args_to_dict(args),
        "model_name": getattr(args, "model_name", args.model),
    }
    if getattr(args, "mean", None) is not None:
        state["data_stats"] = {"mean": list(args.mean), "std": list(args.std)}
    if position is not None:
        state.update(position)
    out = Path(args.output_dir)
    last = out / LAST
    save_atomic(state, last)
    if numbered:
        _link_atomic(last, out / f"checkpoint-{epoch}.pth")
    where = f" (epoch {epoch}, before step {position['step']})" if position is not None else ""
    logger.info("saved %s%s%s", last, where, f" and checkpoint-{epoch}.pth" if numbered else "")


# ----------------------------------------------------------------------------- resume


def find_resume_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in ``output_dir``: ``checkpoint-last.pth``, else the highest-numbered one.

    Files that fail to load are skipped with a warning; temporary files are never considered.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    numbered = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _NUMBERED.match(p.name)) and p.is_file())
    candidates = [out / LAST] if (out / LAST).is_file() else []
    candidates += [p for _, p in reversed(numbered)]
    for path in candidates:
        try:
            load_checkpoint_file(path, weights=False)
        except UsageError as e:
            logger.warning("skipping %s: %s", path, e)
            continue
        return str(path)
    return None


def remove_stale_temp_files(output_dir: str) -> None:
    """Delete the temporary files of checkpoint writes that a killed run left in ``output_dir`` (main process)."""
    out = Path(output_dir)
    if not is_main_process() or not out.is_dir():
        return
    for p in out.iterdir():
        if _TEMP.match(p.name):
            logger.info("removing %s, left by an interrupted checkpoint write", p)
            p.unlink(missing_ok=True)


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's workers; 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resolve_resume(args: argparse.Namespace) -> None:
    """Turn ``--resume auto`` into a path (or '' when there is nothing to resume from).

    A worker that torchrun restarted after a failure resumes as with ``--resume auto`` when no ``--resume`` is
    given: a restart never starts the run over.

    A ``--resume`` path that does not exist inside ``--output_dir`` is read as the official MixMIM scripts mean
    it (``--resume ${work_path}/ckpt/checkpoint.pth`` on every launch): resume from the newest checkpoint there,
    if any. Elsewhere, and for ``--eval`` (which evaluates the checkpoint named, or with ``auto`` the newest, and
    nothing else), a missing path is an error.
    """
    if not args.resume and restart_count() > 0 and args.output_dir and not getattr(args, "eval", False):
        logger.info("torchrun restart %d: resuming as with --resume auto", restart_count())
        args.resume = "auto"
    if not args.resume:
        return
    if args.resume == "auto":
        if not args.output_dir:
            raise UsageError("--resume auto needs --output_dir")
        remove_stale_temp_files(args.output_dir)
        found = find_resume_checkpoint(args.output_dir)
        if not found and getattr(args, "eval", False):
            raise UsageError(f"--eval --resume auto: no checkpoint in {args.output_dir} to evaluate")
        logger.info("--resume auto: %s", found or f"no checkpoint in {args.output_dir}, starting from scratch")
        args.resume = found or ""
        return
    path = Path(args.resume)
    if path.is_file() or (path / "config.json").is_file():  # a checkpoint, or a Hugging Face / timm folder
        return
    if path.is_dir():
        raise UsageError(f"--resume {args.resume} is a folder without a config.json: give a checkpoint file, a "
                         "Hugging Face / timm model folder, or --resume auto with --output_dir")  # fmt: skip
    if (
        args.output_dir
        and path.parent.resolve() == Path(args.output_dir).resolve()
        and not getattr(args, "eval", False)
    ):
        remove_stale_temp_files(args.output_dir)
        found = find_resume_checkpoint(args.output_dir)
        logger.info("--resume %s does not exist; resuming from %s", args.resume, found or "scratch")
        args.resume = found or ""
        return
    raise UsageError(f"--resume {args.resume} does not exist")


def _weights_of(checkpoint: dict) -> dict:
    """The dict of a checkpoint that holds the model weights: under ``model``, ``state_dict`` or at top level."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def state_dict_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: under ``model``, ``state_dict`` or at top level; ``module.`` stripped."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in _weights_of(checkpoint).items()}


def head_size(path: str) -> int | None:
    """The outputs of a checkpoint's classifier head (fine-tuned: ``head.weight``; linear probe: ``head.1.weight``),
    or None for a checkpoint without one (pretraining)."""
    state = state_dict_of(load_checkpoint_file(path))
    for key in ("head.weight", "head.1.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def _mismatch_summary(model: nn.Module, state_dict: dict, ignore_missing=(), ignore_unexpected=()) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and k not in ignore_missing]
    unexpected = [k for k in state_dict if k not in own and k not in ignore_unexpected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (ckpt vs model)", shapes)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > 4 else ""
            parts.append(f"{label}: {', '.join(keys[:4])}{more}")
    return "; ".join(parts)


def load_model_strict(model: nn.Module, state_dict: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that lists what does not fit."""
    problems = _mismatch_summary(model, state_dict)
    if problems:
        raise UsageError(f"checkpoint {source} does not fit the model: {problems}")
    model.load_state_dict(state_dict)


def run_layout(args: argparse.Namespace) -> dict:
    """What a position inside an epoch depends on: the number of processes, ``--batch_size`` and ``--accum_iter``."""
    return {"world_size": get_world_size(), "batch_size": args.batch_size, "accum_iter": args.accum_iter}


def load_resume(
    args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_scaler
) -> dict | None:
    """Load ``--resume`` (after ``resolve_resume``): weights always; optimizer, scaler and epoch unless ``--eval``.

    Returns the position inside ``args.start_epoch`` for a checkpoint written inside an epoch (``{"step", "rng"}``,
    for ``engine_*.fit``), else None.
    """
    if not args.resume:
        return None
    checkpoint = load_checkpoint_file(args.resume)
    check_stated_heads(model, checkpoint, args.resume)
    state = state_dict_of(checkpoint)
    try:
        load_model_strict(unwrap(model), state, args.resume)
    except UsageError as e:
        if any(map(_is_pretraining_key, state)) and not any(map(_is_pretraining_key, unwrap(model).state_dict())):
            raise UsageError(f"{e}; it is a pretraining checkpoint: start from its weights with --finetune "
                             f"{args.resume} (--resume continues a run of this script)") from None  # fmt: skip
        raise
    saved_mask, own_mask = saved_args(checkpoint).get("mask_type"), getattr(unwrap(model), "mask_type", None)
    if saved_mask and own_mask and saved_mask != own_mask:  # the weights fit either way: say it, not train on
        raise UsageError(f"checkpoint {args.resume} was pretrained with --mask_type {saved_mask}, this run has "
                         f"--mask_type {own_mask}: resume with the same flags")  # fmt: skip
    logger.info("Resume checkpoint %s", args.resume)
    if optimizer is not None and "optimizer" in checkpoint and "epoch" in checkpoint and not getattr(args, "eval", 0):
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as e:
            raise UsageError(f"checkpoint {args.resume}: optimizer state does not fit this run: {e}") from e
        if "scaler" in checkpoint and loss_scaler is not None:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        if "step" in checkpoint:  # written inside the epoch: continue that epoch at that step
            layout = run_layout(args)
            saved = checkpoint.get("layout", layout)
            if saved != layout:
                raise UsageError(
                    f"checkpoint {args.resume} was written inside epoch {checkpoint['epoch']} by a run with "
                    f"{saved}; this run has {layout}: resume with the same processes, --batch_size and --accum_iter "
                    f"(or from a checkpoint-N.pth written at an epoch's end)"
                )
            args.start_epoch = int(checkpoint["epoch"])
            logger.info(
                "With optimizer & scaler state; continuing epoch %d at step %d", args.start_epoch, checkpoint["step"]
            )
            return {"step": int(checkpoint["step"]), "rng": checkpoint.get("rng")}
        args.start_epoch = int(checkpoint["epoch"]) + 1
        logger.info("With optimizer & scaler state; continuing at epoch %d", args.start_epoch)
    return None


# ----------------------------------------------------------------------------- pretrained weights


def interpolate_pos_embed_any(model: nn.Module, state_dict: dict, grid: tuple[int, int] | None = None) -> None:
    """Resize position embeddings / relative-position tables of ``state_dict`` in place to fit ``model`` (an MAE's
    decoder position embedding too). ``grid``: the checkpoint's patch grid (Gh, Gw) when known (ViT / MAE)."""
    if family_of_module(model) == "mixmim":
        pos_embed.interpolate_pos_embed_mixmim(model, state_dict)
    else:
        pos_embed.interpolate_pos_embed(model, state_dict, orig_grid=grid)
        if hasattr(model, "decoder_pos_embed"):
            pos_embed.interpolate_pos_embed(model, state_dict, key="decoder_pos_embed", orig_grid=grid)


def saved_args(checkpoint: dict) -> dict:
    """The arguments a checkpoint was trained with: ours store a dict, the official scripts a pickled
    ``argparse.Namespace``; {} when it has none."""
    saved = checkpoint.get("args") or {}
    return vars(saved) if isinstance(saved, argparse.Namespace) else saved if isinstance(saved, dict) else {}


def saved_norm_eps(*paths: str) -> float | None:
    """The LayerNorm eps that the first of ``paths`` (``--resume``, ``--finetune``) states its weights need, or None
    (the model's own). Weights from Hugging Face state theirs (``args["layer_norm_eps"]``), and every run started
    from them keeps it in its checkpoints. The weights are not read."""
    for path in paths:
        eps = saved_args_of(path).get("layer_norm_eps") if path else None
        if eps is not None:
            return float(eps)
    return None


def saved_args_of(path: str) -> dict:
    """``saved_args`` of the checkpoint at ``path`` without reading its weights (a ``.pth`` is memory-mapped; a
    folder's config and a safetensors header are read); {} for a path that does not exist or cannot be mapped (the
    weight loading reports those)."""
    if not os.path.exists(path):
        return {}
    args = formats.read_saved_args(path)  # a folder or safetensors file
    if args is not None:
        return args
    try:
        return saved_args(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # a legacy or foreign file
        return {}


def read_overlay_file(kwargs: dict) -> dict:
    """A timm factory's keywords with ``pretrained_cfg_overlay=dict(file=...)`` read by content here (timm picks its
    reader by the file name, and reads no folder): the file's weights become the overlay's ``state_dict`` (timm's
    own pass-through), and the LayerNorm eps they state a ``layer_norm_eps`` keyword unless one is given."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if not overlay.get("file") or "state_dict" in overlay:
        return kwargs
    checkpoint = load_checkpoint_file(overlay["file"])
    out = {**kwargs, "pretrained_cfg_overlay": {**overlay, "state_dict": state_dict_of(checkpoint)}}
    eps = saved_args(checkpoint).get("layer_norm_eps")
    if eps is not None:
        out.setdefault("layer_norm_eps", float(eps))
    return out


def check_stated_heads(model: nn.Module, checkpoint: dict, source: str) -> None:
    """Weights whose config states their attention heads (Hugging Face's ``num_attention_heads``, kept in the
    arguments as ``num_heads``) go into a model with as many: the shapes do not tell heads apart."""
    stated = saved_args(checkpoint).get("num_heads")
    blocks = getattr(unwrap(model), "blocks", None)
    if stated is None or not blocks:
        return
    own = blocks[0].attn.num_heads
    if int(stated) != own:
        raise UsageError(f"{source} states {stated} attention heads, the model has {own}: choose the --model with "
                         f"{stated}")  # fmt: skip


def checkpoint_grid(checkpoint: dict) -> tuple[int, int] | None:
    """The patch grid (Gh, Gw) of a ViT / MAE checkpoint that records its input size (ours, in ``args``), from that
    size and its patch embedding's patch; None when it does not say."""
    size = saved_args(checkpoint).get("input_size")
    weight = state_dict_of(checkpoint).get(PATCH_EMBED_WEIGHT)
    if size is None or weight is None or weight.ndim != 4:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    patch = weight.shape[-1]
    return int(h) // patch, int(w) // patch


PATCH_EMBED_WEIGHT = "patch_embed.proj.weight"  # (D, C, p, p) in both families


def adapt_patch_embed(model: nn.Module, state_dict: dict, source: str) -> None:
    """A checkpoint's patch embedding for another number of input channels, in place: timm's ``adapt_input_conv``
    rule (from 3 to 1 channel: the sum over RGB; to N: RGB repeated over the N channels and scaled by 3 / N, so a
    grey image repeated N times gives the output of the RGB original)."""
    own = model.state_dict().get(PATCH_EMBED_WEIGHT)
    weight = state_dict.get(PATCH_EMBED_WEIGHT)
    if own is None or weight is None or weight.ndim != 4 or weight.shape[1] == own.shape[1]:
        return
    if weight.shape[1] != 3:
        raise UsageError(f"{source}: {PATCH_EMBED_WEIGHT} takes {weight.shape[1]} channels, the model {own.shape[1]}; "
                         "only a 3-channel patch embedding can be adapted")  # fmt: skip
    logger.info("%s: patch embedding adapted from 3 to %d input channels (timm's adapt_input_conv)", source,
                own.shape[1])  # fmt: skip
    state_dict[PATCH_EMBED_WEIGHT] = adapt_input_conv(own.shape[1], weight)


def _is_pretraining_key(key: str) -> bool:
    """A parameter only pretraining models have (both families): the decoder's and the mask token."""
    return key.startswith("decoder") or key == "mask_token"


def _is_pretraining_only(key: str, model_keys: set[str]) -> bool:
    """Keys of a pretraining checkpoint that a classifier drops: the decoder, the mask token, and the final
    ``norm`` that global-pool classifiers replace with ``fc_norm``."""
    if _is_pretraining_key(key):
        return True
    return key.startswith("norm.") and not any(k.startswith("norm.") for k in model_keys)


def load_pretrained(
    model: nn.Module, path: str, head_init_std: float | None = 2e-5, classifier: bool = True
) -> tuple[list[str], list[str]]:
    """``--finetune``: load pretrained weights (ours or official) into ``model`` and return (missing, unexpected).

    For a classifier: a head of another shape is dropped and re-initialised (trunc normal, ``head_init_std``, as
    official), position embeddings are interpolated, a 3-channel patch embedding is adapted to the model's input
    channels (``adapt_patch_embed``), and the load fails with one line if a key other than the
    head / ``fc_norm`` / buffers is missing, or a key other than the decoder's is unexpected. For a pretraining
    model (``--finetune`` in pretraining: continued pretraining) the same adaptations are made, everything that
    fits is loaded and the rest reported; a checkpoint without a decoder leaves the model's decoder as initialised.
    """
    checkpoint = load_checkpoint_file(path)
    check_stated_heads(model, checkpoint, path)
    grid = checkpoint_grid(checkpoint)
    return load_pretrained_state(model, state_dict_of(checkpoint), path, head_init_std, classifier, grid)


def load_pretrained_state(
    model: nn.Module,
    state_dict: dict,
    path: str,
    head_init_std: float | None = 2e-5,
    classifier: bool = True,
    grid: tuple[int, int] | None = None,
) -> tuple[list[str], list[str]]:
    """``load_pretrained`` of a state dict in memory (``path`` names its source in messages); ``state_dict`` is
    changed in place (head dropped, position embeddings resized). ``grid``: its patch grid (Gh, Gw) when known
    (else square, or the model's when the sizes match: ``interpolate_pos_embed``)."""
    own = model.state_dict()
    ck_family, own_family = family_of_state_dict(state_dict), family_of_module(model)
    if ck_family and ck_family != own_family:
        raise UsageError(
            f"--finetune {path} is a {FAMILY_TITLE[ck_family]} checkpoint but the model is {FAMILY_TITLE[own_family]}"
        )
    logger.info("Load pre-trained checkpoint from: %s", path)

    for k in ("head.weight", "head.bias"):  # a head of another shape, or none in the model (a backbone)
        if k in state_dict and (k not in own or state_dict[k].shape != own[k].shape):
            logger.info("Removing key %s from pretrained checkpoint", k)
            del state_dict[k]
    interpolate_pos_embed_any(model, state_dict, grid)
    adapt_patch_embed(model, state_dict, path)

    own_keys = set(own)
    buffers = {n for n, _ in model.named_buffers()}
    if classifier:
        allowed_missing = {k for k in own_keys if k.startswith(("head.", "fc_norm.")) or k in buffers}
        allowed_unexpected = {k for k in state_dict if _is_pretraining_only(k, own_keys)}
        problems = _mismatch_summary(model, state_dict, allowed_missing, allowed_unexpected)
        if problems:
            raise UsageError(f"--finetune {path} does not fit --model: {problems}")
    else:
        for k in [k for k in state_dict if k in own and state_dict[k].shape != own[k].shape]:
            logger.warning("not loading %s: shape %s vs %s", k, tuple(state_dict[k].shape), tuple(own[k].shape))
            del state_dict[k]
        if any(k.startswith("decoder") for k in own_keys) and not any(k.startswith("decoder") for k in state_dict):
            logger.info("%s holds no decoder (an encoder-only checkpoint): the decoder starts from scratch", path)

    msg = model.load_state_dict(state_dict, strict=False)
    logger.info("missing keys: %s", msg.missing_keys)
    logger.info("unexpected keys: %s", msg.unexpected_keys)
    if classifier and head_init_std is not None and hasattr(model, "head") and hasattr(model.head, "weight"):
        trunc_normal_(model.head.weight, std=head_init_std)  # as official: a tiny random head
    return list(msg.missing_keys), list(msg.unexpected_keys)
