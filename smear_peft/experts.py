"""A stack of bottleneck experts and the three ways a routing block applies them.

Expert ``n`` maps ``u`` (``[..., hidden]``) to ``act(u @ down_weight[n] + down_bias[n]) @ up_weight[n]`` (no up bias, as in
the authors' code). A routing block applies the stack in one of three ways:

* **merged** (SMEAR): per-example parameters ``theta_b = sum_n p_bn theta_n``, then one expert's computation;
* **selected** (discrete routing): per-example parameters gathered from the chosen expert(s), no N-way merge;
* **all experts** (ensemble): every expert's output, computed in batched contractions (`run_mixture` fuses the
  mixing into them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .routing import RoutingDecision

#: Activations between the projections. ``swish`` is what the authors' code uses.
ACTIVATIONS = {
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class ExpertParameters(NamedTuple):
    """One expert's parameters per example: ``[B, hidden, r]``, ``[B, r]``, ``[B, r, hidden]``."""

    down_weight: torch.Tensor
    down_bias: torch.Tensor
    up_weight: torch.Tensor


class Experts(nn.Module):
    """``num_experts`` bottleneck adapters stored as stacked tensors ``[N, ...]`` (a leaf module)."""

    def __init__(self, num_experts: int, hidden_size: int, bottleneck_size: int, activation: str = "swish"):
        super().__init__()
        self.num_experts = num_experts  # an int, not a parameter shape: FSDP1 / ZeRO-3 shards flatten the stacks
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.down_weight = nn.Parameter(torch.empty(num_experts, hidden_size, bottleneck_size))
        self.down_bias = nn.Parameter(torch.empty(num_experts, bottleneck_size))
        self.up_weight = nn.Parameter(torch.empty(num_experts, bottleneck_size, hidden_size))

    @property
    def weight(self) -> torch.Tensor:
        """The down-projections: a ``.weight`` so that size / ``requires_grad`` based FSDP wrap policies (PEFT's
        ``fsdp_auto_wrap_policy``, which wraps leaf modules whose ``weight`` is trainable) make the experts their own
        unit, keeping trainable and frozen parameters in different flat parameters (``use_orig_params=False``)."""
        return self.down_weight

    @property
    def dtype(self) -> torch.dtype:
        return self.down_weight.dtype

    def forward(
        self, inputs: torch.Tensor, decision: "RoutingDecision", params: Optional[ExpertParameters] = None
    ) -> tuple[torch.Tensor, Optional[ExpertParameters]]:
        """Apply the experts to ``inputs`` ``[U, S, hidden]`` as ``decision`` says (one row of it per unit).

        Returns the output and the per-unit parameters it used (merged or gathered; ``None`` for ``shared`` and
        ``mix``), which a caller may pass back as ``params`` to apply the same expert again (decoding steps). All
        parameter reads happen here, so the module can be its own FSDP / ZeRO-3 unit."""
        if decision.kind == "shared":
            return self.run_shared(inputs), None
        if decision.kind in ("merge", "select"):
            if params is None:
                params = self.merged(decision.weights) if decision.kind == "merge" else self.selected(decision.index)
            output = self.run(inputs, params)
            if decision.kind == "select" and decision.weights is not None:
                output = output * decision.weights.to(output.dtype)[:, None, None]
            return output, params
        if decision.index is None:  # every expert (ensemble): mixed inside the contractions
            return self.run_mixture(inputs, decision.weights), None
        outputs = self.run_each(inputs, decision.index)  # [U, K, S, C]
        return torch.einsum("bk,bksc->bsc", decision.weights.to(outputs.dtype), outputs), None

    @torch.no_grad()
    def reset_parameters(self, init_std: float) -> None:
        """Every expert weight ~ N(0, init_std), biases zero (the authors' init)."""
        nn.init.normal_(self.down_weight, std=init_std)
        nn.init.zeros_(self.down_bias)
        nn.init.normal_(self.up_weight, std=init_std)

    def merged(self, probs: torch.Tensor) -> ExpertParameters:
        """SMEAR: average the experts' parameters with per-example weights ``probs`` ``[B, N]``."""
        batch = probs.shape[0]
        probs = probs.to(self.down_weight.dtype)
        return ExpertParameters(
            (probs @ self.down_weight.flatten(1)).view(batch, *self.down_weight.shape[1:]),
            probs @ self.down_bias,
            (probs @ self.up_weight.flatten(1)).view(batch, *self.up_weight.shape[1:]),
        )

    def selected(self, index: torch.Tensor) -> ExpertParameters:
        """Gather the parameters of one expert per example, ``index`` ``[B]``."""
        return ExpertParameters(self.down_weight[index], self.down_bias[index], self.up_weight[index])

    def run(self, inputs: torch.Tensor, params: ExpertParameters) -> torch.Tensor:
        """Apply per-example parameters to ``inputs`` ``[B, S, hidden]``."""
        hidden = torch.baddbmm(params.down_bias.unsqueeze(1), inputs, params.down_weight)
        return torch.bmm(self.activation(hidden), params.up_weight)

    def run_shared(self, inputs: torch.Tensor, expert: int = 0) -> torch.Tensor:
        """Apply one expert to the whole batch (monolithic routing): plain matmuls, no per-example copies."""
        hidden = torch.addmm(self.down_bias[expert], inputs.flatten(0, -2), self.down_weight[expert])
        return (self.activation(hidden) @ self.up_weight[expert]).view_as(inputs)

    def run_mixture(self, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_n weights[b, n] * expert_n(inputs[b])`` over all ``N`` experts (ensemble), ``weights`` ``[B, N]``.

        Equal to mixing the outputs of `run_each`, without materialising the ``[B, N, S, hidden]`` outputs: one
        ``[.., hidden] x [hidden, N*r]`` product for all down-projections, the weights applied to the ``N`` activations,
        and one ``[.., N*r] x [N*r, hidden]`` product for all up-projections (the same FLOPs as running each expert).
        """
        num, hidden_size, rank = self.down_weight.shape
        down = self.down_weight.permute(1, 0, 2).reshape(hidden_size, num * rank)
        hidden = torch.addmm(self.down_bias.reshape(-1), inputs.reshape(-1, hidden_size), down)
        hidden = self.activation(hidden).view(inputs.shape[0], -1, num, rank) * weights.to(hidden.dtype)[:, None, :, None]
        return (hidden.reshape(-1, num * rank) @ self.up_weight.reshape(num * rank, hidden_size)).view_as(inputs)

    def run_each(self, inputs: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Outputs ``[B, K, S, hidden]`` of several experts per example.

        ``index`` ``[B, K]`` names the experts of each example; ``None`` runs all ``N`` experts without gathering.
        """
        if index is None:
            hidden = torch.einsum("bsc,ncr->bnsr", inputs, self.down_weight) + self.down_bias[None, :, None]
            return torch.einsum("bnsr,nrc->bnsc", self.activation(hidden), self.up_weight)
        hidden = torch.einsum("bsc,bkcr->bksr", inputs, self.down_weight[index]) + self.down_bias[index][:, :, None]
        return torch.einsum("bksr,bkrc->bksc", self.activation(hidden), self.up_weight[index])
