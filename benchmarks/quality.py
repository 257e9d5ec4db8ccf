"""Quality of every routing method on two small offline benchmarks (a Table-1-style table, mean ± std over seeds).

Benchmarks (both offline, CPU, frozen pretrained backbones; see ``docs/results.md`` for the full description):

* ``digits``: the embedded six-domain handwritten digits (`smear_peft.data.digits`). A small transformers ResNet
  (basic blocks, widths 16-32-64-128) is pretrained on the ``original`` rendering only, cached and frozen; each method
  then trains SMEAR blocks (6 experts, one per domain for tag routing) and a new classifier head on all six domains.
  Metric: test accuracy per domain and its mean.
* ``text``: eight prompted symbol-sequence tasks (`text_tasks.py`) for a tiny T5 (d_model 64, 2+2 layers) pretrained
  with a denoising objective on structured random symbol sequences, cached and frozen. Each method trains SMEAR blocks
  (8 experts, one per task for tag routing) plus T5's layer norms. Metric: exact match of greedy generation per task
  and its mean.
* ``text_causal`` (not in the default run): the same eight tasks in causal-LM form (``prompt x SEP answer EOS``,
  labels -100 on the prompt) for a tiny Llama-shaped decoder (hidden 64, 4 layers) pretrained here with a
  language-model objective on the text benchmark's denoising pairs, cached and frozen. Experts are LoRAs of rank r0 = 4
  on q/k/v/o/gate/up/down: SMEAR and tag routing over 8 LoRA experts against PEFT's LoRA at rank r0 (1x compute) and
  8·r0 (1x params) and PEFT's X-LoRA over 8 rank-r0 LoRA experts (trained with its classifier). Metric: exact match of
  greedy ``generate`` on the prompt.

Methods: smear, top_k, st_gumbel, reinforce, tag, tag_plus (Tag+), hash, monolithic (1x compute and 1x params),
ensemble; on ``text_causal`` by default smear, tag, lora_1x_compute, lora_1x_params, xlora. Run::

    python benchmarks/quality.py                 # full run: both benchmarks, every method, seeds 0 1 2
    python benchmarks/quality.py --quick         # a few steps of everything (smoke test, results not written)
    python benchmarks/quality.py --benchmarks text --methods smear tag --seeds 0
    python benchmarks/quality.py --benchmarks text_causal       # the causal LoRA-expert benchmark (~45 min, 1 core)
    # or split its methods over two processes that merge into one JSON:
    python benchmarks/quality.py --benchmarks text_causal --methods xlora lora_1x_compute --append &
    python benchmarks/quality.py --benchmarks text_causal --methods smear tag lora_1x_params --append &

The committed results ran the two benchmarks as two processes side by side (``--benchmarks text`` and
``--benchmarks digits``), ~27 min of wall time on a busy 2-core CPU. ST-Gumbel uses the authors' compounding
temperature schedule with a rate chosen so that tau goes from 10 to 0.5 at 70% of this short run
(`Settings.gumbel_anneal_rate`); REINFORCE adds `smear_peft.losses.reinforce_loss` to the task loss.

Writes ``benchmarks/results/quality_<benchmark>.json`` and ``benchmarks/results/quality.md`` (the table, from every
JSON present). Pretrained backbones are cached under ``$SMEAR_PEFT_CACHE`` (default ``~/.cache/smear_peft/benchmarks``)
keyed by their configuration, so reruns skip pretraining; the adapters of ``--save-adapters-seed`` (default seed 0)
are saved there too, for ``benchmarks/heatmaps.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import smear_peft  # noqa: E402,F401  (registers the SMEAR PEFT method)
from peft import get_peft_model  # noqa: E402
from smear_peft import SmearConfig  # noqa: E402
from smear_peft.losses import (  # noqa: E402
    has_reinforce_terms,
    per_example_classification_loss,
    per_example_seq2seq_loss,
    reinforce_loss,
)

import text_tasks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
CACHE_DIR = Path(os.environ.get("SMEAR_PEFT_CACHE", Path.home() / ".cache" / "smear_peft" / "benchmarks"))

#: Method name -> SmearConfig fields (benchmark-specific fields such as Tag+'s mapping are added per benchmark).
METHODS: dict[str, dict[str, Any]] = {
    "smear": dict(routing="smear", expert_dropout=0.1),
    "top_k": dict(routing="top_k", expert_dropout=0.1),
    "st_gumbel": dict(routing="st_gumbel"),
    "reinforce": dict(routing="reinforce"),
    "tag": dict(routing="tag"),
    "tag_plus": dict(routing="tag"),
    "hash": dict(routing="hash"),
    "monolithic_1x_compute": dict(routing="monolithic", monolithic_params="compute"),
    "monolithic_1x_params": dict(routing="monolithic", monolithic_params="params"),
    "ensemble": dict(routing="ensemble"),
    # PEFT baselines (text_causal only): not SmearConfigs, built by `build_peft_baseline`
    "lora_1x_compute": {},
    "lora_1x_params": {},
    "xlora": {},
}
#: Methods that are plain PEFT models rather than SMEAR models.
PEFT_BASELINES = ("lora_1x_compute", "lora_1x_params", "xlora")
METHOD_LABELS = {
    "smear": "SMEAR",
    "top_k": "Top-k (k=1)",
    "st_gumbel": "ST-Gumbel",
    "reinforce": "REINFORCE",
    "tag": "Tag",
    "tag_plus": "Tag+",
    "hash": "Hash",
    "monolithic_1x_compute": "Monolithic (1x compute)",
    "monolithic_1x_params": "Monolithic (1x params)",
    "ensemble": "Ensemble (N x compute)",
    "lora_1x_compute": "LoRA r=r0 (1x compute)",
    "lora_1x_params": "LoRA r=N·r0 (1x params)",
    "xlora": "X-LoRA (N experts)",
}


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark settings
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything that defines one benchmark's runs (saved in the results JSON)."""

    benchmark: str
    num_experts: int
    bottleneck_size: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    tag_plus: dict
    gumbel_anneal_every: int = 10
    expert_type: str = "adapter"
    lora_rank: int = 0  # r0 of LoRA experts (expert_type="lora"); lora_alpha = 2 * rank for every LoRA
    gumbel_reach_min_at: float = 0.7  # fraction of training at which ST-Gumbel's temperature reaches its floor
    backbone: dict = field(default_factory=dict)
    pretrain: dict = field(default_factory=dict)
    notes: str = ""

    def gumbel_anneal_rate(self) -> float:
        """Rate of the authors' compounding schedule that takes tau from 10 to 0.5 at ``gumbel_reach_min_at``."""
        updates = max(1, int(self.gumbel_reach_min_at * self.steps) // self.gumbel_anneal_every)
        return 2 * math.log(10.0 / 0.5) / (self.gumbel_anneal_every * updates * (updates + 1))


def digits_settings(quick: bool) -> Settings:
    return Settings(
        benchmark="digits",
        num_experts=6,
        bottleneck_size=8,
        steps=20 if quick else 600,
        batch_size=64,
        learning_rate=3e-3,
        warmup_steps=0,
        tag_plus={"noisy": "original"},
        backbone=dict(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16,
                      num_labels=10, image_size=32),
        pretrain=dict(steps=600, batch_size=64, learning_rate=3e-3, seed=0),
        notes="Adam (authors: Adam 1e-3, 100k steps); classifier head re-initialised and trained; BatchNorm "
              "statistics updated (authors); last-step weights evaluated (authors: best validation checkpoint).",
    )


def text_settings(quick: bool) -> Settings:
    return Settings(
        benchmark="text",
        num_experts=8,
        bottleneck_size=8,
        steps=20 if quick else 300,
        batch_size=64,
        learning_rate=3e-3,
        warmup_steps=20,
        tag_plus=dict(text_tasks.TEXT_TAG_PLUS),
        backbone=dict(vocab_size=text_tasks.VOCAB_SIZE, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                      num_decoder_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
                      relative_attention_max_distance=32),
        pretrain=dict(steps=1200, batch_size=64, learning_rate=3e-3, seed=0),
        notes="AdamW, constant LR after warmup, grad clip 1.0 (authors: AdamW 3e-4, 2k warmup, 600k steps); mean "
              "token loss, no label smoothing (authors: summed, 0.1); greedy decoding; backbone frozen except its "
              "layer norms (authors).",
    )


def text_causal_settings(quick: bool) -> Settings:
    return Settings(
        benchmark="text_causal",
        num_experts=8,
        bottleneck_size=0,
        expert_type="lora",
        lora_rank=4,
        steps=20 if quick else 600,
        batch_size=64,
        learning_rate=3e-3,
        warmup_steps=20,
        tag_plus=dict(text_tasks.TEXT_TAG_PLUS),
        backbone=dict(vocab_size=text_tasks.CAUSAL_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
        pretrain=dict(steps=1500, batch_size=64, learning_rate=3e-3, seed=0),
        notes="Causal-LM form of the text benchmark: prompt x SEP answer EOS, labels -100 on the prompt (SMEAR routes "
              "on it); LoRA experts (r0, lora_alpha 2*r) on q/k/v/o/gate/up/down of every layer; backbone fully "
              "frozen; AdamW, constant LR after warmup, grad clip 1.0; mean token loss; greedy decoding.",
    )


SETTINGS = {"digits": digits_settings, "text": text_settings, "text_causal": text_causal_settings}
CAUSAL = ("text_causal",)
_SMEAR_METHODS = [m for m in METHODS if m not in PEFT_BASELINES]
#: Methods run by default: every routing method on digits / text; on text_causal, the LoRA-expert comparison of
#: issue 12 (SMEAR and tag routing over LoRA experts, PEFT LoRA at 1x compute and 1x params, PEFT X-LoRA).
DEFAULT_METHODS = {"digits": _SMEAR_METHODS, "text": _SMEAR_METHODS,
                   "text_causal": ["smear", "tag", "lora_1x_compute", "lora_1x_params", "xlora"]}


def _key(settings: Settings) -> str:
    blob = json.dumps({"backbone": settings.backbone, "pretrain": settings.pretrain, "benchmark": settings.benchmark,
                       "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def backbone_path(settings: Settings) -> Path:
    return CACHE_DIR / f"{settings.benchmark}_backbone_{_key(settings)}.pt"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Backbones (pretrained once, cached by configuration)
# ---------------------------------------------------------------------------------------------------------------------
def build_digits_backbone(settings: Settings):
    import transformers

    cfg = {k: v for k, v in settings.backbone.items() if k != "image_size"}
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_channels=3, **cfg))


def build_text_backbone(settings: Settings):
    import transformers

    config = transformers.T5Config(
        **settings.backbone, dropout_rate=0.0, decoder_start_token_id=text_tasks.PAD, pad_token_id=text_tasks.PAD,
        eos_token_id=text_tasks.EOS, tie_word_embeddings=False,
    )
    return transformers.T5ForConditionalGeneration(config)


def build_causal_backbone(settings: Settings):
    import transformers

    config = transformers.LlamaConfig(
        **settings.backbone, pad_token_id=text_tasks.PAD, bos_token_id=None, eos_token_id=text_tasks.EOS,
        tie_word_embeddings=False, attention_dropout=0.0,
    )
    return transformers.LlamaForCausalLM(config)


def _builder(settings: Settings):
    return {"digits": build_digits_backbone, "text": build_text_backbone,
            "text_causal": build_causal_backbone}[settings.benchmark]


def pretrained_backbone(settings: Settings, log: Callable[[str], None] = _log):
    """The frozen backbone of a benchmark: loaded from the cache, or pretrained (and cached) first."""
    build = _builder(settings)
    path = backbone_path(settings)
    if path.exists():
        model = build(settings)
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval()
    p = settings.pretrain
    torch.manual_seed(p["seed"])
    model = build(settings).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["learning_rate"])
    start = time.time()
    if settings.benchmark == "digits":
        from smear_peft.data.digits import load_digit_pretraining_splits

        splits = load_digit_pretraining_splits(image_size=settings.backbone["image_size"])
        x, y = splits.train.pixel_values, splits.train.labels
        generator = torch.Generator().manual_seed(p["seed"])
        for step in range(p["steps"]):
            idx = torch.randint(len(y), (p["batch_size"],), generator=generator)
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            xt, yt = splits.test.pixel_values, splits.test.labels
            accuracy = (model(pixel_values=xt).logits.argmax(-1) == yt).float().mean().item()
        log(f"pretrained digits backbone ({p['steps']} steps, {time.time() - start:.0f}s): original-domain test "
            f"accuracy {accuracy:.3f}")
    else:
        rng = random.Random(p["seed"])
        make_batch = text_tasks.causal_lm_batch if settings.benchmark in CAUSAL else text_tasks.denoising_batch
        for step in range(p["steps"]):
            loss = model(**make_batch(rng, p["batch_size"])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        log(f"pretrained {settings.benchmark} backbone ({p['steps']} steps, {time.time() - start:.0f}s): final "
            f"{'language-model' if settings.benchmark in CAUSAL else 'denoising'} loss {loss.item():.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    """Tensors of a benchmark's train and test sets (padded once; batches are index selections)."""

    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    group_names: tuple[str, ...]


def load_data(settings: Settings) -> Data:
    if settings.benchmark == "digits":
        from smear_peft.data.digits import DIGIT_DOMAINS, load_digit_domains

        splits = load_digit_domains(image_size=settings.backbone["image_size"])

        def tensors(ds):
            return {"pixel_values": ds.pixel_values, "labels": ds.labels, "routing_tags": ds.routing_tags}

        return Data(tensors(splits.train), tensors(splits.test), tuple(DIGIT_DOMAINS))
    splits = text_tasks.make_text_splits(seed=0)
    collate = text_tasks.causal_collate if settings.benchmark in CAUSAL else text_tasks.collate
    return Data(
        collate(splits["train"], range(len(splits["train"]))),
        collate(splits["test"], range(len(splits["test"]))),
        text_tasks.TEXT_TASK_NAMES,
    )


def _select(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in batch.items()}


def _trim(batch: dict[str, torch.Tensor], causal: bool = False) -> dict[str, torch.Tensor]:
    """Drop all-padding columns of a text batch (fixed-width tensors are padded to the longest example overall).
    ``causal``: labels are aligned with ``input_ids`` (the causal form) and are cut to the same width."""
    if "input_ids" not in batch:
        return batch
    width = int(batch["attention_mask"].sum(1).max())
    label_width = width if causal else int(batch["labels"].ne(-100).sum(1).max())
    out = dict(batch)
    out["input_ids"], out["attention_mask"] = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
    out["labels"] = batch["labels"][:, :label_width]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One run: adapt, train, evaluate
# ---------------------------------------------------------------------------------------------------------------------
def smear_config(settings: Settings, method: str) -> SmearConfig:
    fields = dict(METHODS[method])
    fields.update(num_experts=settings.num_experts, tag_names=list(settings_group_names(settings)))
    if settings.expert_type == "lora":
        fields.update(expert_type="lora", r=settings.lora_rank, lora_alpha=2 * settings.lora_rank,
                      task_type="CAUSAL_LM", target_modules=list(LORA_TARGETS))
    else:
        fields["bottleneck_size"] = settings.bottleneck_size
    if method == "tag_plus":
        fields["tag_to_expert"] = dict(settings.tag_plus)
    if method == "st_gumbel":
        fields.update(gumbel_anneal_every=settings.gumbel_anneal_every, gumbel_anneal_rate=settings.gumbel_anneal_rate())
    if settings.benchmark == "digits":
        fields["modules_to_save"] = ["classifier"]
    return SmearConfig(**fields)


def settings_group_names(settings: Settings) -> tuple[str, ...]:
    if settings.benchmark == "digits":
        from smear_peft.data.digits import DIGIT_DOMAINS

        return tuple(DIGIT_DOMAINS)
    return text_tasks.TEXT_TASK_NAMES


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_peft_baseline(settings: Settings, method: str, seed: int, base, workdir: Path):
    """PEFT's LoRA (rank r0 or N·r0) or X-LoRA over N LoRA experts of rank r0, on the same targets as SMEAR-LoRA.

    X-LoRA loads its experts from saved adapter folders: N rank-r0 LoRAs with PEFT's default initialisation (A random,
    B zero) are saved to ``workdir`` first, and trained together with X-LoRA's classifier
    (``use_trainable_adapters=True``), so X-LoRA starts from the base model exactly like every other method."""
    from peft import LoraConfig, TaskType, XLoraConfig

    r0, n = settings.lora_rank, settings.num_experts
    if method in ("lora_1x_compute", "lora_1x_params"):
        r = r0 if method == "lora_1x_compute" else n * r0
        return get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=2 * r,
                                               target_modules=list(LORA_TARGETS)))
    if method != "xlora":
        raise ValueError(method)
    import copy

    adapters = {}
    for index in range(n):
        expert = get_peft_model(copy.deepcopy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=r0, lora_alpha=2 * r0,
                                                                target_modules=list(LORA_TARGETS)))
        path = workdir / f"expert_{index}"
        expert.save_pretrained(str(path))
        adapters[str(index)] = str(path)
    base.config.use_cache = False  # X-LoRA requires it
    config = XLoraConfig(task_type=TaskType.CAUSAL_LM, hidden_size=base.config.hidden_size, adapters=adapters,
                         xlora_depth=1, use_trainable_adapters=True)
    return get_peft_model(base, config)


