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

    def delta_weight(self, expert: int) -> torch.Tensor:
        """(d_out, d_in) weight update B_e A_e of one expert (unscaled)."""
        return self.B[expert] @ self.A[expert]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, d_in={self.d_in}, d_out={self.d_out}"
