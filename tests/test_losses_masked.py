"""Balance losses over padded batches: padding rows are left out by weight, never by value."""

from __future__ import annotations

import torch

import lomix


def test_padding_rows_even_non_finite_ones_do_not_change_the_losses():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 5, generator=g)
    probs = logits.softmax(-1)
    indices = probs.topk(2, -1).indices
    gates = probs.gather(-1, indices)
    mask = torch.tensor([True, False, True, True, False, True, True, True, False])
    real = mask.nonzero().squeeze(1)
    switch = lomix.switch_load_balancing_loss(probs[real], indices[real], gates=gates[real])
    z = lomix.router_z_loss(logits[real])
    poisoned_probs, poisoned_logits = probs.clone(), logits.clone()
    poisoned_probs[~mask] = float("nan")
    poisoned_logits[~mask] = float("inf")
    torch.testing.assert_close(lomix.switch_load_balancing_loss(poisoned_probs, indices, mask, gates), switch)
    torch.testing.assert_close(lomix.router_z_loss(poisoned_logits, mask), z)
    nothing = torch.zeros(9, dtype=torch.bool)
    assert lomix.switch_load_balancing_loss(probs, indices, nothing).item() == 0.0
    assert lomix.router_z_loss(logits, nothing).item() == 0.0