def build_peft_model(settings: Settings, method: str, seed: int, backbone_state: dict, workdir: Optional[Path] = None):
    base = _builder(settings)(settings)
    base.load_state_dict(backbone_state)
    torch.manual_seed(seed)
    if settings.benchmark == "digits":  # a new head for the six-domain task
        base.classifier[-1].reset_parameters()
    if method in PEFT_BASELINES:
        return build_peft_baseline(settings, method, seed, base, workdir)
    return get_peft_model(base, smear_config(settings, method))


def _forward_loss(model, settings: Settings, batch: dict[str, torch.Tensor], keys: torch.Tensor, method: str = ""):
    tags = batch["routing_tags"]
    inputs = {k: v for k, v in batch.items() if k != "routing_tags"}
    if method in PEFT_BASELINES:
        return model(**inputs).loss
    out = model(**inputs, routing_tags=tags, routing_keys=keys)
    loss = out.loss
    if has_reinforce_terms(out):
        if settings.benchmark == "digits":
            per_example = per_example_classification_loss(out.logits, batch["labels"])
        else:
            per_example = per_example_seq2seq_loss(out.logits, batch["labels"])
        loss = loss + reinforce_loss(out, per_example)
    return loss


def _causal_prompts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Left-padded prompts (the -100 positions of each causal example) and the answers to generate."""
    prompts, answers = [], []
    for ids, mask, labels in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()):
        real = [i for i, m in enumerate(mask) if m]
        prompts.append([ids[i] for i in real if labels[i] == -100])
        answers.append([labels[i] for i in real if labels[i] != -100])
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[text_tasks.PAD] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return input_ids, mask, answers


@torch.no_grad()
def evaluate(model, settings: Settings, data: Data, batch_size: int = 200, method: str = "") -> dict[str, float]:
    """Per-group accuracy (digits: classification; text: exact match of greedy generation) and their mean."""
    model.eval()
    test = data.test
    n = len(test["routing_tags"])
    correct = torch.zeros(n, dtype=torch.bool)
    causal = settings.benchmark in CAUSAL
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        batch = _trim(_select(test, idx), causal=causal)
        keys = 1_000_000 + idx
        if causal:
            prompt_ids, prompt_mask, answers = _causal_prompts(batch)
            extra = {} if method in PEFT_BASELINES else {"routing_tags": batch["routing_tags"], "routing_keys": keys}
            generated = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max(len(a) for a in answers),
                num_beams=1, do_sample=False, eos_token_id=text_tasks.EOS, pad_token_id=text_tasks.PAD,
                use_cache=method != "xlora", **extra,  # X-LoRA cannot use the KV cache
            )[:, prompt_ids.shape[1]:]
            for row, i in enumerate(idx.tolist()):
                produced = generated[row].tolist()
                produced = produced[: produced.index(text_tasks.EOS) + 1] if text_tasks.EOS in produced else produced
                correct[i] = produced == answers[row]
        elif settings.benchmark == "digits":
            logits = model(pixel_values=batch["pixel_values"], routing_tags=batch["routing_tags"], routing_keys=keys).logits
            correct[idx] = logits.argmax(-1) == batch["labels"]
        else:
            labels = batch["labels"]
            generated = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], routing_tags=batch["routing_tags"],
                routing_keys=keys, max_new_tokens=labels.shape[1], num_beams=1, do_sample=False,
            )[:, 1:]  # drop the decoder start token
            for row, i in enumerate(idx.tolist()):
                target = labels[row][labels[row] != -100].tolist()
                produced = generated[row].tolist()
                produced = produced[: produced.index(text_tasks.EOS) + 1] if text_tasks.EOS in produced else produced
                correct[i] = produced == target
    tags = test["routing_tags"]
    per_group = {name: correct[tags == g].float().mean().item() * 100 for g, name in enumerate(data.group_names)}
    per_group["average"] = sum(per_group[name] for name in data.group_names) / len(data.group_names)
    return per_group


def run_one(settings: Settings, method: str, seed: int, data: Data, backbone_state: dict,
            save_dir: Optional[Path] = None) -> dict[str, Any]:
    import tempfile

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="smear_quality_") as workdir:  # X-LoRA's expert folders
        model = build_peft_model(settings, method, seed, backbone_state, Path(workdir))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.Adam if settings.benchmark == "digits" else torch.optim.AdamW)(parameters, lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
    )
    generator = torch.Generator().manual_seed(seed)
    n = len(data.train["routing_tags"])
    model.train()
    losses = []
    causal = settings.benchmark in CAUSAL
    for step in range(settings.steps):
        if method not in PEFT_BASELINES:
            model.base_model.set_training_step(step)
        idx = torch.randint(n, (settings.batch_size,), generator=generator)  # examples-proportional mixing
        loss = _forward_loss(model, settings, _trim(_select(data.train, idx), causal=causal), idx, method)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    train_seconds = time.time() - start
    scores = evaluate(model, settings, data, method=method)
    if save_dir is not None and method not in PEFT_BASELINES:  # saved for heatmaps.py: SMEAR models only
        save_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(save_dir)
        (save_dir / "benchmark.json").write_text(json.dumps({"benchmark": settings.benchmark, "method": method,
                                                             "seed": seed, "backbone": str(backbone_path(settings))}))
    return {
        "method": method,
        "seed": seed,
        "scores": scores,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "trainable_parameters": trainable,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - start, 1),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------
def aggregate(runs: list[dict], group_names: tuple[str, ...]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> column -> (mean, std over seeds)."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {}
        for column in (*group_names, "average"):
            values = [r["scores"][column] for r in mine]
            row[column] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        table[method] = row
    return table


def _fmt(mean_std: tuple[float, float]) -> str:
    return f"{mean_std[0]:.1f} ± {mean_std[1]:.1f}"


def markdown(results: dict[str, dict]) -> str:
    """The summary table (one column per benchmark) and one detailed table per benchmark."""
    lines = ["<!-- generated by benchmarks/quality.py; do not edit by hand -->", ""]
    tables = {b: aggregate(r["runs"], tuple(r["group_names"])) for b, r in results.items()}
    order = [m for m in METHODS if any(m in t for t in tables.values())]
    benchmarks = list(results)
    header = "| Method | " + " | ".join(f"{b} (avg)" for b in benchmarks) + " | trainable params (" + \
        ", ".join(benchmarks) + ") |"
    lines += [header, "|" + "---|" * (len(benchmarks) + 2)]
    for method in order:
        cells = [(_fmt(tables[b][method]["average"]) if method in tables[b] else "–") for b in benchmarks]
        params = []
        for b in benchmarks:
            run = next((r for r in results[b]["runs"] if r["method"] == method), None)
            params.append(f"{run['trainable_parameters']:,}" if run else "–")
        best = [max(t[m]["average"][0] for m in t) for t in tables.values()]
        cells = [f"**{c}**" if method in tables[b] and tables[b][method]["average"][0] == best[i] else c
                 for i, (b, c) in enumerate(zip(benchmarks, cells))]
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " | " + ", ".join(params) + " |")
    for b in benchmarks:
        groups = results[b]["group_names"]
        seeds = sorted({r["seed"] for r in results[b]["runs"]})
        lines += ["", f"**{b}** (test accuracy %, mean ± std over seeds {seeds}):", "",
                  "| Method | " + " | ".join(groups) + " | average |", "|" + "---|" * (len(groups) + 2)]
        for method in order:
            if method in tables[b]:
                row = tables[b][method]
                lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(_fmt(row[g]) for g in (*groups, "average")) + " |")
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
            "platform": platform.platform()}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", nargs="+", default=["digits", "text"], choices=sorted(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="default: every method of the benchmark (DEFAULT_METHODS)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a few training steps; nothing written to results/")
    parser.add_argument("--steps", type=int, default=None, help="override the benchmark's training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--append", action="store_true",
                        help="merge these runs into an existing results JSON of the same settings (replacing equal "
                             "method/seed pairs) instead of overwriting it: lets processes split one benchmark's methods")
    parser.add_argument("--save-adapters-seed", type=int, default=0, help="save this seed's adapters (-1: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    for benchmark in args.benchmarks:
        settings = SETTINGS[benchmark](args.quick)
        if args.steps is not None:
            settings.steps = args.steps
        begin = time.time()
        backbone = pretrained_backbone(settings)
        backbone_state = {k: v.clone() for k, v in backbone.state_dict().items()}
        pretrain_seconds = time.time() - begin
        data = load_data(settings)
        runs = []
        for method in args.methods or DEFAULT_METHODS[benchmark]:
            if method in PEFT_BASELINES and benchmark not in CAUSAL:
                parser.error(f"{method} is a PEFT baseline of the causal benchmark only")
            for seed in args.seeds:
                save = None
                if seed == args.save_adapters_seed and not args.quick:
                    save = CACHE_DIR / "adapters" / benchmark / method
                result = run_one(settings, method, seed, data, backbone_state, save)
                runs.append(result)
                _log(f"{benchmark} {method} seed {seed}: average {result['scores']['average']:.1f} "
                     f"({result['total_seconds']:.0f}s; " + ", ".join(f"{k} {v:.0f}" for k, v in result["scores"].items()
                                                                   if k != "average") + ")")
        payload = {
            "benchmark": benchmark,
            "group_names": list(data.group_names),
            "settings": asdict(replace(settings)) | {"gumbel_anneal_rate": settings.gumbel_anneal_rate()},
            "seeds": args.seeds,
            "runs": runs,
            "table": {m: {c: list(v) for c, v in row.items()} for m, row in aggregate(runs, data.group_names).items()},
            "machine": machine(),
            "backbone_seconds": round(pretrain_seconds, 1),
            "wall_seconds": round(time.time() - begin, 1),
            "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        if args.quick:
            print(markdown({benchmark: payload}))
            continue
        args.output_dir.mkdir(parents=True, exist_ok=True)
        if args.append:
            payload = _append_to_results(args.output_dir / f"quality_{benchmark}.json", payload)
        else:
            (args.output_dir / f"quality_{benchmark}.json").write_text(json.dumps(payload, indent=1) + "\n")
        _log(f"{benchmark}: wrote {args.output_dir / f'quality_{benchmark}.json'} ({payload['wall_seconds']:.0f}s)")
    if not args.quick:
        write_table(args.output_dir)


def _append_to_results(path: Path, payload: dict) -> dict:
    """Merge ``payload``'s runs into the results JSON at ``path`` (under a file lock, so processes running different
    methods of one benchmark side by side can each add theirs); every process is listed under ``parts``."""
    import fcntl

    part = {k: payload[k] for k in ("command", "seeds", "wall_seconds", "backbone_seconds", "machine")}
    part["methods"] = list(dict.fromkeys(r["method"] for r in payload["runs"]))
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = dict(payload, parts=[part])
        if path.exists():
            old = json.loads(path.read_text())
            if old["settings"] != payload["settings"]:
                raise SystemExit(f"{path} holds runs of other settings; rerun without --append to overwrite it")
            new_keys = {(r["method"], r["seed"]) for r in payload["runs"]}
            runs = [r for r in old["runs"] if (r["method"], r["seed"]) not in new_keys] + payload["runs"]
            order = list(METHODS)
            runs.sort(key=lambda r: (order.index(r["method"]), r["seed"]))
            merged.update(
                runs=runs, seeds=sorted({r["seed"] for r in runs}), parts=old.get("parts", []) + [part],
                table={m: {c: list(v) for c, v in row.items()}
                       for m, row in aggregate(runs, tuple(payload["group_names"])).items()},
                wall_seconds=max([p["wall_seconds"] for p in old.get("parts", [])] + [payload["wall_seconds"]]),
            )
        path.write_text(json.dumps(merged, indent=1) + "\n")
        fcntl.flock(lock, fcntl.LOCK_UN)
    return merged


def write_table(output_dir: Path = RESULTS_DIR) -> None:
    results = {}
    for name in ("digits", "text", "text_causal"):
        path = output_dir / f"quality_{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    if results:
        (output_dir / "quality.md").write_text(markdown(results))
        _log(f"wrote {output_dir / 'quality.md'}")


if __name__ == "__main__":
    main()
