"""`SmearConfig`: the configuration of routed expert adapters (SMEAR and the routing baselines of the paper)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .routing import ROUTING_METHODS

#: Sublayers that get an expert routing block in transformer presets.
SUBLAYERS = ("self_attention", "cross_attention", "feed_forward")
#: Default of ``feedforward_modules``: PEFT's IA3 table of the model type, resolved (and saved as a list) by
#: ``get_peft_model``. Not ``None``, which configs saved by earlier versions hold with explicit ``target_modules``
#: and which must keep meaning "no module input-scaled" there.
FEEDFORWARD_PRESET = "preset"
#: ``task_type`` written by smear-peft 0.1 (which picked the PEFT model class itself); read as ``None``.
LEGACY_AUTO_TASK_TYPE = "AUTO"


def _fail(field_name: str, message: str) -> None:
    raise ValueError(f"SmearConfig.{field_name}: {message}")


def _check_int(field_name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """An integer knob: a real ``int`` (not a bool, float or string) of at least ``minimum`` (or None if optional)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(field_name, f"must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}.")


@dataclass
class SmearConfig(PeftConfig):
    """Configuration of expert routing blocks added to a frozen model.

    Each block holds ``num_experts`` bottleneck adapters (down-projection with bias, activation, up-projection without
    bias) and a router. The block transforms the output ``y`` of the sublayer it wraps::

        u  = input_norm(y)                       # identity for transformers, BatchNorm for CNN stages
        v  = pool(u)  (decoder blocks: pool(encoder final hidden states))
        p  = softmax(LN(v) @ LN_w(W))            # router; LN_w standardises every expert's weight vector
        y' = y + post_norm(expert(u; routing(p)))

    How ``routing(p)`` uses the experts is the ``routing`` method (SMEAR merges their parameters with ``p``).
    The defaults are those of the authors' code for T5-v1.1 on GLUE.

    ``expert_type`` chooses what an expert is: ``adapter`` (the paper's bottleneck adapter after a sublayer, above),
    or ``lora`` / ``ia3``: LoRA or (IA)³ experts on ``nn.Linear`` / ``Conv1D`` layers, configured as PEFT's
    `LoraConfig` / `IA3Config` (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``feedforward_modules``),
    one router per wrapped layer (see `smear_peft.expert_types` and docs/expert_types.md).

    Args:
        expert_type: ``adapter`` (default), ``lora`` or ``ia3``.
        r: LoRA rank of every expert (``expert_type="lora"``).
        lora_alpha: LoRA scaling numerator: updates are scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with
            ``use_rslora``).
        lora_dropout: Dropout on the LoRA experts' input, as PEFT.
        use_rslora: Rank-stabilised LoRA scaling ``lora_alpha / sqrt(r)``.
        feedforward_modules: ``expert_type="ia3"``: targets whose *input* is scaled (PEFT's IA3 FFN modules); the
            others get their output scaled. ``"preset"`` (the default): as PEFT's `IA3Config`, the feed-forward
            modules of PEFT's IA3 table for the model type (those among ``target_modules``; none for a model type
            without a table, where PEFT raises), resolved by ``get_peft_model`` and saved as a list. ``None``: as in
            earlier versions and the configs they saved, the preset's with preset ``target_modules``, none with
            explicit ones.
        num_experts: Number of experts per block (the paper uses 8 for GLUE, 6 for DomainNet).
        routing: Routing method, one of ``smear``, ``top_k``, ``st_gumbel``, ``reinforce``, ``tag``, ``hash``,
            ``monolithic``, ``ensemble``.
        expert_dropout: Training-only probability of dropping each expert's routing probability (then renormalised).
            Applies to learned routing methods; the paper uses 0.1 for ``smear`` and ``top_k``.
        reduction_factor: Bottleneck size = hidden size // reduction_factor (32 in the paper: 768 -> 24).
        bottleneck_size: Explicit bottleneck size; overrides ``reduction_factor``.
        activation: Nonlinearity between the projections (``swish`` in the authors' code).
        expert_init_std: Standard deviation of the normal init of every expert weight (biases start at zero).
        router_init_scale: Std of the router weight init and initial gain of the LayerNorm over expert weight vectors.
        causal_routing: Routing of decoder-only models (see docs/routing_sources.md). ``prompt`` (the default for causal
            LMs): each example is routed on the mean of each block's input over its prompt, kept for every later
            token (generate: the prompt it receives; training: the leading positions whose labels are -100, or an
            explicit ``routing_mask``). ``segment``: segment k of each sequence is routed on segment k-1 (Lory), so
            no position depends on a later token; segment 0 routes on an all-zero input. ``None``: ``prompt`` for
            models that generate text without an encoder, not used otherwise.
        segment_length: Tokens per segment of ``causal_routing="segment"``.
        pooling: How the router input is pooled over positions. ``masked_mean`` ignores padding (batch invariant,
            our default); ``mean`` is the authors' unmasked mean over the padded batch.
        post_norm: LayerNorm on the expert output before the residual add (on for transformers, as the authors).
            ``None`` takes the preset's choice.
        input_norm: ``batch_norm`` normalises the block input first (the authors' ResNet block), ``none`` does not.
            ``None`` takes the preset's choice.
        sublayers: Transformer sublayers that get a block: any of ``self_attention``, ``cross_attention``,
            ``feed_forward``.
        target_modules: Modules whose first output a block transforms. Filled from the preset of the model type when
            not given; required for models without a preset.
        exclude_modules: Modules never wrapped.
        layers_to_transform: Layer indices to wrap (all when ``None``).
        layers_pattern: Name of the layer list that ``layers_to_transform`` indexes (e.g. ``block``, ``layers``).
        train_layer_norms: Train the backbone's layer norms beside the adapters (the authors do for T5; ``None``:
            on for ``expert_type="adapter"``, off for LoRA / (IA)³ experts, as PEFT's LoRA / IA3). Adds the
            preset's layer-norm names to ``modules_to_save``.
        batch_norm_statistics: For backbones with BatchNorm: ``update`` lets the frozen backbone's running
            statistics track the training data (the authors) and saves them with the adapter; ``frozen`` keeps them
            as loaded (BatchNorm layers stay in eval mode while training).
        modules_to_save: Extra modules trained and saved in full (e.g. a new classification head).
        top_k: Experts used per example by ``top_k`` routing (1 in the paper).
        gumbel_temperature: Initial temperature of ``st_gumbel`` routing.
        gumbel_min_temperature: Floor of the annealed temperature.
        gumbel_anneal_rate: Rate r of ``tau = max(tau * exp(-r * step), min)`` applied every ``gumbel_anneal_every``
            steps (T5: 1e-6 every 5000 steps; ResNet: 1e-4 every 1000 steps).
        gumbel_anneal_every: Interval, in training steps, of the temperature update.
        gumbel_schedule: When each update takes effect, as in the authors' two loops: ``t5`` (their trainer: from the
            step before the k-th interval ends) or ``resnet`` (their DomainNet loop: from the step after). ``None``
            takes the preset's (ResNet: ``resnet``; others: ``t5``).
        reinforce_policy_weight: Weight of the REINFORCE policy-gradient term.
        reinforce_entropy_weight: Weight of the entropy term (added to the loss, as in the authors' code).
        reinforce_value_weight: Weight of the baseline's Huber regression term.
        num_tags: Number of distinct routing tags (``tag`` routing). Defaults to ``num_experts``.
        tag_names: Optional names of the tags, so string tags can be passed; their order gives the tag index.
        tag_to_expert: "Tag+" routing: maps a tag to an expert. A dict of ``{tag: expert}`` used by every block, or
            ``{"encoder": {...}, "decoder": {...}}`` to map differently per side (tags not listed use the expert of
            the same index). Keys may be tag names or indices; a value may be an expert index or a tag name, meaning
            that tag's expert (the paper's Tag+: ``{"encoder": {"rte": "mnli"}}``).
        hash_seed: Seed of ``hash`` routing.
        monolithic_params: ``compute`` gives ``monolithic`` routing one expert of the normal size ("1x compute");
            ``params`` gives one expert ``num_experts`` times wider ("1x params").
        init_weights: Initialise experts as the authors (``True``). ``False`` is only for tests of PEFT machinery.
        task_type: PEFT task type, as for any PEFT method: ``None`` (default) gives a plain `PeftModel`, which serves
            every model (forward, ``generate``, save / load); ``SEQ_2_SEQ_LM`` / ``CAUSAL_LM`` give PEFT's task classes
            (not for Whisper, whose inputs PEFT's seq2seq class does not pass on). ``"AUTO"`` (configs saved by
            smear-peft 0.1) is read as ``None``.
    """

    expert_type: str = field(default="adapter", metadata={"help": "Expert type: adapter, lora or ia3."})
    r: int = field(default=8, metadata={"help": "LoRA rank of each expert (expert_type='lora')."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA alpha (expert_type='lora')."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA experts' input."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale LoRA updates by lora_alpha / sqrt(r)."})
    feedforward_modules: Optional[Union[list[str], str]] = field(
        default=FEEDFORWARD_PRESET,
        metadata={"help": "expert_type='ia3': targets whose input (not output) is scaled ('preset': PEFT's table)."},
    )
    num_experts: int = field(default=8, metadata={"help": "Number of experts per routing block."})
    routing: str = field(default="smear", metadata={"help": f"Routing method: one of {', '.join(ROUTING_METHODS)}."})
    expert_dropout: float = field(default=0.0, metadata={"help": "Training-only expert dropout probability."})
    reduction_factor: int = field(default=32, metadata={"help": "Bottleneck = hidden size // reduction_factor."})
    bottleneck_size: Optional[int] = field(default=None, metadata={"help": "Explicit bottleneck size."})
    activation: str = field(default="swish", metadata={"help": "Activation between the projections."})
    expert_init_std: float = field(default=0.01, metadata={"help": "Std of the expert weight init."})
    router_init_scale: float = field(default=0.01, metadata={"help": "Router weight std and weight-norm gain."})
    causal_routing: Optional[Literal["prompt", "segment"]] = field(
        default=None, metadata={"help": "Decoder-only models: route on the prompt or causally by segments."}
    )
    segment_length: int = field(default=256, metadata={"help": "Tokens per segment (causal_routing='segment')."})
    pooling: Literal["masked_mean", "mean"] = field(default="masked_mean", metadata={"help": "Router input pooling."})
    post_norm: Optional[bool] = field(default=None, metadata={"help": "LayerNorm after the expert (preset default)."})
    input_norm: Optional[Literal["none", "batch_norm"]] = field(
        default=None, metadata={"help": "Normalisation of the block input (preset default)."}
    )
    sublayers: list[str] = field(default_factory=lambda: list(SUBLAYERS), metadata={"help": "Sublayers to wrap."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules never wrapped."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer list name."})
    train_layer_norms: Optional[bool] = field(default=None, metadata={"help": "Train the backbone's layer norms."})
    batch_norm_statistics: Literal["update", "frozen"] = field(
        default="update", metadata={"help": "Backbone BatchNorm running statistics while training."}
    )
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained in full."})
    top_k: int = field(default=1, metadata={"help": "Experts per example for top_k routing."})
    gumbel_temperature: float = field(default=10.0, metadata={"help": "Initial Gumbel-softmax temperature."})
    gumbel_min_temperature: float = field(default=0.5, metadata={"help": "Minimum Gumbel-softmax temperature."})
    gumbel_anneal_rate: float = field(default=1e-6, metadata={"help": "Temperature anneal rate."})
    gumbel_anneal_every: int = field(default=5000, metadata={"help": "Steps between temperature updates."})
    gumbel_schedule: Optional[Literal["t5", "resnet"]] = field(
        default=None, metadata={"help": "When an update takes effect: the authors' T5 trainer or ResNet loop (preset)."}
    )
    reinforce_policy_weight: float = field(default=1e-2, metadata={"help": "REINFORCE policy loss weight."})
    reinforce_entropy_weight: float = field(default=5e-4, metadata={"help": "REINFORCE entropy term weight."})
    reinforce_value_weight: float = field(default=1e-2, metadata={"help": "REINFORCE baseline loss weight."})
    num_tags: Optional[int] = field(default=None, metadata={"help": "Number of routing tags (tag routing)."})
    tag_names: Optional[list[str]] = field(default=None, metadata={"help": "Names of routing tags."})
    tag_to_expert: Optional[dict] = field(default=None, metadata={"help": "Tag+ mapping from tags to experts."})
    hash_seed: int = field(default=0, metadata={"help": "Seed of hash routing."})
    monolithic_params: Literal["compute", "params"] = field(
        default="compute", metadata={"help": "Monolithic baseline: 1x compute or 1x params."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Authors' initialisation."})

    def __post_init__(self) -> None:
        if self.task_type == LEGACY_AUTO_TASK_TYPE:
            self.task_type = None
        super().__post_init__()
        self.peft_type = _smear_peft_type()
        if self.train_layer_norms is None:
            self.train_layer_norms = self.expert_type == "adapter"
        if self.feedforward_modules == FEEDFORWARD_PRESET and self.expert_type != "ia3":
            self.feedforward_modules = None  # the default means nothing for other expert types (saved as null)
        for name in ("target_modules", "exclude_modules", "modules_to_save", "sublayers", "tag_names", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, list(value))
        if isinstance(self.tag_to_expert, dict):
            self.tag_to_expert = _normalise_tag_map(self.tag_to_expert)
        self.validate()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's ``save_pretrained``, plus the SMEAR section of the model card PEFT has just written there (see
        `smear_peft.hub`)."""
        super().save_pretrained(save_directory, **kwargs)
        from .hub import add_card_section

        add_card_section(save_directory, self)

    def validate(self) -> None:
        """Raise a `ValueError` that names the fix for any inconsistent field."""
        from .expert_types import EXPERT_TYPES

        if self.expert_type not in EXPERT_TYPES:
            _fail("expert_type", f"unknown expert type {self.expert_type!r}; choose one of {', '.join(EXPERT_TYPES)}.")
        _check_int("r", self.r, 1)
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}.")
        if self.expert_type != "adapter":
            if self.input_norm == "batch_norm" or self.post_norm:
                _fail("expert_type", f"{self.expert_type} experts change a Linear layer in place: input_norm and "
                      "post_norm apply to expert_type='adapter' only; leave them None.")
        if self.feedforward_modules is not None:
            if self.expert_type != "ia3":
                _fail("feedforward_modules", "applies to expert_type='ia3' only.")
            if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
                missing = [m for m in self.feedforward_modules if m not in self.target_modules]
                if missing:
                    _fail("feedforward_modules", f"{missing} are not in target_modules; feedforward_modules must be a "
                          "subset of target_modules (as in PEFT's IA3Config).")
        if self.routing not in ROUTING_METHODS:
            _fail("routing", f"unknown routing {self.routing!r}; choose one of {', '.join(ROUTING_METHODS)}.")
        _check_int("num_experts", self.num_experts, 1)
        if not 0.0 <= self.expert_dropout < 1.0:
            _fail("expert_dropout", f"must be in [0, 1), got {self.expert_dropout}.")
        _check_int("reduction_factor", self.reduction_factor, 1)
        _check_int("bottleneck_size", self.bottleneck_size, 1, optional=True)
        from .experts import ACTIVATIONS

        if self.activation not in ACTIVATIONS:
            _fail("activation", f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}.")
        if self.expert_init_std <= 0 or self.router_init_scale <= 0:
            _fail("expert_init_std", "expert_init_std and router_init_scale must be positive.")
        if self.causal_routing not in (None, "prompt", "segment"):
            _fail("causal_routing", f"must be None, 'prompt' or 'segment', got {self.causal_routing!r}.")
        _check_int("segment_length", self.segment_length, 1)
        if self.causal_routing is not None and self.pooling != "masked_mean":
            _fail("pooling", "causal routing always averages over the real tokens it may see; keep pooling='masked_mean'.")
        if self.pooling not in ("masked_mean", "mean"):
            _fail("pooling", f"must be 'masked_mean' or 'mean', got {self.pooling!r}.")
        if self.input_norm not in (None, "none", "batch_norm"):
            _fail("input_norm", f"must be None, 'none' or 'batch_norm', got {self.input_norm!r}.")
        unknown = [s for s in self.sublayers if s not in SUBLAYERS]
        if unknown or not self.sublayers:
            _fail("sublayers", f"must be a non-empty subset of {list(SUBLAYERS)}, got {self.sublayers!r}.")
        if self.batch_norm_statistics not in ("update", "frozen"):
            _fail("batch_norm_statistics", f"must be 'update' or 'frozen', got {self.batch_norm_statistics!r}.")
        _check_int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            _fail("top_k", f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}.")
        if not 0 < self.gumbel_min_temperature <= self.gumbel_temperature:
            _fail("gumbel_temperature", "need 0 < gumbel_min_temperature <= gumbel_temperature.")
        _check_int("gumbel_anneal_every", self.gumbel_anneal_every, 1)
        if self.gumbel_anneal_rate < 0:
            _fail("gumbel_anneal_rate", "need gumbel_anneal_rate >= 0 and gumbel_anneal_every >= 1.")
        if self.gumbel_schedule not in (None, "t5", "resnet"):
            _fail("gumbel_schedule", f"must be None, 't5' or 'resnet', got {self.gumbel_schedule!r}.")
        if self.monolithic_params not in ("compute", "params"):
            _fail("monolithic_params", f"must be 'compute' or 'params', got {self.monolithic_params!r}.")
        if self.tag_names is not None and len(set(self.tag_names)) != len(self.tag_names):
            _fail("tag_names", "names must be unique.")
        _check_int("num_tags", self.num_tags, 1, optional=True)
        if self.tag_names is not None and self.num_tags is not None and self.num_tags != len(self.tag_names):
            _fail("num_tags", f"is {self.num_tags} but tag_names lists {len(self.tag_names)} names; drop num_tags.")
        if self.routing == "tag":
            self._validate_tag_routing()
        check_layer_selection(self)

    @property
    def resolved_num_tags(self) -> int:
        """Number of distinct routing tags."""
        if self.tag_names is not None:
            return len(self.tag_names)
        return self.num_tags if self.num_tags is not None else self.num_experts

    def tag_index(self, tag: Union[int, str]) -> int:
        """Index of a tag given as an int or as one of ``tag_names``."""
        if isinstance(tag, str):
            if self.tag_names is None or tag not in self.tag_names:
                raise ValueError(
                    f"Unknown routing tag {tag!r}: string tags need SmearConfig(tag_names=[...]) listing it"
                    + (f" (known: {self.tag_names})." if self.tag_names else ".")
                )
            return self.tag_names.index(tag)
        return int(tag)

    def tag_expert_table(self, side: str) -> list[int]:
        """Expert used for each tag index by tag routing on one side (``encoder``, ``decoder`` or ``any``)."""
        table = list(range(self.resolved_num_tags))
        mapping = self.tag_to_expert or {}
        if set(mapping) <= {"encoder", "decoder"} and mapping:
            mapping = mapping.get(side, {}) if side in ("encoder", "decoder") else {}
        for tag, expert in mapping.items():
            table[self.tag_index(tag)] = self.tag_index(expert)
        return table

    def _validate_tag_routing(self) -> None:
        num_tags = self.resolved_num_tags
        mapping = self.tag_to_expert or {}
        sides = [mapping[s] for s in ("encoder", "decoder") if s in mapping] if set(mapping) <= {"encoder", "decoder"} and mapping else [mapping]
        for side_map in sides:
            if not isinstance(side_map, dict):
                _fail("tag_to_expert", "per-side values must be dicts of {tag: expert}.")
            for tag, expert in side_map.items():
                index = self.tag_index(tag)
                if not 0 <= index < num_tags:
                    _fail("tag_to_expert", f"tag {tag!r} is out of range for {num_tags} tags.")
                if not 0 <= self.tag_index(expert) < self.num_experts:
                    _fail("tag_to_expert", f"expert {expert} for tag {tag!r} is out of range for {self.num_experts} experts.")
        if self.tag_to_expert is None and num_tags > self.num_experts:
            _fail(
                "num_tags",
                f"tag routing with {num_tags} tags needs num_experts >= {num_tags} or a tag_to_expert mapping.",
            )
        for side in ("encoder", "decoder"):
            if any(e >= self.num_experts for e in self.tag_expert_table(side)):
                _fail("tag_to_expert", f"tags without a mapping use the expert of the same index, which needs "
                      f"num_experts >= {num_tags}; map every tag.")


def _smear_peft_type():
    """The ``PeftType.SMEAR`` enum member (added to PEFT's enum on first use), so ``config.peft_type.value`` works
    wherever PEFT uses it (model cards, error messages)."""
    from .registration import PEFT_TYPE_NAME, _add_peft_type_member

    return _add_peft_type_member(PEFT_TYPE_NAME)


def check_layer_selection(config: SmearConfig) -> None:
    """PEFT applies ``layers_to_transform`` / ``layers_pattern`` only to a list of ``target_modules``; with a regular
    expression it would silently wrap every match. Refuse that combination, as LoRA does."""
    if isinstance(config.target_modules, str):
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(config, name) is not None:
                _fail(
                    name,
                    f"cannot be used when target_modules is a regular expression ({config.target_modules!r}): PEFT "
                    "would ignore it and wrap every match. Pass target_modules as a list of module names, or select "
                    "the layers inside the regular expression.",
                )


def _normalise_tag_map(mapping: dict) -> dict:
    """JSON turns int keys into strings; turn digit strings back into ints so saved configs round-trip."""

    def key(k):
        return int(k) if isinstance(k, str) and k.isdigit() else k

    if set(mapping) <= {"encoder", "decoder"}:
        return {side: {key(k): key(v) for k, v in m.items()} for side, m in mapping.items()}
    return {key(k): key(v) for k, v in mapping.items()}
