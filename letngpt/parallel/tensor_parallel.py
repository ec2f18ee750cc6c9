"""Tensor parallelism with megatron-core, applied to a finished model in ONE place.

`parallelize_tp(model, tp)` swaps the model's layers for megatron-core's and keeps this
rank's shard of every weight, copied from the full model, so a TP run starts from exactly
the weights a TP=1 run with the same seed starts from. The layout is data, TP_PLAN below
(the planner counts a rank's parameters from the same table):

    column-parallel (split by output rows): attn.query / attn.key (rows [head, map, hd]:
        a split by heads keeps every map of a head on one rank), attn.value, mlp.fc_u,
        mlp.fc_v (separate u and v: the SwiGLU pairs stay local), lm_head (by vocabulary)
    row-parallel (split by input columns): attn.proj, mlp.proj
    vocab-parallel: wte, and the loss (vocab_parallel_cross_entropy)
    sharded vectors follow their matrices: s_qk by heads, s_u / s_v with the MLP, s_z by vocab
    replicated: everything else (alphas, norm gains, the ensemble weights r_m, the head-norm
        gain). The ensemble weights and the head-norm gain only see this rank's heads, so their
        gradients are summed over the TP group (TP_GRAD_SUMMED).

Every nGPT-normalised axis is the embedding axis, which this layout never shards, so
renormalisation needs no TP communication (letngpt.renorm.collective checks this).
"""

from __future__ import annotations

import functools
from fnmatch import fnmatch

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F

from letngpt.model import LETnGPT, ScaledVector
from letngpt.parallel.distributed import all_reduce_

# The TP layout: module name pattern -> how its weight is split. Modules not named are replicated.
TP_PLAN: dict[str, str] = {
    "wte": "vocab", "lm_head": "column", "s_z": "vector",
    "blocks.*.attn.query": "column", "blocks.*.attn.key": "column", "blocks.*.attn.value": "column",
    "blocks.*.attn.proj": "row", "blocks.*.attn.s_qk": "vector",
    "blocks.*.mlp.fc_u": "column", "blocks.*.mlp.fc_v": "column", "blocks.*.mlp.proj": "row",
    "blocks.*.mlp.s_u": "vector", "blocks.*.mlp.s_v": "vector",
}
SPLIT_DIM = {"vocab": 0, "column": 0, "row": 1, "vector": 0}  # the weight dimension each style splits
# Replicated parameters that see only this rank's heads: their gradients are summed over the TP group.
TP_GRAD_SUMMED = ("blocks.*.attn.ensemble_logits", "blocks.*.attn.head_norm.weight")


def tp_style(module_name: str) -> str | None:
    """How TP_PLAN splits the module `module_name` (None: replicated)."""
    return next((style for pattern, style in TP_PLAN.items() if fnmatch(module_name, pattern)), None)


def tp_split_dim(param_name: str) -> int | None:
    """The dimension along which the parameter `param_name` is split over TP ranks (None: replicated)."""
    style = tp_style(param_name.rpartition(".")[0])
    return None if style is None else SPLIT_DIM[style]


def initialize_tp(tp: int) -> None:
    """Build megatron-core's TP x DP process groups (TP ranks are adjacent, as within a node)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


class MegatronMPU:
    """The `mpu` DeepSpeed expects, over megatron-core's parallel_state (which names things
    differently), so ZeRO partitions and reduces over the data-parallel group only."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def _megatron_config(dtype: torch.dtype):
    from megatron.core import ModelParallelConfig
    from megatron.core.parallel_state import get_tensor_model_parallel_world_size

    # Weights come from the full model, so megatron must not initialise (or touch CUDA) itself.
    return ModelParallelConfig(tensor_model_parallel_size=get_tensor_model_parallel_world_size(),
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False, params_dtype=dtype)


def _mark_sharded(p: nn.Parameter, dim: int) -> None:
    """Tag a shard the way megatron does (DeepSpeed's grad-norm and our gathers read it);
    megatron itself skips this when it does not initialise the weight."""
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


