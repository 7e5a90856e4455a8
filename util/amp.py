"""Mixed precision: ``--amp {bf16,fp16,none}``, autocast on any device, and the loss scaler with grad-norm output.

bf16 has the range of fp32 and needs no loss scaling; fp16 keeps the official ``NativeScalerWithGradNormCount``
behaviour (a ``GradScaler`` that skips steps with inf/NaN gradients and adapts the scale).
"""

import contextlib
from collections.abc import Iterable

import torch

AMP_CHOICES = ("bf16", "fp16", "none")


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """The default ``--amp``: bf16 on CUDA devices that support it, fp16 on older GPUs (official), none on CPU."""
    if amp is not None:
        if amp not in AMP_CHOICES:
            raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "none"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the chosen precision, or a no-op for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Total norm of the gradients of ``parameters`` (0 when none has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads, norm_type)


class NativeScalerWithGradNormCount:
    """Backward, unscale, optional clipping, optimizer step; returns the gradient norm on update steps.

    Same contract as the official class of this name; with ``enabled=False`` (bf16 or fp32) the scaling is a
    no-op and the step always runs.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, device: torch.device | str = "cuda", enabled: bool = True):
        device_type = torch.device(device).type
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    @property
    def enabled(self) -> bool:
        return self._scaler.is_enabled()

    def __call__(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        clip_grad: float | None = None,
        parameters: Iterable[torch.Tensor] | None = None,
        create_graph: bool = False,
        update_grad: bool = True,
    ) -> torch.Tensor | None:
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        parameters = list(parameters) if parameters is not None else []
        self._scaler.unscale_(optimizer)  # unscale the gradients in place before clipping / measuring
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = grad_norm(parameters)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict and self.enabled:
            self._scaler.load_state_dict(state_dict)
