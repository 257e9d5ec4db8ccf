"""Routing methods: how a block turns router logits (or tags, or hashes) into the use of its experts.

Every method is a small class that maps `RoutingInputs` to a `RoutingDecision`; the block then applies the decision
with one shared code path per kind (`SmearLayer`):

============  ==========  =================================================================================
method        kind        what the experts see
============  ==========  =================================================================================
smear         merge       one expert whose parameters are the probability-weighted average of all experts
top_k         select/mix  argmax expert, output scaled by its probability (k > 1: renormalised mixture)
st_gumbel     select      argmax of Gumbel-softmax, straight-through multiplier in training; argmax in eval
reinforce     select      sampled expert in training, argmax in eval; router trained by the auxiliary loss
tag           select      the expert of the example's tag (Tag+: a tag-to-expert mapping)
hash          select      a fixed pseudo-random expert per (example key, block)
monolithic    shared      one expert for every example
ensemble      mix         every expert, outputs mixed by the router's probabilities
============  ==========  =================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import SmearConfig

DecisionKind = Literal["merge", "select", "mix", "shared"]


@dataclass
class RoutingInputs:
    """What a routing method may look at for one block and one batch."""

    logits: Optional[torch.Tensor]  # [B, N] router logits; None for methods without a router
    batch_size: int
    device: torch.device
    training: bool
    side: str  # "encoder", "decoder" or "any"
    block_index: int
    tags: Optional[torch.Tensor] = None  # [B] tag indices
    keys: Optional[torch.Tensor] = None  # [B] int64 example keys (hash routing)


@dataclass
class RoutingDecision:
    """How one block uses its experts for a batch.

    * ``merge``: ``weights`` ``[B, N]`` average the experts' parameters.
    * ``select``: ``index`` ``[B]`` picks one expert per example; its output is scaled by ``weights`` ``[B]`` if given.
    * ``mix``: outputs of the experts ``index`` ``[B, K]`` (all experts if ``None``) summed with ``weights``.
    * ``shared``: expert 0 for every example.

    ``probs`` are the router's probabilities (after expert dropout) for analysis; ``log_prob`` and ``entropy`` feed the
    REINFORCE auxiliary loss.
    """

    kind: DecisionKind
    index: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None
    log_prob: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    batch_size: Optional[int] = None  # set by ``shared`` decisions, which carry no per-example tensor

    @property
    def mixture(self) -> Optional[str]:
        """How `dense_weights` combine the experts: ``"parameters"`` (a merge of their parameters), ``"outputs"``
        (a weighted sum of their outputs; select and mix decisions) or ``None`` (``shared``: the one expert)."""
        return {"merge": "parameters", "select": "outputs", "mix": "outputs"}.get(self.kind)

    def dense_weights(self, num_experts: int) -> Optional[torch.Tensor]:
        """``[B, N]`` weight of every expert in what the block computed for each example, combined as `mixture` says:
        ``merge``: the weights of the parameter average; ``select``: one-hot of the chosen expert times its output
        scale (1 without one); ``mix``: the mixing weights at their experts (zeros elsewhere); ``shared``: ``None``.
        A fixed adapter with these weights computes exactly what the block did for that example (export)."""
        if self.kind == "shared":
            return None
        if self.kind == "merge" or (self.kind == "mix" and self.index is None):
            return self.weights.detach()
        if self.kind == "select":
            dense = F.one_hot(self.index.detach().long(), num_experts).to(torch.float32)
            if self.weights is not None:
                dense = dense * self.weights.detach().to(torch.float32)[:, None]
            return dense
        dense = torch.zeros(self.index.shape[0], num_experts, dtype=self.weights.dtype, device=self.weights.device)
        return dense.scatter(1, self.index.detach().long(), self.weights.detach())

    def chosen_experts(self) -> Optional[torch.Tensor]:
        """``[B]`` expert per example for discrete decisions (analysis)."""
        if self.kind == "select":
            return self.index
        if self.kind == "shared":
            return None
        if self.kind == "mix" and self.index is not None:
            return self.index[:, 0]
        return None


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Routing runs in float32 for half-precision models, and in the model's precision above that (float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


ROUTING_METHODS: dict[str, type["RoutingMethod"]] = {}


def register_routing(cls: type["RoutingMethod"]) -> type["RoutingMethod"]:
    """Class decorator adding a routing method to `ROUTING_METHODS` under ``cls.name``."""
    ROUTING_METHODS[cls.name] = cls
    return cls


class RoutingMethod:
    """Base class of routing methods. One instance per adapter, shared by all of its blocks."""

    name: ClassVar[str]
    # -- capabilities: what the blocks and the tuner provide to the method (no code checks routing names) ------------
    #: The block has a router whose logits are passed in `RoutingInputs.logits`.
    uses_router: ClassVar[bool] = True
    #: `RoutingInputs.tags` must hold each example's tag (``routing_tags``).
    needs_tags: ClassVar[bool] = False
    #: `RoutingInputs.keys` must hold each example's key (``routing_keys``, else a content hash of the inputs).
    needs_keys: ClassVar[bool] = False
    #: The block keeps a learned baseline and records REINFORCE terms (`SmearModel.reinforce_loss`).
    has_baseline: ClassVar[bool] = False

    def __init__(self, config: "SmearConfig"):
        self.config = config

    def num_expert_slots(self) -> int:
        """Number of experts a block allocates."""
        return self.config.num_experts

    def bottleneck_multiplier(self) -> int:
        """Factor on the configured bottleneck size (``monolithic`` "1x params": N)."""
        return 1

    def initial_temperature(self) -> Optional[float]:
        """Initial value of a temperature the tuner keeps (and saves) for this adapter; ``None``: no temperature."""
        return None

    def temperature_at(self, step: int) -> Optional[float]:
        """The temperature at a training step (`SmearModel.set_training_step`); ``None``: no schedule."""
        return None

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        raise NotImplementedError

    def export_mixture(self) -> str:
        """How fixed routing weights given by hand (``export_adapter(probs=...)``) combine the experts when no
        ``mixture`` is named: ``"parameters"`` (SMEAR's merge; also what a one-hot of a discrete method means) or
        ``"outputs"`` (methods that weight their experts' outputs: ensemble, top-k). Recorded routings carry their
        own (`RoutingDecision.mixture`)."""
        return "parameters"

    # -- shared helpers ---------------------------------------------------------------------------------------------
    def router_probs(self, inputs: RoutingInputs) -> torch.Tensor:
        """The router's probabilities ``[B, N]`` after expert dropout (training only)."""
        keep = self.expert_dropout_mask(inputs, inputs.logits)
        return self.drop_probs(F.softmax(at_least_float32(inputs.logits), dim=-1), keep)

    def expert_dropout_mask(self, inputs: RoutingInputs, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """Training-only keep mask ``[B, N]`` of expert dropout, or ``None`` when it does not apply."""
        rate = self.config.expert_dropout
        if not inputs.training or rate == 0.0:
            return None
        return torch.rand_like(logits, dtype=torch.float32) >= rate

    @staticmethod
    def drop_probs(probs: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """Zero dropped probabilities and renormalise (all dropped: uniform), as the authors."""
        if keep is None:
            return probs
        kept = probs * keep + 1e-10
        return kept / kept.sum(-1, keepdim=True)

    @staticmethod
    def drop_logits(logits: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """Set dropped logits to -1e10 so sampling never picks a dropped expert.

        A row whose experts are all dropped samples uniformly (all logits 0), matching the uniform probabilities of
        `drop_probs`; masking it with -1e10 would swamp the Gumbel noise in float32 and always pick expert 0."""
        if keep is None:
            return logits
        masked = logits.masked_fill(~keep, -1e10)
        return torch.where(keep.any(-1, keepdim=True), masked, torch.zeros_like(logits))


@register_routing
class SmearRouting(RoutingMethod):
    """SMEAR: merge the experts' parameters with the router's probabilities."""

    name = "smear"

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        probs = self.router_probs(inputs)
        return RoutingDecision("merge", weights=probs, probs=probs)


@register_routing
class EnsembleRouting(RoutingMethod):
    """Run every expert and mix their outputs with the router's probabilities (N times the cost)."""

    name = "ensemble"

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        probs = self.router_probs(inputs)
        return RoutingDecision("mix", weights=probs, probs=probs)

    def export_mixture(self) -> str:
        return "outputs"


@register_routing
class TopKRouting(RoutingMethod):
    """Top-k routing. k=1 (the paper): the argmax expert, output scaled by its probability in training and
    evaluation, as the authors. k>1: the k experts' outputs weighted by their probabilities renormalised over the k."""

    name = "top_k"

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        probs = self.router_probs(inputs)
        k = self.config.top_k
        if k == 1:
            weight, index = probs.max(dim=-1)
            return RoutingDecision("select", index=index, weights=weight, probs=probs)
        weights, index = probs.topk(k, dim=-1)
        return RoutingDecision("mix", index=index, weights=weights / weights.sum(-1, keepdim=True), probs=probs)

    def export_mixture(self) -> str:
        return "outputs"  # its weights scale the chosen experts' outputs (k=1: p_argmax times one expert's update)


@register_routing
class StraightThroughGumbelRouting(RoutingMethod):
    """ST-Gumbel: training picks the argmax of ``softmax((logits + g) / tau)`` and multiplies the expert's output by
    ``1 - sg(y) + y`` (value 1, gradient of ``y``); evaluation picks the router's argmax with no scaling.

    The temperature is a one-element buffer owned by the tuner (so it is saved with the adapter and follows the model
    across devices); `gumbel_temperature_at` gives the authors' schedule.
    """

    name = "st_gumbel"

    def __init__(self, config: "SmearConfig"):
        super().__init__(config)
        self._buffers: dict = {"tau": torch.tensor([config.gumbel_temperature])}
        self._key = "tau"

    def initial_temperature(self) -> Optional[float]:
        return self.config.gumbel_temperature

    def temperature_at(self, step: int) -> Optional[float]:
        c = self.config
        return gumbel_temperature_at(
            step, c.gumbel_temperature, c.gumbel_min_temperature, c.gumbel_anneal_rate, c.gumbel_anneal_every,
            c.gumbel_schedule or "t5",
        )

    def bind_temperature(self, buffers, key: str) -> None:
        """Read the temperature from ``buffers[key]`` (the tuner's `BufferDict`)."""
        self._buffers, self._key = buffers, key

    @property
    def temperature(self) -> torch.Tensor:
        return self._buffers[self._key]

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        logits = at_least_float32(inputs.logits)
        if not inputs.training:
            probs = F.softmax(logits, dim=-1)
            return RoutingDecision("select", index=probs.argmax(-1), probs=probs)
        keep = self.expert_dropout_mask(inputs, logits)
        logits = self.drop_logits(logits, keep)
        uniform = torch.rand_like(logits)
        gumbel = -torch.log(-torch.log(uniform + 1e-20) + 1e-20)
        soft = F.softmax((logits + gumbel) / self.temperature.to(logits.device), dim=-1)
        value, index = soft.max(dim=-1)
        multiplier = 1.0 - value.detach() + value
        return RoutingDecision("select", index=index, weights=multiplier, probs=self.drop_probs(F.softmax(logits, -1), keep))


def gumbel_temperature_at(
    step: int, initial: float, minimum: float, rate: float, every: int, schedule: str = "t5"
) -> float:
    """The temperature the authors' training loops use at (0-based) training step ``step``, in closed form.

    Both loops update ``tau = max(tau * exp(-rate * s), minimum)`` once per evaluation interval, compounding, with
    ``s = k * every - 1`` for the k-th update; they differ in when the new value takes effect:

    * ``"t5"`` (their Hugging Face trainer): the update runs before the step whose index is ``k * every - 1``
      (``(global_step + 1) % eval_steps == 0``), so that step already uses it;
    * ``"resnet"`` (their DomainNet loop): the update runs after that step, at evaluation, so step ``k * every``
      is the first to use it.

    After K updates ``tau = initial * exp(-rate * (every * K (K + 1) / 2 - K))``, floored at ``minimum``.
    """
    if schedule not in ("t5", "resnet"):
        raise ValueError(f"schedule must be 't5' or 'resnet', got {schedule!r}")
    updates = (step + 1) // every if schedule == "t5" else step // every
    exponent = every * updates * (updates + 1) / 2 - updates
    return max(initial * math.exp(-rate * exponent), minimum)


@register_routing
class ReinforceRouting(RoutingMethod):
    """REINFORCE: sample an expert in training (argmax in evaluation). The router gets no gradient from the task
    loss; `SmearModel.reinforce_loss` trains it with a policy-gradient term against a learned baseline."""

    name = "reinforce"
    has_baseline = True

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        logits = at_least_float32(inputs.logits)
        if not inputs.training:
            probs = F.softmax(logits, dim=-1)
            return RoutingDecision("select", index=probs.argmax(-1), probs=probs)
        logits = self.drop_logits(logits, self.expert_dropout_mask(inputs, logits))
        log_probs = F.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        index = torch.multinomial(probs.detach(), 1).squeeze(-1)
        entropy = -(probs * log_probs).sum(-1)
        return RoutingDecision(
            "select", index=index, probs=probs, log_prob=log_probs.gather(-1, index[:, None]).squeeze(-1), entropy=entropy
        )


@register_routing
class TagRouting(RoutingMethod):
    """Route every example to the expert of its tag (``routing_tags``); Tag+ maps tags to experts per side."""

    name = "tag"
    uses_router = False
    needs_tags = True

    def __init__(self, config: "SmearConfig"):
        super().__init__(config)
        self._tables = {side: torch.tensor(config.tag_expert_table(side)) for side in ("encoder", "decoder", "any")}

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        if inputs.tags is None:
            raise ValueError(
                "routing='tag' needs per-example tags: call the model with routing_tags=[...] (one int or tag name "
                "per example)."
            )
        num_tags = self.config.resolved_num_tags
        if inputs.tags.numel() and (int(inputs.tags.min()) < 0 or int(inputs.tags.max()) >= num_tags):
            raise ValueError(
                f"routing_tags must be in [0, {num_tags}) for this adapter, got {inputs.tags.tolist()}; set "
                "SmearConfig(num_tags=...) or tag_names to cover every tag."
            )
        table = self._tables[inputs.side]
        if table.device != inputs.device:  # move once, not on every block call
            table = self._tables[inputs.side] = table.to(inputs.device)
        return RoutingDecision("select", index=table[inputs.tags])


@register_routing
class HashRouting(RoutingMethod):
    """A fixed pseudo-random expert per (example key, block), from a portable 64-bit mix (never Python's ``hash``).

    Keys come from ``routing_keys`` (e.g. dataset indices, so every prompt template of an example shares its routing);
    without them each example's key is a content hash of its input ids (or embeddings, or pixels), see `content_keys`.
    """

    name = "hash"
    uses_router = False
    needs_keys = True

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        if inputs.keys is None:
            raise ValueError(
                "routing='hash' found no example keys: pass routing_keys=[...] (one int per example), or input_ids / "
                "inputs_embeds / pixel_values to hash (causal LMs: the prompt's; causal_routing='segment' needs "
                "routing_keys)."
            )
        experts = hash_experts(inputs.keys.cpu().numpy(), inputs.block_index, self.config.hash_seed, self.config.num_experts)
        return RoutingDecision("select", index=torch.from_numpy(experts).to(inputs.device))


@register_routing
class MonolithicRouting(RoutingMethod):
    """A single expert for every example: "1x compute" (normal bottleneck) or "1x params" (N times wider)."""

    name = "monolithic"
    uses_router = False

    def num_expert_slots(self) -> int:
        return 1

    def bottleneck_multiplier(self) -> int:
        return self.config.num_experts if self.config.monolithic_params == "params" else 1

    def decide(self, inputs: RoutingInputs) -> RoutingDecision:
        return RoutingDecision("shared", batch_size=inputs.batch_size)


# -- portable hashing -----------------------------------------------------------------------------------------------
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on ``uint64`` arrays: a fixed, platform-independent 64-bit mixing function."""
    with np.errstate(over="ignore"):
        z = (values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def hash_experts(keys: np.ndarray, block_index: int, seed: int, num_experts: int) -> np.ndarray:
    """Expert ``[B]`` of each example key for one block: ``splitmix64(key ^ splitmix64(block, seed)) % N``."""
    salt = splitmix64(np.array([block_index], dtype=np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64)))
    mixed = splitmix64(keys.astype(np.int64).view(np.uint64) ^ salt)
    return (mixed % np.uint64(num_experts)).astype(np.int64)


def content_keys(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic 63-bit key per example from its content (token ids, embeddings or pixel values), ignoring padding.

    ``key_b = splitmix64(sum_j splitmix64(p_bj) * splitmix64(bits(x_bj)))`` over the example's real elements, in
    wrapping uint64 arithmetic. ``mask`` ``[B, S]`` marks the real positions of ``values`` ``[B, S, ...]``; an
    element's position ``p_bj`` counts the real elements before it (``rank * inner + offset``, with ``rank`` the
    number of real positions before its own and ``inner`` the elements per position), so an example gets the same key
    alone, left- or right-padded, in any batch, process or machine. Without padding (or with right padding only) ``p``
    is the plain flat index.
    """
    values = values.detach()
    batch = values.shape[0]
    flat = values.reshape(batch, -1).cpu()
    if flat.is_floating_point():
        flat = flat.float().view(torch.int32).to(torch.int64)
    array = flat.to(torch.int64).numpy().view(np.uint64)
    if mask is None:
        position = np.arange(array.shape[1], dtype=np.uint64)[None, :]
        real = None
    else:
        if values.dim() < 2 or tuple(mask.shape) != tuple(values.shape[:2]):
            raise ValueError(
                f"content_keys got a mask of shape {tuple(mask.shape)} for inputs of shape {tuple(values.shape)}: the "
                "mask must mark each (example, position) of the inputs, [batch, positions]. Pass the 2-D padding "
                "mask of these inputs, or routing_keys=[...] (one int per example)."
            )
        inner = math.prod(values.shape[2:])
        real = mask.detach().reshape(batch, -1).cpu().numpy().astype(bool)  # [B, S]
        rank = np.maximum(np.cumsum(real, axis=1, dtype=np.int64) - 1, 0)  # real positions before each position
        offset = np.arange(inner, dtype=np.int64)
        position = (rank[:, :, None] * inner + offset[None, None, :]).reshape(batch, -1).astype(np.uint64)
        real = np.repeat(real, inner, axis=1)
    with np.errstate(over="ignore"):
        terms = splitmix64(array) * splitmix64(position)
    if real is not None:
        terms = np.where(real, terms, np.uint64(0))
    with np.errstate(over="ignore"):
        total = terms.sum(axis=1, dtype=np.uint64)
    return torch.from_numpy((splitmix64(total) >> np.uint64(1)).astype(np.int64))


def build_routing_method(config: "SmearConfig") -> RoutingMethod:
    """The routing method named by ``config.routing``."""
    return ROUTING_METHODS[config.routing](config)
