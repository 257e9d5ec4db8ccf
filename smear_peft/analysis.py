"""Routing analysis: record what every block's router did, aggregate it per tag, draw the paper's heatmaps.

::

    from smear_peft.analysis import RoutingRecorder, plot_routing_heatmaps

    with RoutingRecorder(model) as recorder:          # a PeftModel (or SmearModel) with SMEAR adapters
        for batch in loader:
            model(**batch, routing_tags=batch["task"])  # or model.generate(..., routing_tags=...)
    means = recorder.mean_probs_per_tag()              # [blocks, tags, experts]
    plot_routing_heatmaps(means, "routing.png")        # Fig. 3 of the paper: one tags x experts map per block

The recorder stores, for every block (keyed by its module name, e.g. ``encoder.block.0.layer.1.DenseReluDense``):

* ``probs`` ``[n, N]``: the router's probabilities (after expert dropout in training) as CPU float32. Methods without a
  router record the one-hot of the expert they used (``tag``, ``hash``) or ``[n, 1]`` ones (``monolithic``);
* ``chosen`` ``[n]``: the expert each example used (discrete methods; the top-``k`` list's first for ``top_k`` with
  k > 1) or the argmax of ``probs`` for soft methods (``smear``, ``ensemble``);
* ``tags`` ``[n]``: the example's ``routing_tags`` (-1 when none were given);
* ``weights`` ``[n, N]``: what the block did with its experts, exactly (`RoutingDecision.dense_weights`): the merge
  weights (``smear``), the output weights (``ensemble``; top-k's renormalised weights at their experts; k=1:
  ``p_argmax`` at the argmax) or the one-hot of the chosen expert (``st_gumbel``, ``reinforce``, ``tag``, ``hash``),
  combined as the record's ``mixture`` says (``parameters`` for merges, ``outputs`` otherwise). `export_adapter`
  exports these, not ``probs``.

Each record also says which ``adapter`` it belongs to and which module (``module``) it routes, and whether its rows are
segments (``segmented``: ``causal_routing="segment"`` routes every segment of an example on its own).

Rows are the examples a block saw: ``B`` per forward, ``B * num_beams`` for decoder blocks under ``generate`` (each
decoder block routes once per ``generate`` call). Nothing is recorded, and nothing costs anything, outside the
``with`` block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .losses import unwrap_smear_model


@dataclass
class BlockRecord:
    """What one block recorded (lists of per-call tensors; see `RoutingRecorder`)."""

    side: str
    num_experts: int
    probs: list[torch.Tensor] = field(default_factory=list)
    chosen: list[torch.Tensor] = field(default_factory=list)
    tags: list[torch.Tensor] = field(default_factory=list)
    adapter: str = "default"
    module: str = ""
    weights: list[torch.Tensor] = field(default_factory=list)
    mixture: Optional[str] = None  # "parameters" (merge), "outputs" (select / mix) or None (shared)
    segmented: bool = False  # rows are segments of examples (causal_routing="segment"), not examples


@dataclass
class RoutingMeans:
    """Mean routing distribution per tag per block: ``means[b, t]`` is the average of ``probs`` over the examples of
    tag ``tags[t]`` seen by block ``blocks[b]`` (``counts[b, t]`` of them; rows with no examples are NaN).

    ``weights`` are the means of the recorded `RoutingRecorder.weights` (what the blocks did, combined as
    ``mixtures[b]`` says), which `export_adapter` exports; ``adapters[b]`` and ``modules[b]`` name the adapter and
    module of block ``b``, ``segmented[b]`` whether its rows were segments. Means built by hand leave them empty."""

    blocks: list[str]
    tags: list[int]
    tag_labels: list[str]
    means: torch.Tensor  # [blocks, tags, experts]
    counts: torch.Tensor  # [blocks, tags]
    sides: list[str] = field(default_factory=list)
    weights: Optional[torch.Tensor] = None  # [blocks, tags, experts]
    mixtures: list[Optional[str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    segmented: list[bool] = field(default_factory=list)

    def block(self, name: str) -> torch.Tensor:
        """``[tags, experts]`` mean probabilities of one block."""
        return self.means[self.blocks.index(name)]


class RoutingRecorder:
    """Context manager that records every routing decision of ``model``'s SMEAR blocks (see the module docstring).

    Args:
        model: A `PeftModel` / `SmearModel` (or a DDP / compiled wrapper of one).
        adapter: Adapter to record (default: every active adapter; with several, block names get an ``@adapter``
            suffix for the non-default ones).
        tag_names: Labels of the tag indices in aggregates and plots (default: the adapter config's ``tag_names``).
    """

    def __init__(self, model: nn.Module, adapter: Optional[str] = None, tag_names: Optional[Sequence[str]] = None):
        self.smear_model = unwrap_smear_model(model)
        self.adapter = adapter
        if tag_names is None:
            configs = self.smear_model.peft_config
            config = configs.get(adapter) if adapter else next(iter(configs.values()), None)
            tag_names = getattr(config, "tag_names", None)
        self.tag_names = list(tag_names) if tag_names else None
        self.records: dict[str, BlockRecord] = {}
        self._scope: Any = None

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> "RoutingRecorder":
        # A scope of this thread's calls (smear_peft.frames): other threads' calls are not recorded.
        self._scope = self.smear_model.frames.scope(recorder=self)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        scope, self._scope = self._scope, None
        scope.__exit__(*exc_info)

    # -- called by SmearLayer --------------------------------------------------------------------------------------
    @torch.no_grad()
    def record(
        self, layer: nn.Module, adapter: str, decision: Any, tags: Optional[torch.Tensor], segmented: bool = False
    ) -> None:
        """Store one block's decision for one batch (called by `SmearLayer` while the recorder is active;
        ``segmented``: the decision's rows are segments of the examples, not the examples)."""
        if self.adapter is not None and adapter != self.adapter:
            return
        name = layer.block_name if adapter == "default" or self.adapter is not None else f"{layer.block_name}@{adapter}"
        num_experts = layer.smear_experts[adapter].num_experts
        if decision.probs is not None:
            num_experts = decision.probs.shape[-1]
        record = self.records.get(name)
        if record is None:
            record = self.records[name] = BlockRecord(
                side=layer.side, num_experts=num_experts, adapter=adapter, module=layer.block_name,
                mixture=decision.mixture,
            )
        elif record.mixture != decision.mixture:  # no routing method changes kind; a guard for custom ones
            raise RuntimeError(
                f"Block {name!r} routed as {record.mixture!r} and now as {decision.mixture!r}: record them apart."
            )
        record.segmented = record.segmented or segmented
        chosen = decision.chosen_experts()
        if decision.probs is not None:
            probs = decision.probs.detach().float().cpu()
            if chosen is None:
                chosen = probs.argmax(-1)
        elif decision.kind == "shared":
            batch = tags.shape[0] if tags is not None else _batch_of(decision, layer)
            probs = torch.ones(batch, 1)
            chosen = torch.zeros(batch, dtype=torch.long)
        else:
            probs = F.one_hot(chosen.detach().cpu().long(), num_experts).float()
        chosen = chosen.detach().cpu().long()
        weights = decision.dense_weights(num_experts)
        record.weights.append(torch.ones(probs.shape[0], 1) if weights is None else weights.detach().float().cpu())
        record.probs.append(probs)
        record.chosen.append(chosen)
        record.tags.append(
            tags.detach().cpu().long().reshape(-1) if tags is not None else torch.full_like(chosen, -1)
        )

    # -- access ----------------------------------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        """Recorded blocks, in the order they first routed (model order)."""
        return list(self.records)

    def probs(self, block: str) -> torch.Tensor:
        """``[n, N]`` probabilities recorded by a block."""
        return torch.cat(self.records[block].probs)

    def chosen(self, block: str) -> torch.Tensor:
        """``[n]`` expert used by each recorded example of a block."""
        return torch.cat(self.records[block].chosen)

    def weights(self, block: str) -> torch.Tensor:
        """``[n, N]`` what the block did with its experts for each recorded row (see the module docstring), combined
        as ``records[block].mixture`` says."""
        return torch.cat(self.records[block].weights)

    @property
    def adapters(self) -> list[str]:
        """Adapters recorded, in the order they first routed."""
        return list(dict.fromkeys(record.adapter for record in self.records.values()))

    def tags(self, block: str) -> torch.Tensor:
        """``[n]`` tag of each recorded example of a block (-1: none)."""
        return torch.cat(self.records[block].tags)

    def expert_counts(self, block: str) -> torch.Tensor:
        """``[N]`` how many recorded examples of a block used each expert."""
        return torch.bincount(self.chosen(block), minlength=self.records[block].num_experts)

    def clear(self) -> None:
        self.records.clear()

    def mean_probs_per_tag(self, blocks: Optional[Sequence[str]] = None) -> RoutingMeans:
        """Mean routing distribution per tag per block (a single ``all`` row when no tags were recorded)."""
        blocks = list(blocks) if blocks is not None else self.block_names
        if not blocks:
            raise ValueError("The recorder holds nothing: run the model inside `with RoutingRecorder(model):` first.")
        all_tags = torch.cat([self.tags(b) for b in blocks])
        tag_values = sorted(set(all_tags.tolist()))
        width = max(self.records[b].num_experts for b in blocks)
        means = torch.full((len(blocks), len(tag_values), width), float("nan"))
        weight_means = torch.full((len(blocks), len(tag_values), width), float("nan"))
        counts = torch.zeros(len(blocks), len(tag_values), dtype=torch.long)
        for i, block in enumerate(blocks):
            probs, weights, tags = self.probs(block), self.weights(block), self.tags(block)
            for j, tag in enumerate(tag_values):
                rows = tags == tag
                counts[i, j] = int(rows.sum())
                if counts[i, j]:
                    for target, values in ((means, probs), (weight_means, weights)):
                        target[i, j, : values.shape[1]] = values[rows].mean(0)
                        target[i, j, values.shape[1]:] = 0.0
        labels = [self._tag_label(t) for t in tag_values]
        records = [self.records[b] for b in blocks]
        return RoutingMeans(
            blocks, tag_values, labels, means, counts, [r.side for r in records], weight_means,
            [r.mixture for r in records], [r.adapter for r in records], [r.module for r in records],
            [r.segmented for r in records],
        )

    def _tag_label(self, tag: int) -> str:
        if tag < 0:
            return "all"
        if self.tag_names is not None and tag < len(self.tag_names):
            return str(self.tag_names[tag])
        return str(tag)


def _batch_of(decision: Any, layer: nn.Module) -> int:
    if decision.batch_size is not None:
        return decision.batch_size
    for value in (decision.index, decision.weights, decision.probs):
        if value is not None:
            return value.shape[0]
    raise RuntimeError(f"Cannot tell the batch size of block {layer.block_name!r}'s routing decision.")


def plot_routing_heatmaps(
    recorder_or_means: Union[RoutingRecorder, RoutingMeans],
    path: Optional[str] = None,
    *,
    blocks: Optional[Sequence[str]] = None,
    ncols: Optional[int] = None,
    cmap: str = "viridis",
    vmax: Optional[float] = None,
    title: Optional[str] = None,
    panel_size: tuple[float, float] = (2.6, 2.2),
    dpi: int = 120,
):
    """Paper Fig. 3 style grid: for every block a tags x experts heatmap of the mean routing probabilities.

    Returns the matplotlib ``Figure`` (saved to ``path`` when given; no pyplot state is touched). ``vmax`` defaults to
    the largest mean over all blocks, so panels share one colour scale.
    """
    from matplotlib.figure import Figure

    means = recorder_or_means.mean_probs_per_tag(blocks) if isinstance(recorder_or_means, RoutingRecorder) else recorder_or_means
    names = list(blocks) if blocks is not None else means.blocks
    index = [means.blocks.index(n) for n in names]
    count = len(names)
    ncols = ncols or min(count, 6)
    nrows = -(-count // ncols)
    values = means.means[index]
    top = vmax if vmax is not None else float(torch.nan_to_num(values, nan=0.0).max().clamp_min(1e-6))
    figure = Figure(figsize=(panel_size[0] * ncols + 1.0, panel_size[1] * nrows + (0.6 if title else 0.2)), dpi=dpi, layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= count:
            ax.set_axis_off()
            continue
        data = values[k].numpy()
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(_short_block_name(names[k]), fontsize=7)
        ax.set_xticks(range(data.shape[1]))
        ax.set_xticklabels([str(e) for e in range(data.shape[1])], fontsize=6)
        ax.set_yticks(range(data.shape[0]))
        ax.set_yticklabels(means.tag_labels if k % ncols == 0 else [], fontsize=6)
        if k // ncols == nrows - 1:
            ax.set_xlabel("expert", fontsize=7)
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mean routing probability")
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, bbox_inches="tight")
    return figure


def _short_block_name(name: str) -> str:
    """``encoder.block.3.layer.1.DenseReluDense`` -> ``enc 3 DenseReluDense``."""
    parts = name.replace("base_model.model.", "").split(".")
    side = {"encoder": "enc", "decoder": "dec"}.get(parts[0], parts[0])
    numbers = [p for p in parts if p.isdigit()]
    return " ".join([side] + numbers[:1] + parts[-1:]) if len(parts) > 2 else name
