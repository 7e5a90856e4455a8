"""The names of the official ``util/misc.py`` that this project keeps, so ``from util.misc import MetricLogger``
works as in the official code. Each lives in the module of its job:

- ``util.metrics``: ``SmoothedValue``, ``MetricLogger``;
- ``util.dist``: ``init_distributed_mode``, ``is_dist_avail_and_initialized``, ``get_world_size``, ``get_rank``,
  ``is_main_process``, ``all_reduce_mean``;
- ``util.amp``: ``NativeScalerWithGradNormCount``.

The official ``save_model`` / ``load_model`` are ``util.checkpoint.save_checkpoint`` / ``load_resume`` here.
"""

from util.amp import NativeScalerWithGradNormCount
from util.dist import (
    all_reduce_mean,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_dist_avail_and_initialized,
    is_main_process,
)
from util.metrics import MetricLogger, SmoothedValue

__all__ = [
    "MetricLogger",
    "NativeScalerWithGradNormCount",
    "SmoothedValue",
    "all_reduce_mean",
    "get_rank",
    "get_world_size",
    "init_distributed_mode",
    "is_dist_avail_and_initialized",
    "is_main_process",
]
