"""Partial fine-tuning (MAE paper, Figure 9): train only the last K transformer blocks, the final norm and the head.

Which block a parameter belongs to is the layer id of layer-wise lr decay (``util.lr_decay``): block i, counted
across MixMIM's stages, has id i + 1. A layer in front of a block goes with it: the patch embedding (and ViT's
``cls_token`` and ``pos_embed``, id 0) with the first block, a MixMIM patch merging layer with the first block of
the next stage, which is its lr-decay id too. So K = 0 trains the final norm (ViT: ``fc_norm`` with global pooling,
else ``norm``) and the head, and K = depth trains everything, as full fine-tuning.
"""

import torch.nn as nn

from util.errors import UsageError
from util.families import FAMILY_KEY_PREFIX, family_of_module
from util.lr_decay import layer_id_fn


def freeze_all_but_last_blocks(model: nn.Module, k: int) -> None:
    """Set ``requires_grad=False`` on the parameters in front of the last ``k`` blocks (a ``UsageError`` unless
    0 <= k <= depth). Frozen parameters are left out of the optimizer (``param_groups_lrd``) and of DDP's
    gradient all-reduce (DDP registers only parameters that require grad), so freeze before building either."""
    num_layers, layer_id_of = layer_id_fn(model)
    depth = num_layers - 1
    if not 0 <= k <= depth:
        raise UsageError(f"--trainable_blocks {k}: the model has {depth} transformer blocks, choose 0 to {depth}")
    body = FAMILY_KEY_PREFIX[family_of_module(model)]  # the blocks (and MixMIM's patch merging layers)
    for name, p in model.named_parameters():
        layer_id = layer_id_of(name)
        if name.startswith(body) or layer_id == 0:  # not the final norm or the head, which always train
            if max(layer_id, 1) <= depth - k:  # in or in front of a block before the last k
                p.requires_grad_(False)
