"""Apply a prune plan to a live TP/PP-sharded GPTModel, on the shards: no rank holds a full weight.

The pruned model is built by megatron-core itself from the plan's target config (so every
`*_per_partition` attribute, the TransformerConfig and the layer numbering are megatron's own), and
each of its parameters is filled from this rank's old shards:
  - dims that are not TP-partitioned (hidden channels everywhere, a row-parallel layer's output, the
    vocabulary of the embedding and output layer) are sliced locally with `indices.keep_index`;
  - the TP-partitioned dim (QKV / fc1 rows, proj / fc2 columns) changes owner: the kept rows, in
    global order, are re-partitioned evenly over the TP ranks, and each rank sends the rows another
    rank now owns with one `all_to_all_single` over `groups.tp` (every rank computes every rank's
    old and new index lists from the plan, so only weights travel, never index metadata);
  - depth: new layer i is old layer keep_layers[i]; when the rebalanced pipeline puts it on another
    stage, the old stage sends the finished shard to the same TP/DP position of the new stage.
Every rank walks the new model's canonical tensors in one global order, so the collectives and the
point-to-point transfers line up without deadlock.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.models.shard import is_swiglu_fc1, local_params
from megatron_prune.parallel import Groups
from megatron_prune.prune.indices import dim_kinds, keep_index, source_name
from megatron_prune.prune.plan import PrunePlan

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def local_indices(n: int, swiglu: bool, rank: int, size: int) -> torch.Tensor:
    """Global indices (along the partitioned dim) that TP rank `rank` holds of a dim of size n."""
    if size == 1:
        return torch.arange(n)
    if swiglu:  # [gate_r; up_r]
        half = n // 2
        block = torch.arange(half).chunk(size)[rank]
        return torch.cat([block, half + block])
    return torch.arange(n).chunk(size)[rank]


class CommStats:
    """Bytes this rank sent during surgery: TP exchange, PP moves."""

    def __init__(self) -> None:
        self.tp_bytes = 0
        self.pp_bytes = 0


def _exchange(local: torch.Tensor, keep: torch.Tensor, n_old: int, swiglu: bool, groups: Groups,
              comm: CommStats) -> torch.Tensor:
    """Rows `keep` (old global indices, in new global order) of a dim-0-partitioned tensor whose old
    shard is `local` [n_old/tp, ...]; returns this rank's new shard [len(keep)/tp, ...]."""
    tp, me = groups.tp_size, groups.tp_rank
    n_new = int(keep.numel())
    if tp == 1:
        return local.index_select(0, keep)
    owner = torch.empty(n_old, dtype=torch.long)
    pos = torch.empty(n_old, dtype=torch.long)
    for r in range(tp):
        idx = local_indices(n_old, swiglu, r, tp)
        owner[idx], pos[idx] = r, torch.arange(idx.numel())
    need = [keep[local_indices(n_new, swiglu, d, tp)] for d in range(tp)]  # old indices per new rank
    send = [pos[need_d[owner[need_d] == me]] for need_d in need]  # my local rows, per destination
    mine = need[me]
    recv_counts = [int((owner[mine] == s).sum()) for s in range(tp)]
    row = local[0].numel() if local.shape[0] else int(torch.tensor(local.shape[1:]).prod())
    send_buf = torch.cat([local.index_select(0, idx) for idx in send]).reshape(-1)
    recv_buf = torch.empty(sum(recv_counts) * row, dtype=local.dtype)
    # what crosses the wire: the rows a rank keeps for itself are copied locally by the collective
    comm.tp_bytes += (send_buf.numel() - int(send[me].numel()) * row) * send_buf.element_size()
    dist.all_to_all_single(recv_buf, send_buf.contiguous(), [c * row for c in recv_counts],
                           [int(i.numel()) * row for i in send], group=groups.tp)
    out = torch.empty(mine.numel(), *local.shape[1:], dtype=local.dtype)
    parts = recv_buf.reshape(-1, *local.shape[1:]).split(recv_counts)
    for s in range(tp):
        out[owner[mine] == s] = parts[s]  # source s sent them in the order of `mine`
    return out


def _new_shard(old: torch.nn.Parameter, plan: PrunePlan, new_name: str, swiglu: bool, groups: Groups,
               comm: CommStats) -> torch.Tensor:
    """This rank's shard of new canonical tensor `new_name`, cut from its old shard `old`."""
    x = old.detach()
    partitioned = bool(getattr(old, "tensor_model_parallel", False)) and groups.tp_size > 1
    pdim = int(old.partition_dim) if partitioned else -1
    for dim in range(x.dim()):
        keep = keep_index(plan, new_name, dim)
        if keep is None:
            continue
        if dim != pdim:
            x = x.index_select(dim, keep)  # whole along this dim on every rank: slice locally
        else:
            n_old = x.shape[dim] * groups.tp_size
            moved = _exchange(x.movedim(dim, 0).contiguous(), keep, n_old, swiglu, groups, comm)
            x = moved.movedim(0, dim)
    return x.contiguous()


def _stage_of(layer: int, num_layers: int, pp: int) -> int:
    return layer // (num_layers // pp)


def apply_plan(model: torch.nn.Module, plan: PrunePlan, groups: Groups,
               comm: Optional[CommStats] = None) -> torch.nn.Module:
    """The pruned model at the same layout; `model` is left as it was (the caller may drop it)."""
    from megatron_prune.convert.hf_weights import canonical_shapes
    from megatron_prune.models.build import build_model

    comm = comm if comm is not None else CommStats()
    gated = bool(model.config.gated_linear_unit)
    old_params = {}
    for name, cname, param in local_params(model):
        old_params.setdefault(cname, (name, param))
    new_model = build_model(plan.target, groups)
    new_params: dict[str, list[torch.nn.Parameter]] = {}
    for name, cname, param in local_params(new_model):
        new_params.setdefault(cname, []).append(param)  # tied output_layer: a second copy
    L_old, L_new, pp = plan.source.num_layers, plan.target.num_layers, groups.pp_size
    with torch.no_grad():
        for new_name in sorted(canonical_shapes(plan.target)):  # one global order on every rank
            old_name = source_name(new_name, plan)
            m = _LAYER.match(new_name)
            if m is None:  # embedding, final norm, output layer: on the same stage before and after
                if new_name in new_params:
                    local_name, old = old_params[old_name]
                    shard = _new_shard(old, plan, new_name, False, groups, comm)
                    for p in new_params[new_name]:
                        p.copy_(shard)
                continue
            src = _stage_of(plan.keep_layers[int(m.group(1))], L_old, pp)
            dst = _stage_of(int(m.group(1)), L_new, pp)
            shard = None
            if groups.pp_rank == src:
                local_name, old = old_params[old_name]
                dim_kinds(new_name)  # unknown tensors fail here, on the stage that has them
                shard = _new_shard(old, plan, new_name, gated and is_swiglu_fc1(local_name), groups, comm)
                if dst != src:
                    comm.pp_bytes += shard.numel() * shard.element_size()
                    dist.send(shard, group_dst=dst, group=groups.pp)
            if groups.pp_rank == dst:
                (target,) = new_params[new_name]
                if shard is None:
                    shard = torch.empty_like(target)
                    dist.recv(shard, group_src=src, group=groups.pp)
                if tuple(shard.shape) != tuple(target.shape):
                    raise RuntimeError(f"surgery: {new_name} came out {tuple(shard.shape)}, the pruned "
                                       f"model holds {tuple(target.shape)} on this rank")
                target.copy_(shard)
    return new_model
