"""Weights in other layouts than the official ``.pth``, read by their content into the official layout and written
from it (``convert.py``).

- **Hugging Face** folders (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``): ``ViTMAEForPreTraining``
  (encoder, decoder and mask token: an MAE pretraining checkpoint), ``ViTMAEModel`` / ``ViTModel`` (the encoder), and
  ``ViTForImageClassification`` (the cls-token classifier: final norm, then the head). Both the hub's key names
  (``vit.encoder.layer.N.attention.attention.query``) and those of transformers 5 (``vit.layers.N.attention.q_proj``)
  are read; the hub's are written, as every transformers release loads them. HF splits the attention's ``qkv``
  projection into query / key / value; the official ``attn.qkv`` is their concatenation, in that order.
- **timm** folders (``config.json`` with ``architecture`` + ``model.safetensors``: what ``timm.create_model(
  "hf-hub:..." / "local-dir:...")`` reads) and timm's MAE weights (``vit_*_patch*_224.mae``): the official encoder
  keys already, without decoder or head.
- **safetensors** files: ours carry the metadata the scripts need (model name, input size, channels, mean / std,
  epoch and the run's arguments); any other is taken as a state dict in one of the layouts above.

Everything here is key names and ``config.json``: no model is built, and ``transformers`` is not needed.
"""

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch

from util.errors import UsageError
from util.files import write_atomic

OFFICIAL_EPS = 1e-6  # the official models' LayerNorm eps (HF's ViT default: 1e-12)
METADATA_FORMAT = "mae-mixmim"  # the "format" a safetensors file written here records (torch's own: "pt")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ----------------------------------------------------------------------------- content sniffing


