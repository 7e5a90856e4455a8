"""Layer-wise learning-rate decay (following BEiT) for both model families.

Each parameter gets a layer id; its lr is scaled by ``layer_decay ** (num_layers - layer_id)``, so the patch
embedding learns slowest and the head fastest. 1-D parameters (biases, norms) and the model's
``no_weight_decay()`` names get no weight decay.
"""

from collections.abc import Callable, Iterable

import torch.nn as nn

from util.families import family_of_module


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer id of a ViT parameter: 0 for embeddings, i+1 for block i, num_layers for the norm and head."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def get_layer_id_for_mixmim(name: str, num_layers: list[int]) -> int:
    """Layer id of a MixMIM parameter, with ``num_layers`` the number of blocks per stage.

    Block j of stage i gets the running block index + 1; a stage's downsample layer goes with the first block of
    the next stage. As in the official code, the final norm and head get ``sum(num_layers)`` (one decay step below
    1.0), not the top id.
    """
    if name in ("cls_token", "pos_embed", "absolute_pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage = int(name.split(".")[1])
        if "downsample" in name:
            return sum(num_layers[: stage + 1]) + 1
        block = int(name.split(".")[3])
        return sum(num_layers[:stage]) + block + 1
    return sum(num_layers)


def layer_id_fn(model: nn.Module) -> tuple[int, Callable[[str], int]]:
    """(number of layers, name -> layer id) for a ViT (``model.blocks``) or a MixMIM encoder (``model.layers``).

    The number of layers is the number of transformer blocks + 1; block i (counted across MixMIM's stages) has id
    i + 1.
    """
    if family_of_module(model) == "mae":
        num_layers = len(model.blocks) + 1
        return num_layers, lambda n: get_layer_id_for_vit(n, num_layers)
    per_stage = [len(stage.blocks) for stage in model.layers]
    return sum(per_stage) + 1, lambda n: get_layer_id_for_mixmim(n, per_stage)


def param_groups_lrd(
    model: nn.Module,
    weight_decay: float = 0.05,
    no_weight_decay_list: Iterable[str] = (),
    layer_decay: float = 0.75,
) -> list[dict]:
    """Optimizer parameter groups with ``lr_scale`` and ``weight_decay`` set per layer, as the official function.

    Groups are named ``layer_{id}_{decay|no_decay}`` internally and returned in order of first appearance.
    """
    no_weight_decay_list = set(no_weight_decay_list)
    num_layers, layer_id_of = layer_id_fn(model)
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    param_groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = layer_id_of(n)
        group = param_groups.setdefault(
            f"layer_{layer_id}_{g_decay}",
            {"lr_scale": layer_scales[layer_id], "weight_decay": this_decay, "params": []},
        )
        group["params"].append(p)
    return list(param_groups.values())
