"""DeepSpeed integration (installs as ``sparse_dit.parallel``): engine, expert parallelism, checkpoints.

The model library (``sparse_dit``) never imports deepspeed or torch.distributed; this package
applies parallelism from outside, torchtitan style:

* :mod:`~sparse_dit.parallel.engine`: distributed init (a one-rank gloo group when no launcher
  ran), the generated DeepSpeed config (+ user JSON override), AdamW param groups, the
  warmup-cosine schedule, activation checkpointing, :func:`build_engine`;
* :mod:`~sparse_dit.parallel.expert_parallel`: DeepSpeed's expert/expert-data-parallel groups,
  the autograd-aware all-to-all dispatcher, expert-parameter tagging, config checks;
* :mod:`~sparse_dit.parallel.checkpoint`: save/resume/keep-last-K and the ``final/`` export;
* :mod:`~sparse_dit.parallel.balance`: routing statistics summed over ranks (balance bias
  counts, the global-batch balance loss).

See docs/training.md.
"""

from sparse_dit.parallel.balance import connect_global_balance, world_sum
from sparse_dit.parallel.checkpoint import (
    CheckpointError, export_final, full_state_dict, latest_tag, load_checkpoint, nonfinite_state, save_checkpoint,
)
from sparse_dit.parallel.engine import (
    apply_activation_checkpointing,
    compile_blocks,
    batch_layout,
    build_ds_config,
    build_engine,
    init_distributed,
    lr_at,
    param_groups,
    resolve_precision,
)
from sparse_dit.parallel.expert_parallel import (
    AllToAllDispatcher,
    all_to_all_single,
    check_parallel_config,
    create_expert_groups,
    ep_group_name,
    gather_expert_tensor,
    is_expert_param,
    setup_expert_parallel,
    tag_expert_params,
)

__all__ = [
    "init_distributed",
    "build_ds_config",
    "build_engine",
    "batch_layout",
    "param_groups",
    "lr_at",
    "resolve_precision",
    "apply_activation_checkpointing",
    "compile_blocks",
    "connect_global_balance",
    "world_sum",
    "check_parallel_config",
    "create_expert_groups",
    "ep_group_name",
    "setup_expert_parallel",
    "tag_expert_params",
    "is_expert_param",
    "AllToAllDispatcher",
    "all_to_all_single",
    "gather_expert_tensor",
    "save_checkpoint",
    "load_checkpoint",
    "latest_tag",
    "nonfinite_state",
    "full_state_dict",
    "export_final",
    "CheckpointError",
]
