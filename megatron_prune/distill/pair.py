"""Teacher and student in one pipeline: how the teacher's logits meet the student's on the last stage.

Every pipeline stage holds its chunk of the student (trained, in megatron DDP) and the same stage's
chunk of the teacher (frozen, eval mode, no gradients), both sharded over the same TP group. One
micro-batch runs through both at once: the tensor a stage sends downstream is the student's hidden
states and the teacher's concatenated along the hidden dimension, [s, b, h_student + h_teacher],
so megatron's 1F1B schedule moves both with its ordinary p2p calls (`adjust_tensor_shapes` tells it
the wider shape). The last stage therefore has, for the same micro-batch, the student's and the
teacher's vocab-parallel logits [b, s, V/tp], and the KL is computed there on the shards.

The teacher half is computed under no_grad and detached, so backward sends zeros for it upstream and
nothing of the teacher is kept for backward: the pair's activation memory is the student's. Teacher
and student may differ in width and depth (a pruned student); they must share the vocabulary and
the pipeline layout.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_prune.distill.kl import vocab_parallel_kl
from megatron_prune.models.forward import Batch
from megatron_prune.parallel import Groups
from megatron_prune.train.step import LossFn, masked_sums, positions

DISTILL_METRICS = ("loss", "kl", "ce", "tokens")


def _inner(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP (or the module itself)."""
    while hasattr(module, "module"):
        module = module.module
    return module


class DistillPair(torch.nn.Module):
    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, groups: Groups) -> None:
        super().__init__()
        self.student = student  # DDP(GPTModel)
        self.teacher = teacher.eval().requires_grad_(False)
        self.groups = groups
        inner = _inner(student)
        # what megatron's schedule looks up on the chunk it runs
        self.config = inner.config
        self.model_type = inner.model_type
        self.student_hidden = int(inner.config.hidden_size)
        self.teacher_hidden = int(teacher.config.hidden_size)

    def train(self, mode: bool = True) -> "DistillPair":
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout either)
        return self

    def set_input_tensor(self, input_tensor: Any) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if tensor is None:  # the first stage embeds tokens itself
            _inner(self.student).set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        hs = self.student_hidden
        _inner(self.student).set_input_tensor(tensor[..., :hs])  # [s, b, hs]; gradients flow back
        self.teacher.set_input_tensor(tensor[..., hs:].detach())  # [s, b, ht]

    def adjust_tensor_shapes(self, recv: list, send: list) -> tuple[list, list]:
        """megatron's p2p shapes are (s, b, config.hidden_size) of the student: widen them."""
        width = self.student_hidden + self.teacher_hidden
        return ([(s, b, width) for s, b, _ in recv], [(s, b, width) for s, b, _ in send])

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> Any:
        student = self.student(tokens, position_ids, attention_mask)
        with torch.no_grad():
            teacher = self.teacher(tokens, position_ids, attention_mask)
        if self.groups.is_last_stage:
            return student, teacher  # logits [b, s, V/tp] each
        return torch.cat([student, teacher], dim=-1)  # [s, b, hs + ht]


def distill_forward(groups: Groups, *, temperature: float = 1.0, alpha_ce: float = 0.0,
                    scale_by_temperature_squared: bool = False, chunk_tokens: Optional[int] = None,
                    kl_backend: str = "auto"):
    """A train.step `Forward` for a DistillPair. Objective per token: KL(p_T || p_S) at temperature τ
    + alpha_ce x cross-entropy of the student on the labels (alpha_ce = 0: logit-only, as the paper).
    The CE is always measured; it carries gradient only when alpha_ce > 0."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def forward(pair: torch.nn.Module, batch: Batch) -> tuple[Any, LossFn]:
        out = pair(batch.tokens, positions(batch), None)
        if not groups.is_last_stage:
            return out, _never
        student, teacher = out  # [b, s, V/tp]

        def loss(student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            kl = vocab_parallel_kl(student_logits, teacher, tp_group=groups.tp, temperature=temperature,
                                   scale_by_temperature_squared=scale_by_temperature_squared,
                                   chunk_tokens=chunk_tokens, backend=kl_backend)  # [b, s]
            # megatron's CE subtracts the max from its input in place: give it a copy
            with torch.set_grad_enabled(alpha_ce > 0 and torch.is_grad_enabled()):
                ce = vocab_parallel_cross_entropy(student_logits.to(torch.float32, copy=True), batch.labels)  # [b, s]
            kl_sum, ce_sum = masked_sums([kl.float(), ce.float()], batch.loss_mask)
            objective = kl_sum + alpha_ce * ce_sum if alpha_ce > 0 else kl_sum
            tokens = batch.loss_mask.sum()
            metrics = torch.stack([objective.detach().double(), kl_sum.detach().double(),
                                   ce_sum.detach().double(), tokens.double()])
            return objective, tokens.to(torch.int), metrics  # metrics: DISTILL_METRICS

        return student, loss

    return forward


def _never(_output: torch.Tensor):
    raise AssertionError("megatron computes the loss on the last pipeline stage only")