class _CopyToTPRegion(torch.autograd.Function):
    """Identity forward; backward sums the input's gradient over the TP group (megatron's
    copy_to_tensor_model_parallel_region, on a functional collective that dynamo traces)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return funcol.all_reduce(grad, "sum", ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """Forward sums the partial outputs over the TP group; identity backward (megatron's
    reduce_from_tensor_model_parallel_region, on a functional collective)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        return funcol.all_reduce(x, "sum", group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@functools.cache
def _parallel_linear_types() -> tuple[type, type]:
    """megatron's Column/RowParallelLinear, returning the output alone (megatron returns (output, bias)).

    Eager, they run megatron's own forward. Under torch.compile they run y = x W_shard^T with the two
    collectives above, which dynamo traces whole: megatron's forward issues its input-gradient
    all-reduce with async_op=True and calls warnings.warn, both graph breaks, so a compiled block was
    split at every linear and recompiled for each weight shape (135 "Recompiling" log lines over the 2
    ranks of a 4-layer TP=2 run). Same sums either way; bench/tp_compile.py measures the alternatives
    (megatron's forward kept out of the graph: slower). The types are made once, not per layer: dynamo
    guards on a module's type, so a class per layer meant a graph per layer.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class Column(ColumnParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                return F.linear(_CopyToTPRegion.apply(x, self.tp_group), self.weight)
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                return _ReduceFromTPRegion.apply(F.linear(x, self.weight), self.tp_group)
            return super().forward(x)[0]

    return Column, Row


def _column(linear: nn.Linear, config) -> nn.Module:
    rank, size = _tp_rank_size()
    column = _parallel_linear_types()[0]
    layer = column(linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_, bias=False)
    layer.weight.data.copy_(linear.weight.data.chunk(size, dim=0)[rank])
    _mark_sharded(layer.weight, 0)
    return layer


def _row(linear: nn.Linear, config) -> nn.Module:
    rank, size = _tp_rank_size()
    row = _parallel_linear_types()[1]
    layer = row(linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_, bias=False,
                input_is_parallel=True, skip_bias_add=False)
    layer.weight.data.copy_(linear.weight.data.chunk(size, dim=1)[rank])
    _mark_sharded(layer.weight, 1)
    return layer


def _vocab_embedding(emb: nn.Embedding, config) -> nn.Module:
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    rank, size = _tp_rank_size()
    layer = VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, init_method=nn.init.zeros_, config=config)
    layer.weight.data.copy_(emb.weight.data.chunk(size, dim=0)[rank])
    _mark_sharded(layer.weight, 0)
    return layer


def _shard_vector_(vec: ScaledVector) -> None:
    rank, size = _tp_rank_size()
    vec.weight = nn.Parameter(vec.weight.data.chunk(size)[rank].clone())
    _mark_sharded(vec.weight, 0)


def _sum_grad_over_tp(param: nn.Parameter) -> None:
    from megatron.core.parallel_state import get_tensor_model_parallel_group

    group = get_tensor_model_parallel_group()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_(grad.clone(), grad.device, group=group)

    param.register_hook(hook)


def _vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's kernel works in place on its input: never hand it the logits we return.
    logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
    return vocab_parallel_cross_entropy(logits, targets).mean()


def parallelize_tp(model: LETnGPT, tp: int) -> LETnGPT:
    """Shard `model` in place for this rank's TP group, as TP_PLAN says (letngpt.parallel.layout has
    validated the layout and run initialize_tp)."""
    if tp == 1:
        return model
    config = _megatron_config(next(model.parameters()).dtype)
    swap = {"vocab": _vocab_embedding, "column": _column, "row": _row}
    for name, module in list(model.named_modules()):
        style = tp_style(name)
        if style == "vector":
            _shard_vector_(module)
        elif style is not None:
            model.set_submodule(name, swap[style](module, config))
    for name, p in model.named_parameters():
        if any(fnmatch(name, pattern) for pattern in TP_GRAD_SUMMED):
            _sum_grad_over_tp(p)
    model.loss = _vocab_parallel_loss  # logits are split by vocabulary
    return model