def is_safetensors(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a safetensors file: an 8-byte little-endian header length, then the
    JSON header."""
    return len(head) >= 10 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 1 << 30


def read_checkpoint(path: str) -> dict | None:
    """A folder or safetensors file as a checkpoint dict of the official layout (``{"model", "args", "model_name",
    "data_stats", "epoch"}``, as far as the source says them), or None when ``path`` is a file of another kind (a
    ``.pth``: ``torch.load``'s business)."""
    if os.path.isdir(path):
        return _read_folder(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not is_safetensors(head):
        return None
    state, metadata = _load_safetensors(path)
    if metadata.get("format") == METADATA_FORMAT:
        return _checkpoint_from_metadata(state, metadata)
    config = Path(path).parent / "config.json"  # a model.safetensors inside a Hugging Face / timm folder
    if is_hf_state(state):
        if not config.is_file():
            raise UsageError(
                f"{path} holds Hugging Face weights but no config.json lies beside it: give the folder it came from"
            )
        return _checkpoint_from_hf(state, _read_json(config), path)
    return {"model": state}  # timm's layout, or a plain state dict of the official layout


def read_data_stats(path: str) -> dict | None:
    """The per-channel ``{"mean", "std"}`` a safetensors file's metadata or a Hugging Face / timm folder states
    (``preprocessor_config.json``'s ``image_mean`` / ``image_std``, timm's ``pretrained_cfg``), without reading the
    weights; None when it states none or ``path`` is neither."""
    folder = Path(path)
    if folder.is_dir():
        timm_cfg = (
            _read_json(folder / "config.json").get("pretrained_cfg", {}) if (folder / "config.json").is_file() else {}
        )
        if "mean" in timm_cfg and "std" in timm_cfg:
            return {"mean": list(timm_cfg["mean"]), "std": list(timm_cfg["std"])}
        pre = folder / "preprocessor_config.json"
        cfg = _read_json(pre) if pre.is_file() else {}
        if "image_mean" in cfg and "image_std" in cfg:
            return {"mean": list(cfg["image_mean"]), "std": list(cfg["image_std"])}
        return None
    metadata = _safetensors_metadata(path) or {}
    if metadata.get("format") == METADATA_FORMAT and "mean" in metadata and "std" in metadata:
        return {"mean": json.loads(metadata["mean"]), "std": json.loads(metadata["std"])}
    return None


def read_saved_args(path: str) -> dict | None:
    """The run arguments a folder or safetensors file states (its config / metadata; the weights are not read), or
    None when ``path`` is neither (a ``.pth``)."""
    folder = Path(path)
    if folder.is_dir():
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        return _hf_args(config) if config.get("model_type") in ("vit_mae", "vit") else {}
    metadata = _safetensors_metadata(path)
    if metadata is None:
        return None
    if metadata.get("format") == METADATA_FORMAT:
        return json.loads(metadata.get("args", "{}"))
    config = folder.parent / "config.json"
    return read_saved_args(str(folder.parent)) if config.is_file() else {}


def _load_weights_file(weights: Path) -> dict[str, torch.Tensor]:
    """One weights file of a model folder: safetensors, or a ``pytorch_model.bin`` of plain tensors."""
    if not weights.is_file():
        raise UsageError(f"{weights}, named by the folder's index, does not exist")
    if weights.suffix == ".safetensors":
        return _load_safetensors(str(weights))[0]
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torn, or pickling more than tensors: the first line of torch's reason
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise UsageError(f"{weights} cannot be read as weights ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{weights} holds a {type(state).__name__}, not a dict of weights")
    return state


def _safetensors_metadata(path: str) -> dict[str, str] | None:
    """A safetensors file's metadata (its header only: the weights are not read), or None for another kind of
    file."""
    with open(path, "rb") as f:
        if not is_safetensors(f.read(16)):
            return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is a truncated or corrupt safetensors file ({e})") from None


def _load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is a truncated or corrupt safetensors file ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def _read_folder(path: str) -> dict:
    folder = Path(path)
    config_file = folder / "config.json"
    files = [folder / n for n in _WEIGHT_FILES if (folder / n).is_file()][:1]
    index = next((folder / f"{n}.index.json" for n in _WEIGHT_FILES if (folder / f"{n}.index.json").is_file()), None)
    if not files and index is not None:  # a sharded checkpoint: the index maps each weight to its file
        shards = _read_json(index).get("weight_map", {})
        files = [folder / name for name in sorted(set(shards.values()))]
    if not config_file.is_file() or not files:
        raise UsageError(
            f"{path} is a folder, but not a Hugging Face or timm model folder (config.json with model.safetensors or "
            f"pytorch_model.bin); give a checkpoint file or such a folder"
        )
    config = _read_json(config_file)
    state = {}
    for weights in files:
        state.update(_load_weights_file(weights))
    if "architecture" in config and not is_hf_state(state):  # timm's hub folder: the official keys
        return _checkpoint_from_timm(state, config)
    checkpoint = _checkpoint_from_hf(state, config, path)
    stats = read_data_stats(path)
    if stats is not None:
        checkpoint["data_stats"] = stats
    return checkpoint


# ----------------------------------------------------------------------------- safetensors of ours


def save_safetensors(checkpoint: dict, path: str) -> None:
    """The weights of a checkpoint (official layout) as a safetensors file whose metadata says what the scripts
    need: ``model_name``, ``input_size``, ``in_chans``, ``mean`` / ``std``, ``epoch`` and the run's ``args`` (JSON);
    written atomically."""
    from safetensors.torch import save

    state = _plain(checkpoint["model"])
    args = checkpoint.get("args") or {}
    args = vars(args) if isinstance(args, argparse.Namespace) else args  # the official scripts pickle a Namespace
    stats = checkpoint.get("data_stats") or {}
    metadata = {"format": METADATA_FORMAT, "args": json.dumps(args, default=str)}
    fields = {
        "model_name": checkpoint.get("model_name") or args.get("model"),
        "input_size": args.get("input_size"),
        "in_chans": args.get("in_chans"),
        "mean": stats.get("mean"),
        "std": stats.get("std"),
        "epoch": checkpoint.get("epoch"),
    }
    metadata.update({k: json.dumps(v) for k, v in fields.items() if v is not None})
    data = save(state, metadata=metadata)
    write_atomic(path, lambda f: f.write(data))


def _plain(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of a state dict as safetensors takes them: detached, contiguous, none sharing storage."""
    return {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _checkpoint_from_metadata(state: dict, metadata: dict) -> dict:
    checkpoint: dict = {"model": state, "args": json.loads(metadata.get("args", "{}"))}
    fields = {k: json.loads(metadata[k]) for k in ("model_name", "mean", "std", "epoch") if k in metadata}
    if "model_name" in fields:
        checkpoint["model_name"] = fields["model_name"]
    if "mean" in fields and "std" in fields:
        checkpoint["data_stats"] = {"mean": fields["mean"], "std": fields["std"]}
    if "epoch" in fields:
        checkpoint["epoch"] = fields["epoch"]
    return checkpoint


# ----------------------------------------------------------------------------- Hugging Face keys

# one transformer block's parameters: HF's names (the hub's | transformers 5's) -> the official names
_HF_BLOCK = (
    (r"attention\.attention\.query|attention\.q_proj", "attn.q"),
    (r"attention\.attention\.key|attention\.k_proj", "attn.k"),
    (r"attention\.attention\.value|attention\.v_proj", "attn.v"),
    (r"attention\.output\.dense|attention\.o_proj", "attn.proj"),
    (r"layernorm_before", "norm1"),
    (r"layernorm_after", "norm2"),
    (r"intermediate\.dense|mlp\.fc1", "mlp.fc1"),
    (r"output\.dense|mlp\.fc2", "mlp.fc2"),
)
_OFFICIAL_TO_HUB_BLOCK = {
    "attn.proj": "attention.output.dense",
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV_HUB = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_PLAIN = {  # the other parameters: HF's name without the "vit." prefix -> the official name
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# a block of the encoder or decoder: hub, transformers 5, and what transformers 5's save_pretrained writes
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$")


def is_hf_state(state: dict) -> bool:
    """Whether a state dict has Hugging Face's ViT / ViTMAE key names."""
    return any(k.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in state)


def hf_to_official(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Hugging Face ViT / ViTMAE state dict with the official key names; query / key / value joined into ``qkv``.
    ``ViTModel``'s pooler is left out (MAE has none); a key of another model is a one-line error."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix("vit.")
        if name.startswith("pooler."):  # ViTModel's pooler (dense + tanh on the cls token): MAE has none
            continue
        if name in _HF_PLAIN:
            out[_HF_PLAIN[name]] = value
            continue
        layer = _HF_LAYER.match(name) or _HF_DECODER_LAYER.match(name)
        prefix = "decoder_blocks" if name.startswith("decoder.") else "blocks"
        mapped = None
        if layer:
            for pattern, official in _HF_BLOCK:
                found = re.fullmatch(rf"({pattern})\.(weight|bias)", layer.group(2))
                if found:
                    mapped = f"{prefix}.{layer.group(1)}.{official}.{found.group(found.lastindex)}"
                    break
        if mapped is None:
            raise UsageError(f"{source}: {key} is not a parameter of a Hugging Face ViT / ViTMAE model this reads")
        if ".attn." in mapped and mapped.rsplit(".", 2)[-2] in "qkv":
            stem, part, kind = mapped.rsplit(".", 2)
            qkv.setdefault(f"{stem.removesuffix('.attn')}.attn.qkv.{kind}", {})[part] = value
        else:
            out[mapped] = value
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UsageError(f"{source}: {key} lacks {', '.join(sorted({'q', 'k', 'v'} - set(parts)))} of q / k / v")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, D) / (3D,): the official order
    return dict(sorted(out.items(), key=lambda kv: _official_order(kv[0])))


def _official_order(key: str) -> tuple:
    """Sort key: the order of the official model's state dict (embeddings, blocks, norm, decoder, head)."""
    groups = ("cls_token", "pos_embed", "mask_token", "patch_embed", "blocks", "norm", "decoder", "head")
    first = next(i for i, g in enumerate(groups + ("",)) if key.startswith(g))
    numbers = tuple(int(n) for n in re.findall(r"\.(\d+)\.", key))
    return first, numbers, key


def official_to_hf(state: dict[str, torch.Tensor], prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """The official state dict with the Hugging Face hub's key names (``prefix``: ``"vit."`` for the pretraining
    and classification models, ``""`` for the encoder models); ``qkv`` split into query / key / value."""
    plain = {v: k for k, v in _HF_PLAIN.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if block:
            kind, index, part, suffix = block.groups()
            stem = f"{prefix}encoder.layer.{index}." if kind == "blocks" else f"decoder.decoder_layers.{index}."
            if part == "attn.qkv":
                for name, chunk in zip(_QKV_HUB, value.chunk(3, dim=0), strict=True):
                    out[f"{stem}{name}.{suffix}"] = chunk.clone()  # a view of qkv would share its storage
            else:
                out[f"{stem}{_OFFICIAL_TO_HUB_BLOCK[part]}.{suffix}"] = value
        elif key in plain:
            name = plain[key]
            out[name if name.startswith(("decoder.", "classifier.")) else prefix + name] = value
        else:
            raise UsageError(f"{key} has no counterpart in Hugging Face's ViT / ViTMAE")
    return out


# ----------------------------------------------------------------------------- Hugging Face configs

HF_CLASSES = {
    "ViTMAEForPreTraining": ("vit_mae", "vit."),
    "ViTMAEModel": ("vit_mae", ""),
    "ViTModel": ("vit", ""),
    "ViTForImageClassification": ("vit", "vit."),
}


def _checkpoint_from_hf(state: dict, config: dict, source: str) -> dict:
    """A Hugging Face model's weights and config as a checkpoint of the official layout, with the arguments the
    scripts build the model from (``input_size``, ``in_chans``, ``norm_pix_loss``, ``mask_ratio``, the decoder's size
    and ``layer_norm_eps``)."""
    if config.get("model_type") not in ("vit_mae", "vit"):
        raise UsageError(f"{source}: a Hugging Face {config.get('model_type')!r} model, not ViT / ViTMAE")
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise UsageError(f"{source}: hidden_act {config.get('hidden_act')!r} / qkv_bias "
                         f"{config.get('qkv_bias')}: the official ViT has exact GELU and a qkv bias")  # fmt: skip
    hidden, intermediate = config.get("hidden_size"), config.get("intermediate_size")
    if hidden and intermediate and intermediate != 4 * hidden:
        raise UsageError(f"{source}: intermediate_size {intermediate} is not 4 x hidden_size {hidden} (mlp ratio 4)")
    model = hf_to_official(state, source)
    try:
        args = _hf_args(config)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(
            f"{source}: config.json has a missing or malformed setting ({type(e).__name__}: {e})"
        ) from None
    if "decoder_embed.weight" not in model:
        args = {k: v for k, v in args.items() if not k.startswith("decoder_")}
    _check_config(model, config, args, source)
    return {"model": model, "args": args}


def _check_config(model: dict, config: dict, args: dict, source: str) -> None:
    """The sizes ``config.json`` states against those of its weights: one line for the first that differs."""
    patch = model.get("patch_embed.proj.weight")
    if patch is None or "pos_embed" not in model:
        raise UsageError(f"{source}: no patch embedding or position embedding among the weights")
    h, w = (args["input_size"],) * 2 if isinstance(args["input_size"], int) else args["input_size"]
    p = int(config.get("patch_size", patch.shape[-1]))
    checks = [
        ("hidden_size", config.get("hidden_size"), int(patch.shape[0])),
        ("num_hidden_layers", config.get("num_hidden_layers"), _count(model, "blocks.")),
        ("patch_size", p, int(patch.shape[-1])),
        ("num_channels", args["in_chans"], int(patch.shape[1])),
        ("image_size (tokens)", (h // p) * (w // p) + 1, int(model["pos_embed"].shape[1])),
    ]
    if "decoder_embed.weight" in model:
        checks += [
            ("decoder_hidden_size", args.get("decoder_embed_dim"), int(model["decoder_embed.weight"].shape[0])),
            ("decoder_num_hidden_layers", args.get("decoder_depth"), _count(model, "decoder_blocks.")),
        ]
    for name, stated, found in checks:
        if stated is not None and int(stated) != found:
            raise UsageError(f"{source}: config.json says {name} {stated}, its weights have {found}")


def _count(model: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in model if k.startswith(prefix)})


def _hf_args(config: dict) -> dict:
    """The arguments of a run that a Hugging Face ViT / ViTMAE config states."""
    size = config.get("image_size", 224)
    args = {
        "input_size": list(size) if isinstance(size, list | tuple) else int(size),
        "in_chans": int(config.get("num_channels", 3)),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "num_heads": int(config.get("num_attention_heads", 0)) or None,
    }
    if config.get("model_type") == "vit_mae":
        args.update(norm_pix_loss=bool(config.get("norm_pix_loss", False)), mask_ratio=config.get("mask_ratio", 0.75))
        if "decoder_hidden_size" in config:
            args.update(
                decoder_embed_dim=int(config["decoder_hidden_size"]),
                decoder_depth=int(config["decoder_num_hidden_layers"]),
                decoder_num_heads=int(config["decoder_num_attention_heads"]),
            )
    return args


def hf_config(kind: str, model: dict, args: dict, heads: int, decoder_heads: int | None, num_labels: int = 0) -> dict:
    """The ``config.json`` of a Hugging Face ``kind`` (a key of ``HF_CLASSES``) for an official state dict ``model``
    with ``heads`` attention heads (``decoder_heads``: the MAE decoder's) trained with ``args``."""
    model_type, _ = HF_CLASSES[kind]
    hidden = int(model["cls_token"].shape[-1])
    patch = model["patch_embed.proj.weight"]
    size = args.get("input_size", 224)
    config = {
        "architectures": [kind],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": len({k.split(".")[1] for k in model if k.startswith("blocks.")}),
        "num_attention_heads": int(heads),
        "intermediate_size": int(model["blocks.0.mlp.fc1.weight"].shape[0]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(args.get("layer_norm_eps") or OFFICIAL_EPS),
        "image_size": size if isinstance(size, int) else list(size),
        "patch_size": int(patch.shape[-1]),
        "num_channels": int(patch.shape[1]),
        "qkv_bias": True,
    }
    if kind == "ViTMAEForPreTraining":
        config.update(
            decoder_hidden_size=int(model["decoder_embed.weight"].shape[0]),
            decoder_num_hidden_layers=len({k.split(".")[1] for k in model if k.startswith("decoder_blocks.")}),
            decoder_num_attention_heads=int(decoder_heads),
            decoder_intermediate_size=int(model["decoder_blocks.0.mlp.fc1.weight"].shape[0]),
            mask_ratio=float(args.get("mask_ratio") or 0.75),
            norm_pix_loss=bool(args.get("norm_pix_loss", False)),
        )
    if kind == "ViTForImageClassification":
        config.update(num_labels=num_labels, id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
                      label2id={f"LABEL_{i}": i for i in range(num_labels)})  # fmt: skip
    return config


def save_hf_folder(state: dict, config: dict, folder: str, extra: dict[str, dict] | None = None) -> None:
    """``config.json`` and ``model.safetensors`` (``save_pretrained``'s layout), and ``extra`` JSON files by name, in
    a new ``folder``: written into a temporary folder beside it, which is renamed to ``folder`` when complete."""
    from safetensors.torch import save_file

    tmp = Path(f"{folder}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_plain(state), tmp / "model.safetensors", metadata={"format": "pt"})
        for name, value in {"config.json": config, **(extra or {})}.items():
            (tmp / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- timm


def _checkpoint_from_timm(state: dict, config: dict) -> dict:
    cfg = config.get("pretrained_cfg", {})
    args = {k: v for k, v in config.get("model_args", {}).items() if k in ("in_chans",)}
    size = cfg.get("input_size")
    if size:
        args["input_size"] = size[1] if size[1] == size[2] else list(size[1:])
        args.setdefault("in_chans", size[0])
    checkpoint = {"model": state, "args": args}
    if "mean" in cfg and "std" in cfg:
        checkpoint["data_stats"] = {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    return checkpoint
