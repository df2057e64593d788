"""`ExpertBank`: the LoRA experts of one layer as stacked parameters."""

from __future__ import annotations

import math

import torch
from torch import nn


class ExpertBank(nn.Module):
    """E LoRA experts stacked so that one kernel call serves all of them.

    Parameters:
        A: (E, r, d_in), initialised like PEFT's lora_A (kaiming-uniform with a = sqrt(5), i.e.
           U(-1/sqrt(d_in), 1/sqrt(d_in))), so each expert starts as a random projection.
        B: (E, d_out, r), zero, so the mixture starts as the frozen base model.
    """

    def __init__(
        self,
        num_experts: int,
        rank: int,
        d_in: int,
        d_out: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.num_experts, self.rank, self.d_in, self.d_out = num_experts, rank, d_in, d_out
        self.A = nn.Parameter(torch.empty(num_experts, rank, d_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(num_experts, d_out, rank, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d_in)  # kaiming_uniform_(a=sqrt(5)) per expert, fan_in = d_in
        with torch.no_grad():
            self.A.uniform_(-bound, bound)
            self.B.zero_()

    def load_expert(self, expert: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0) -> None:
        """Set slot ``expert`` to a trained LoRA: lora_a (r, d_in), lora_b (d_out, r) with r <= rank.

        ``scale`` is folded into B (in float64, then cast), and ranks below the bank's are zero-padded,
        so the slot computes exactly ``scale * lora_b @ lora_a``.
        """
        r = lora_a.shape[0]
        if r > self.rank or lora_a.shape[1] != self.d_in or lora_b.shape != (self.d_out, r):
            raise ValueError(
                f"a LoRA of A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} does not fit experts of rank "
                f"{self.rank}, {self.d_in} -> {self.d_out}"
            )
        with torch.no_grad():
            self.A[expert].zero_()
            self.B[expert].zero_()
            self.A[expert, :r] = lora_a.to(torch.float64).to(self.A.dtype)
            self.B[expert, :, :r] = (lora_b.to(torch.float64) * scale).to(self.B.dtype)

    def delta_weight(self, expert: int) -> torch.Tensor:
        """(d_out, d_in) weight update B_e A_e of one expert (unscaled)."""
        return self.B[expert] @ self.A[expert]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, d_in={self.d_in}, d_out={self.d_out}"
