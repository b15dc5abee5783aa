"""O-LoRA (Wang et al. 2023): a growing list of LoRA pairs on the qkv projections of the blocks
after the selector layer, one pair per trained domain.

``qkv(x) + scale * sum_k B_k(A_k(x))`` over the pairs k = 0 .. tasks - 1, each pair a LoRA of
:mod:`samcl.learning_modules.lora` (``A_k``: in -> r, Kaiming-uniform; ``B_k``: r -> out, zero;
``scale = alpha / r``). The method (:mod:`samcl.methods.olora`) adds a pair per domain, freezes
the earlier ones and keeps the new one's ``A`` orthogonal to theirs (:func:`orthogonality`).
Inference sums every pair: no task identity is needed. A module file holds all its pairs; the
spec's ``tasks`` says how many, so :meth:`ModuleSpec.build` rebuilds it.
"""
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
from torch import nn

from ..backbones.base import Backbone
from ..registry import register_learning_module
from .base import Hook, LearningModule
from .lora import LoRASpec


@dataclass(frozen=True)
class OLoRASpec(LoRASpec):
    """LoRA's fields (layers, qkv shapes, rank, alpha) and ``tasks``: the number of pairs."""

    tasks: int = 1

    def check(self, backbone: Backbone) -> None:
        if self.tasks < 1:
            raise ValueError(f"an O-LoRA module has at least one LoRA pair, not {self.tasks}")
        super().check(backbone)


class LoRAPair(nn.Module):
    """One domain's LoRA: per layer ``A`` (in -> r, Kaiming-uniform as nn.Linear's default) and
    ``B`` (r -> out, zero), drawn in lora.py's order (every A, then every B)."""

    def __init__(self, spec: LoRASpec) -> None:
        super().__init__()
        self.A = nn.ModuleList(nn.Linear(i, spec.rank, bias=False) for i, _ in spec.shapes)
        self.B = nn.ModuleList(nn.Linear(spec.rank, o, bias=False) for _, o in spec.shapes)
        for b in self.B:
            nn.init.zeros_(b.weight)


def orthogonality(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """O-LoRA's L_orth term of one layer and one earlier pair: ``sum_ij |(A_old^T A_new)_ij|``.

    The paper writes ``A`` as an (in, r) matrix, so ``A_old^T A_new`` is (r_old, r_new). Here
    ``old`` and ``new`` are nn.Linear weights, (r, in): the paper's ``A^T``; the same matrix is
    ``old @ new^T``. Returns a scalar (the sum of absolute entries).
    """
    return (old @ new.transpose(0, 1)).abs().sum()


@register_learning_module("olora")
class OLoRAModule(LearningModule):
    """``pairs[k]`` is the LoRA of the k-th trained domain; the last one is the one that trains."""

    spec_class = OLoRASpec

    def __init__(self, spec: OLoRASpec) -> None:
        super().__init__(spec)
        self.scale = spec.alpha / spec.rank
        self.pairs = nn.ModuleList(LoRAPair(spec) for _ in range(spec.tasks))

    def hooks(self, backbone: Backbone, context: Dict[str, Any]) -> List[Hook]:
        """A forward hook on the qkv projection of every layer: adds ``scale * sum_k B_k(A_k(x))``
        (pairs summed in order k = 0, 1, ...)."""
        def make(j: int):
            def hook(_module, inputs, output: torch.Tensor) -> torch.Tensor:
                x = inputs[0]
                delta = self.pairs[0].B[j](self.pairs[0].A[j](x))
                for pair in self.pairs[1:]:
                    delta = delta + pair.B[j](pair.A[j](x))
                return output + self.scale * delta
            return hook

        return [(backbone.qkv(i), "forward", make(j)) for j, i in enumerate(self.spec.layers)]

    def take_earlier(self, earlier: "OLoRAModule") -> None:
        """Copy the pairs of ``earlier`` (one fewer) into the first pairs of this module and freeze
        them (requires_grad False): only the last pair trains."""
        if earlier.spec.tasks != self.spec.tasks - 1:
            raise ValueError(f"an O-LoRA module of {self.spec.tasks} pairs continues one of "
                             f"{self.spec.tasks - 1}, not {earlier.spec.tasks}")
        with torch.no_grad():
            for mine, theirs in zip(self.pairs, earlier.pairs):
                for p, q in zip(mine.parameters(), theirs.parameters()):
                    p.copy_(q)
        for pair in self.pairs[:-1]:
            pair.requires_grad_(False)

    def orthogonality_loss(self) -> torch.Tensor:
        """``sum_layers sum_{k < last} sum_ij |(A_k^T A_last)_ij|`` (:func:`orthogonality`); 0 with one pair."""
        new = self.pairs[-1]
        total = new.A[0].weight.new_zeros(())
        for pair in self.pairs[:-1]:
            for a_old, a_new in zip(pair.A, new.A):
                total = total + orthogonality(a_old.weight, a_new.weight)
        return total

    def describe(self) -> str:
        return (f"OLoRAModule (olora): {self.counted_parameters():,} parameters = {self.counted_size_mb():.4f} MB "
                f"({self.spec.tasks} LoRA pair(s) of rank {self.spec.rank} on blocks {list(self.spec.layers)}; "
                f"one more per trained domain)")
