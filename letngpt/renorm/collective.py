"""Collective renormalisation: nGPT's weight projection done where DeepSpeed keeps the weights.

After every applied optimizer step each nGPT matrix must have unit-norm rows (axis 1) or
columns (axis 0); `LETnGPT.unit_norm_axes()` says which. Under ZeRO the fp32 master weights
are flat partitions spread over the data-parallel (DP) ranks, cut wherever the partition size
falls, often in the middle of a row. Instead of gathering whole matrices (letngpt.renorm),
every rank

1. computes, for each normalised matrix, the partial sums of squares of its rows (or columns)
   over the elements it holds: one vector per matrix, zero where this rank holds nothing;
2. concatenates these vectors into ONE fp32 buffer and all-reduces it (SUM) over the DP group:
   now every rank knows every row's full norm, for 4 bytes per normalised row on the wire;
3. divides its own fp32 master elements by their rows' norms and refreshes the compute weights:
   ZeRO 1/2 keep the full compute weights on every rank, so each rank rescales them with the
   same norms (no further communication); ZeRO 3 copies the rescaled master partition into the
   compute partition `param.ds_tensor` and rescales any full copy currently gathered (the
   "persistent" small parameters).

ZeRO 0 needs no communication: every rank holds whole matrices (the weights themselves in
fp32; a full fp32 master copy under DeepSpeed's fp16/bf16 optimizer). All norms are in fp32.

Call it on every rank of the DP group after every applied step: `collective_renormalize_(engine, dp_group)`
(letngpt.renorm.Renormalizer does, with the layout's DP group).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from letngpt.parallel.distributed import all_reduce_

EPS = 1e-12  # the clamp letngpt.model.unit applies to a norm


@dataclass
class _Target:
    name: str
    param: nn.Parameter
    dim: int  # the normalised axis
    shape: tuple[int, int]  # full shape (ds_shape under ZeRO 3)
    span: slice  # this matrix's norms in the shared buffer: rows if dim == 1, columns if dim == 0
    kind: str = ""  # the name with its layer number starred: the same matrix of every layer


def check_normalized_axis(name: str, shape: tuple[int, ...], dim: int, n_embd: int, tp_dim: int | None = None) -> None:
    """The checked assumption: every normalised axis is the embedding axis, whole on this rank.

    Megatron-style tensor parallelism shards rows of column-parallel / vocab-parallel weights
    and columns of row-parallel ones, never the embedding axis, so a rank's (TP shard of a)
    matrix holds complete rows to normalise. A layout that sharded the normalised axis would
    need the partial sums all-reduced over the TP group as well; we refuse it instead."""
    if len(shape) != 2 or shape[dim] != n_embd or tp_dim == dim:
        raise ValueError(f"{name}: normalised axis {dim} of shape {tuple(shape)} is not the whole embedding axis "
                         f"(n_embd={n_embd}{', sharded by tensor parallelism' if tp_dim == dim else ''}); "
                         "collective renormalisation would need an extra all-reduce over the TP group")


def _targets(model: nn.Module) -> list[_Target]:
    """The normalised matrices, their norms laid out in the shared buffer by kind (the same matrix of
    every layer: `blocks.*.attn.query.weight`): one kind's norms sit side by side there, so that a
    run of them (consecutive layers) reads and writes its norms as one [k, n] view and is normalised
    in one batched pass; in DeepSpeed's flat buffers the run's matrices also lie at equal spacing,
    so the batch is a strided view of them, not a copy."""
    params, n_embd = dict(model.named_parameters()), model.config.n_embd
    groups: dict[str, list[tuple[str, nn.Parameter, int, tuple[int, int]]]] = {}
    for name, dim in model.unit_norm_axes().items():
        p = params[name]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        tp_dim = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
        check_normalized_axis(name, shape, dim, n_embd, tp_dim)
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append((name, p, dim, shape))
    targets, offset = [], 0
    for kind, members in groups.items():
        for name, p, dim, shape in members:
            n = shape[1 - dim]
            targets.append(_Target(name, p, dim, shape, slice(offset, offset + n), kind))
            offset += n
    return targets


def _blocks(flat: torch.Tensor, start: int, t: _Target) -> Iterator[tuple[torch.Tensor, slice]]:
    """Cut a flat fragment holding elements [start, start + numel) of the row-major matrix into
    at most three 2-D views (a partial first row, whole rows, a partial last row); yield each
    with the norms it touches (its rows if dim == 1, its columns if dim == 0)."""
    cols, offset, numel = t.shape[1], 0, flat.numel()
    while offset < numel:
        row, col = divmod(start + offset, cols)
        n_rows, width = (1, min(cols - col, numel - offset)) if col or numel - offset < cols \
            else ((numel - offset) // cols, cols)
        block = flat.narrow(0, offset, n_rows * width).view(n_rows, width)
        yield block, slice(row, row + n_rows) if t.dim == 1 else slice(col, col + width)
        offset += n_rows * width


# Elements one batched pass treats at most (a stacked copy of them: 256 MiB in fp32).
MAX_STACK = 1 << 26
Piece = tuple[_Target, torch.Tensor, slice]  # a matrix's 2-D block and the norms it touches


def _runs(pieces: list[Piece]) -> Iterator[list[Piece]]:
    """Group blocks that one batched op can treat: same kind of matrix, block shape and dtype,
    touching the same norms of consecutive matrices (adjacent spans in the buffer). Launches then
    scale with the number of kinds of matrix (and partition cuts), not of matrices."""
    def key(piece: Piece) -> tuple:
        t, block, idx = piece
        return t.kind, t.shape, t.dim, tuple(block.shape), block.dtype, block.device, idx.start, idx.stop

    by_key: dict[tuple, list[Piece]] = {}
    for piece in pieces:
        by_key.setdefault(key(piece), []).append(piece)
    for group in by_key.values():
        group.sort(key=lambda piece: piece[0].span.start)
        run: list[Piece] = []
        for piece in group:
            if run and (run[-1][0].span.stop != piece[0].span.start
                        or (len(run) + 1) * piece[1].numel() > MAX_STACK):
                yield run
                run = []
            run.append(piece)
        yield run


def _norm_view(buf: torch.Tensor, run: list[Piece]) -> torch.Tensor:
    """The [k, len] view of `buf` holding the norms a run touches (its matrices' spans are adjacent)."""
    first, last, idx = run[0][0], run[-1][0], run[0][2]
    return buf[first.span.start:last.span.stop].view(len(run), -1)[:, idx]


def _batch(run: list[Piece]) -> tuple[torch.Tensor, bool]:
    """The run's blocks as one [k, rows, width] tensor, and whether it is a view of them: a strided
    view where they lie at equal spacing in one storage (a DeepSpeed flat buffer), else a copy."""
    blocks = [block for _, block, _ in run]
    first = blocks[0]
    if len(blocks) == 1:
        return first.unsqueeze(0), True
    size = first.element_size()
    step = (blocks[1].data_ptr() - first.data_ptr()) // size
    regular = first.is_contiguous() and step >= first.numel() and all(
        b.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and b.is_contiguous()
        and b.data_ptr() - first.data_ptr() == i * step * size for i, b in enumerate(blocks))
    if regular:
        return first.as_strided((len(blocks), *first.shape), (step, *first.stride()), first.storage_offset()), True
    return torch.stack(blocks), False


def _pieces(parts: list[tuple[_Target, torch.Tensor, int]]) -> list[Piece]:
    """(target, flat fragment, first element) -> the fragments' 2-D blocks."""
    return [(t, block, idx) for t, flat, start in parts for block, idx in _blocks(flat, start, t)]


def _add_square_sums(sums: torch.Tensor, pieces: list[Piece]) -> None:
    """sums[span] += each block's per-row (dim 1) or per-column (dim 0) sum of squares, in fp32."""
    for run in _runs(pieces):
        dim = run[0][0].dim
        squares = torch.linalg.vector_norm(_batch(run)[0], dim=1 + dim, dtype=torch.float32).square_()
        _norm_view(sums, run).add_(squares.to(sums.device))


def _divide(norms: torch.Tensor, pieces: list[Piece]) -> None:
    """Divide each block by its rows' (columns') norms, in place; in fp32 whatever the block's dtype
    (the divisor is fp32, so a bf16 block is rounded once, from the fp32 quotient)."""
    for run in _runs(pieces):
        batch, is_view = _batch(run)
        batch.div_(_norm_view(norms, run).to(batch.device).unsqueeze(1 + run[0][0].dim))
        if not is_view:
            torch._foreach_copy_([block for _, block, _ in run], list(batch.unbind(0)))


def _add_square_sums_(sums: torch.Tensor, flat: torch.Tensor, start: int, t: _Target) -> None:
    """One fragment's share of `sums` (laid out as `t.span`)."""
    _add_square_sums(sums, _pieces([(t, flat, start)]))


def _divide_(flat: torch.Tensor, start: int, t: _Target, norms: torch.Tensor) -> None:
    _divide(norms, _pieces([(t, flat, start)]))


def _full(t: _Target) -> tuple[_Target, torch.Tensor, int]:
    """A matrix held whole (a compute weight; a master at ZeRO 0) as a fragment starting at 0."""
    return t, t.param.data.view(-1), 0


def _all_reduce_norms(sums: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """THE communication: one SUM all-reduce of every row's partial sum of squares."""
    nbytes = 0
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        sums = all_reduce_(sums, sums.device, group=group)
        nbytes = sums.numel() * sums.element_size()
    return sums.sqrt_().clamp_min_(EPS), nbytes


def _check_partition_group(group, groups: list) -> None:
    """Every matrix must be partitioned over `group` (not e.g. an expert-parallel group)."""
    ranks = dist.get_process_group_ranks(group)
    for g in {id(g): g for g in groups}.values():
        if g is not group and dist.get_process_group_ranks(g) != ranks:
            raise ValueError(f"a normalised matrix is partitioned over ranks {dist.get_process_group_ranks(g)}, "
                             f"not over the data-parallel group {ranks}")


def _local_norms(parts: list[tuple[_Target, torch.Tensor, int]], size: int, group, device: torch.device,
                 reduce: bool = True) -> tuple[torch.Tensor, int, list[Piece]]:
    """Every normalised row's norm from this rank's fragments (all-reduced over `group` unless the
    rank holds whole matrices), the bytes sent, and the fragments' blocks for the division."""
    pieces = _pieces(parts)
    sums = torch.zeros(size, dtype=torch.float32, device=device)
    _add_square_sums(sums, pieces)
    if not reduce:
        return sums.sqrt_().clamp_min_(EPS), 0, pieces
    norms, nbytes = _all_reduce_norms(sums, group)
    return norms, nbytes, pieces


def _renorm_fragments(targets: list[_Target], group, device: torch.device) -> int:
    """ZeRO 1/2 and DeepSpeed's BF16_Optimizer: `p._hp_mapping` (deepspeed/utils/tensor_fragment.py)
    maps this rank's fp32 fragment `hp_fragment` to elements [start, start + numel) of p."""
    _check_partition_group(group, [t.param._dp_group for t in targets])
    parts = [(t, frag.hp_fragment, frag.lp_fragment_address.start) for t in targets
             if (frag := t.param._hp_mapping) is not None]  # None: no element of p in this partition
    norms, nbytes, pieces = _local_norms(parts, targets[-1].span.stop, group, device)
    _divide(norms, pieces)
    # Every rank holds the full compute weights (equal to the masters before this call in fp32), so
    # the same division gives the same result as the masters, bit for bit. A bf16 copy is rounded
    # twice (it was the master rounded to bf16): within one bf16 ulp of the re-cast master, and
    # DeepSpeed overwrites it from the master at the next step, so the error never accumulates.
    _divide(norms, _pieces([_full(t) for t in targets]))
    return nbytes


def _zero3_partition(optimizer, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(fp32 master elements, compute elements, flat start) of this rank's partition of p.
    Rank r of the param's group holds elements [r * partition_numel, ...) of the flattened
    param; the last partitions are zero-padded, so only the first `numel` elements are p's."""
    master, _ = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False)
    size = p.partition_numel()
    start = dist.get_rank(group=p.ds_process_group) * size
    numel = max(0, min(size, p.ds_numel - start))
    return master.narrow(0, 0, numel), p.ds_tensor.view(-1).narrow(0, 0, numel), start


def _renorm_zero3(engine, targets: list[_Target], group, device: torch.device) -> int:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    optimizer = engine.optimizer
    if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "params_in_nvme_and_cpu", False):
        raise NotImplementedError("collective renormalisation does not support ZeRO-3 NVMe offload")
    _check_partition_group(group, [t.param.ds_process_group for t in targets])
    parts = [_zero3_partition(optimizer, t.param) for t in targets]
    norms, nbytes, pieces = _local_norms([(t, master, start) for t, (master, _, start) in zip(targets, parts,
                                                                                              strict=True)],
                                         targets[-1].span.stop, group, device)
    _divide(norms, pieces)
    # The compute partitions take the rescaled masters (in fp32 without offload they are one tensor).
    copies = [(compute, master) for master, compute, _ in parts if compute.data_ptr() != master.data_ptr()]
    if copies:
        torch._foreach_copy_([c for c, _ in copies], [m for _, m in copies])
    # A gathered full copy (ZeRO 3's persistent small params) is rescaled like ZeRO 1/2's weights.
    _divide(norms, _pieces([_full(t) for t in targets if t.param.ds_status == ZeroParamStatus.AVAILABLE]))
    return nbytes


def full_fp32_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO 0 under DeepSpeed's fp16/bf16 optimizers, which keep a full fp32 master of every param
    on every rank: id(param) -> master. FP16_UnfusedOptimizer (any torch optimizer) keeps one
    tensor per param in `fp32_groups`; FP16_Optimizer (FusedAdam) one flat tensor per group."""
    masters = {}
    for i, params in enumerate(optimizer.fp16_groups):
        if hasattr(optimizer, "fp32_groups_flat"):
            group = optimizer.fp32_groups_flat[i].split([p.numel() for p in params])
        else:
            group = optimizer.fp32_groups[i]
        masters.update((id(p), m.view_as(p)) for p, m in zip(params, group, strict=True))
    return masters


def _renorm_full_masters(optimizer, targets: list[_Target]) -> int:
    """ZeRO 0 under DeepSpeed's fp16/bf16 optimizer: every rank normalises its full fp32 masters,
    then the compute weights take them (cast), with no communication."""
    masters = full_fp32_masters(optimizer)
    parts = [(t, masters[id(t.param)].view(-1), 0) for t in targets]
    norms, _, pieces = _local_norms(parts, targets[-1].span.stop, None, parts[0][1].device, reduce=False)
    _divide(norms, pieces)
    torch._foreach_copy_([t.param.data for t in targets], [masters[id(t.param)] for t in targets])
    return 0


def _renorm_weights(targets: list[_Target]) -> int:
    """ZeRO 0 in fp32: the optimizer updates the (whole) weights themselves."""
    parts = [_full(t) for t in targets]
    norms, _, pieces = _local_norms(parts, targets[-1].span.stop, None, parts[0][1].device, reduce=False)
    _divide(norms, pieces)
    return 0


@torch.no_grad()
def collective_renormalize_(engine, dp_group) -> int:
    """Project every nGPT matrix onto the unit sphere where DeepSpeed keeps it, after an applied
    optimizer step, at any ZeRO stage (method: module docstring). Collective under ZeRO 1-3:
    every rank of the DP group must call it. `dp_group` is the layout's (ParallelLayout.dp_group: under
    tensor parallelism the data-parallel subgroup, not WORLD); every normalised matrix must be
    partitioned over it, which is checked. Returns the bytes this rank sent into collectives (the
    all-reduce payload), 0 at ZeRO 0."""
    targets = _targets(engine.module)
    if not targets:
        return 0
    device = engine.device
    if engine.zero_optimization_stage() == 3:
        return _renorm_zero3(engine, targets, dp_group, device)
    if hasattr(targets[0].param, "_hp_mapping"):
        return _renorm_fragments(targets, dp_group, device)
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return _renorm_weights(targets)
    if hasattr(engine.optimizer, "fp16_groups"):
        return _renorm_full_masters(engine.optimizer, targets)
    raise NotImplementedError(f"collective renormalisation: unknown optimizer {type(engine.optimizer).__name__}")
