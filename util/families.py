"""Which family a checkpoint or a built model belongs to, read from its state dict's keys.

A checkpoint does not always name its model (the official ones do not), so the family is told by the prefix of its
transformer blocks: ViT's ``blocks.*``, MixMIM's stages ``layers.*``. Built models are told by the same rule, so a
checkpoint and the model it is loaded into are compared alike. The model table (``model_table.py``) answers the same
question for model names; it sits above the model files, this module below them.
"""

import torch.nn as nn

FAMILY_KEY_PREFIX = {"mae": "blocks.", "mixmim": "layers."}
FAMILY_TITLE = {"mae": "ViT (MAE)", "mixmim": "MixMIM"}  # the family's name in messages


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def family_of_state_dict(keys) -> str | None:
    """The family whose blocks the state dict's keys hold, or None."""
    keys = list(keys)
    for family, prefix in FAMILY_KEY_PREFIX.items():
        if any(k.startswith(prefix) for k in keys):
            return family
    return None


def family_of_module(model: nn.Module) -> str:
    """``"mae"`` or ``"mixmim"`` for a built model (DDP or compiled too), by the keys of its blocks."""
    inner = unwrap(model)
    family = family_of_state_dict(name for name, _ in inner.named_parameters())
    if family is None:
        raise TypeError(f"{type(inner).__name__} is neither a ViT nor a MixMIM model")
    return family
