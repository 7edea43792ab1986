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
Every rank walks the new model's canonical tensors in one global order (`surgery_order`), so the
collectives and the point-to-point transfers line up without deadlock. The new model is built empty
(meta tensors) and each parameter becomes the shard that was cut for it, while each source parameter
is freed once cut (`consume`): a rank holds about its source model's bytes throughout, plus one
tensor's transient.
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
        return local.index_select(0, keep.to(local.device))
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
    send_buf = local.index_select(0, torch.cat(send).to(local.device)).reshape(-1)  # one copy, destinations in rank order
    recv_buf = torch.empty(sum(recv_counts) * row, dtype=local.dtype, device=local.device)
    # what crosses the wire: the rows a rank keeps for itself are copied locally by the collective
    comm.tp_bytes += (send_buf.numel() - int(send[me].numel()) * row) * send_buf.element_size()
    dist.all_to_all_single(recv_buf, send_buf.contiguous(), [c * row for c in recv_counts],
                           [int(i.numel()) * row for i in send], group=groups.tp)
    out = torch.empty(mine.numel(), *local.shape[1:], dtype=local.dtype, device=local.device)
    parts = recv_buf.reshape(-1, *local.shape[1:]).split(recv_counts)
    for s in range(tp):
        out[(owner[mine] == s).to(local.device)] = parts[s]  # source s sent them in the order of `mine`
    return out


def _new_shard(old: torch.nn.Parameter, plan: PrunePlan, new_name: str, swiglu: bool, groups: Groups,
               comm: CommStats) -> torch.Tensor:
    """This rank's shard of new canonical tensor `new_name`, cut from its old shard `old`."""
    x = old.detach()
    partitioned = bool(getattr(old, "tensor_model_parallel", False)) and groups.tp_size > 1
    pdim = int(old.partition_dim) if partitioned else -1
    for dim in range(x.dim()):
        keep = keep_index(plan, new_name, dim)
        n_old = x.shape[dim] * (groups.tp_size if dim == pdim else 1)
        if keep is None or (keep.numel() == n_old and torch.equal(keep, torch.arange(n_old))):
            continue  # kept whole and in place (e.g. every tensor of a depth-only plan): no copy
        if dim != pdim:
            x = x.index_select(dim, keep.to(x.device))  # whole along this dim on every rank: slice locally
        else:
            moved = _exchange(x.movedim(dim, 0).contiguous(), keep, n_old, swiglu, groups, comm)
            x = moved.movedim(0, dim)
    return x.contiguous()


def _stage_of(layer: int, num_layers: int, pp: int) -> int:
    return layer // (num_layers // pp)


def surgery_order(plan: PrunePlan) -> list[str]:
    """The pruned model's canonical tensors in the order every rank walks them: the layers first (in
    new-layer order; each shrinks or moves, so freeing its old tensor makes room), then the final
    norm, the embedding and the output layer last (the largest tensors, cut when the layers have
    already given back what pruning saves). A pure function of the plan: the same on every rank."""
    from megatron_prune.convert.hf_weights import canonical_shapes

    def key(name: str) -> tuple:
        m = _LAYER.match(name)
        return (0, int(m.group(1)), name) if m else (1, 0, name) if "final_layernorm" in name else (2, 0, name)

    return sorted(canonical_shapes(plan.target), key=key)


def _attr_key(cname: str) -> str:
    m = _LAYER.match(cname)
    return cname[m.end():] if m else cname


def _release(param: torch.nn.Parameter) -> None:
    """Give a consumed source parameter's memory back (its module keeps an empty placeholder)."""
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    param.grad = None


