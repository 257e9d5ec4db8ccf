"""The router of an expert routing block and the learned baseline of REINFORCE routing.

Both are leaf modules (parameters only, no child modules) so that PEFT's checkpoint keys end in
``<attribute>.<adapter name>.<parameter>`` and load under any adapter name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Linear router over experts, as in the authors' code.

    ``logits = LN(v) @ LN_w(W)`` where ``W`` has one ``hidden_size`` vector per expert (no bias, no temperature),
    ``LN`` is a LayerNorm on the pooled input and ``LN_w`` standardises every expert's weight vector on its own, with a
    gain and bias shared by all experts. The gain starts at ``init_scale`` so routing starts close to uniform.
    """

    def __init__(self, hidden_size: int, num_experts: int, init_scale: float = 0.01, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, num_experts))
        self.input_norm_weight = nn.Parameter(torch.empty(hidden_size))
        self.input_norm_bias = nn.Parameter(torch.empty(hidden_size))
        self.weight_norm_weight = nn.Parameter(torch.empty(hidden_size))
        self.weight_norm_bias = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters(init_scale)

    @torch.no_grad()
    def reset_parameters(self, init_scale: float) -> None:
        nn.init.normal_(self.weight, std=init_scale)
        nn.init.ones_(self.input_norm_weight)
        nn.init.zeros_(self.input_norm_bias)
        nn.init.constant_(self.weight_norm_weight, init_scale)
        nn.init.zeros_(self.weight_norm_bias)

    def normalized_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """The LayerNorm'd router input (also the input of the REINFORCE baseline)."""
        return F.layer_norm(pooled, pooled.shape[-1:], self.input_norm_weight, self.input_norm_bias, self.eps)

    def expert_vectors(self) -> torch.Tensor:
        """``[hidden_size, num_experts]``: the expert weight vectors, each standardised by the shared LayerNorm."""
        per_expert = F.layer_norm(self.weight.T, self.weight.shape[:1], self.weight_norm_weight, self.weight_norm_bias, self.eps)
        return per_expert.T

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing logits ``[batch, num_experts]`` for a pooled input ``[batch, hidden_size]``, and the normalised
        input (what the REINFORCE baseline reads). Parameters are read only here (FSDP / ZeRO-3 safe)."""
        normalized = self.normalized_input(pooled)
        return normalized @ self.expert_vectors(), normalized


class ReinforceBaseline(nn.Module):
    """Value baseline of REINFORCE routing: two linear layers with no nonlinearity between them (as the authors).

    It predicts the example's task loss from the detached, LayerNorm'd router input.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.01):
        super().__init__()
        inner = max(1, hidden_size // 8)
        self.weight1 = nn.Parameter(torch.empty(inner, hidden_size))
        self.bias1 = nn.Parameter(torch.empty(inner))
        self.weight2 = nn.Parameter(torch.empty(1, inner))
        self.bias2 = nn.Parameter(torch.empty(1))
        self.reset_parameters(init_std)

    @property
    def weight(self) -> torch.Tensor:
        """The first layer's weight: a ``.weight`` so that PEFT's ``fsdp_auto_wrap_policy`` makes the baseline its own
        FSDP unit (see `Experts.weight`)."""
        return self.weight1

    @torch.no_grad()
    def reset_parameters(self, init_std: float) -> None:
        nn.init.normal_(self.weight1, std=init_std)
        nn.init.normal_(self.weight2, std=init_std)
        nn.init.zeros_(self.bias1)
        nn.init.zeros_(self.bias2)

    def forward(self, normalized_input: torch.Tensor) -> torch.Tensor:
        """Predicted loss ``[batch]``."""
        hidden = F.linear(normalized_input.detach(), self.weight1, self.bias1)
        return F.linear(hidden, self.weight2, self.bias2).squeeze(-1)