class _Slots:
    """Where each canonical tensor of the new (meta) model lives: (module, attribute, parameter)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.by_name: dict[str, list[tuple[torch.nn.Module, str, torch.nn.Parameter]]] = {}
        for name, cname, param in local_params(model):
            module_name, _, attr = name.rpartition(".")
            self.by_name.setdefault(cname, []).append((model.get_submodule(module_name), attr, param))

    def shape(self, cname: str) -> tuple[int, ...]:
        return tuple(self.by_name[cname][0][2].shape)

    def dtype(self, cname: str) -> torch.dtype:
        return self.by_name[cname][0][2].dtype

    def fill(self, cname: str, shard: torch.Tensor, like: torch.nn.Parameter) -> None:
        """Install `shard` as the parameter: a meta placeholder is replaced by a Parameter wrapping the
        shard itself (no copy), a real one is copied into. megatron sets the TP marks
        (tensor_model_parallel, partition_dim, ...) only while initialising, which the empty build
        skips: they are copied from `like`, the source parameter of the same kind."""
        from megatron.core.tensor_parallel.layers import copy_tensor_model_parallel_attributes

        new = None
        for module, attr, param in self.by_name[cname]:
            if not param.is_meta:
                param.copy_(shard)
                continue
            if new is None:
                new = torch.nn.Parameter(shard, requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)  # what the build set: shared, allreduce, ...
                copy_tensor_model_parallel_attributes(new, like)
            setattr(module, attr, new)


def apply_plan(model: torch.nn.Module, plan: PrunePlan, groups: Groups,
               comm: Optional[CommStats] = None, consume: bool = True) -> torch.nn.Module:
    """The pruned model at the same layout.

    consume=True (the default): the source model's parameters are freed as surgery goes (each as soon
    as its new shard is cut; dropped layers first), so a rank's memory stays near the source model's
    own bytes; `model` is left with empty parameters and must not be used again. consume=False leaves
    `model` as it was (every new tensor is a copy) at the cost of holding both models."""
    from megatron_prune.models.build import build_model
    from megatron_prune.runtime.cpu import return_freed_host_memory

    comm = comm if comm is not None else CommStats()
    gated = bool(model.config.gated_linear_unit)
    old_params = {}
    for name, cname, param in local_params(model):
        old_params.setdefault(cname, (name, param))
    device = next(iter(old_params.values()))[1].device  # where the new shards are made
    like: dict[str, torch.nn.Parameter] = {}  # same marks in every layer: moved layers use the local ones
    for cname, (_, param) in old_params.items():
        like.setdefault(_attr_key(cname), param)
    L_old, L_new, pp = plan.source.num_layers, plan.target.num_layers, groups.pp_size
    if consume:  # dropped layers first: their memory is what the moved and re-cut layers fill
        kept = set(plan.keep_layers)
        for cname, (_, param) in old_params.items():
            m = _LAYER.match(cname)
            if m is not None and int(m.group(1)) not in kept:
                _release(param)
    new_model = build_model(plan.target, groups, empty=True)  # meta: no memory, no init
    slots = _Slots(new_model)

    def cut(new_name: str, old_name: str, swiglu_of_local: bool) -> torch.Tensor:
        local_name, old = old_params[old_name]
        shard = _new_shard(old, plan, new_name, swiglu_of_local and is_swiglu_fc1(local_name), groups, comm)
        if consume:
            _release(old)  # `shard` holds its own storage, or the old one when nothing was cut
        elif shard.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
            shard = shard.clone()  # the source must stay as it was
        return shard

    trim = device.type == "cpu"  # glibc keeps freed chunks resident; CUDA's caching allocator reuses them
    layer_done = None
    with torch.no_grad():
        for new_name in surgery_order(plan):  # one global order on every rank
            old_name = source_name(new_name, plan)
            m = _LAYER.match(new_name)
            if consume and trim and (m.group(1) if m else None) != layer_done:
                return_freed_host_memory()  # once per layer: what the last one gave back
                layer_done = m.group(1) if m else None
            if m is None:  # embedding, final norm, output layer: on the same stage before and after
                if new_name in slots.by_name:
                    slots.fill(new_name, cut(new_name, old_name, False), like[_attr_key(new_name)])
                continue
            src = _stage_of(plan.keep_layers[int(m.group(1))], L_old, pp)
            dst = _stage_of(int(m.group(1)), L_new, pp)
            shard = None
            if groups.pp_rank == src:
                dim_kinds(new_name)  # unknown tensors fail here, on the stage that has them
                shard = cut(new_name, old_name, gated)
                if dst != src:
                    comm.pp_bytes += shard.numel() * shard.element_size()
                    dist.send(shard, group_dst=dst, group=groups.pp)
                    shard = None
            if groups.pp_rank == dst:
                if shard is None:
                    shard = torch.empty(slots.shape(new_name), dtype=slots.dtype(new_name), device=device)
                    dist.recv(shard, group_src=src, group=groups.pp)
                if tuple(shard.shape) != slots.shape(new_name):
                    raise RuntimeError(f"surgery: {new_name} came out {tuple(shard.shape)}, the pruned "
                                       f"model holds {slots.shape(new_name)} on this rank")
                slots.fill(new_name, shard, like[_attr_key(new_name)])
    left = [n for n, p in new_model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"surgery: the plan did not provide {left[:3]} ({len(left)} in all)")
    return new_model
