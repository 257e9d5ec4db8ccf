#!/usr/bin/env python
"""Throughput, FLOPs and peak memory of routed expert adapters (SMEAR and its baselines), with PEFT's Poly and X-LoRA.

What is measured (all models are built from configs with random weights; nothing is downloaded):

* **t5**: a T5-v1.1-shaped encoder-decoder (``--size paper``: T5-v1.1-base, 12+12 layers, 60 routing blocks; the
  default ``small`` keeps the base *width* (d_model 768, d_ff 2048, 12 heads, vocab 32128) with 4+4 layers, 20 blocks,
  and shorter inputs). 8 experts with bottleneck 24. Tasks: teacher-forced inference (forward with labels), one
  training step (forward, backward, AdamW step), and greedy generation of GLUE-length answers (a fixed number of new
  tokens for every method). Methods: ``monolithic`` (one adapter: the "1x compute" baseline every ratio is relative to),
  ``tag``, ``top_k``, ``smear``, ``ensemble``, PEFT ``lora`` (one plain LoRA of rank 24 on the sublayers' output
  projections ``o``/``wo``: the same 20 / 60 places as the routing blocks) and PEFT ``poly`` (8 LoRA skills of rank 24,
  per-task routing on the same projections). Generation also runs ``smear`` and ``top_k`` with the decode-time cache
  switched off (``*_nocache``), which shows what the cache saves.
* **resnet**: ``ResNetForImageClassification(ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
  hidden_sizes=[64, 128, 256, 512]))`` with the authors' 8 blocks (smear-peft's ``resnet`` preset), 6 experts (the
  DomainNet setting), images of 112x112 (``small``) or 224x224 (``paper``), 345 classes. Inference and training step.
* **causal**: PEFT's X-LoRA only supports decoder-only LMs nested like Llama (it loads its LoRA experts under
  ``model.model.*`` keys and routes on ``outputs.hidden_states``), so SMEAR, monolithic, LoRA, Poly and X-LoRA (8 LoRA
  experts saved to a temporary directory first, as X-LoRA requires) are also compared side by side on one Llama-shaped
  model with the T5's width (explicit ``target_modules=["o_proj", "down_proj"]`` for every method). Inference and
  training step.
* **scaling**: inference throughput of ``smear``, ``top_k`` and ``ensemble`` against monolithic for
  N in {1, 2, 4, 8, 16, 32} experts, on the t5 and resnet models.

Timing. Configurations are interleaved (A B C A B C ...; the order rotates every repeat) so that noise from other
processes hits all of them alike; each is warmed up first, and a throughput is ``batch / median time per call``.
On CPU the default clock is this process's CPU time (``time.process_time``) with one intra-op thread: on a shared
machine other processes' load inflates wall-clock time far more than CPU time, and with one thread CPU time equals wall
time on an idle machine. ``--clock wall`` uses wall-clock time instead; both are stored. On CUDA the clock is wall
time with ``torch.cuda.synchronize``. Every ratio is ``throughput(method) / throughput(monolithic)``; the JSON also
holds every raw sample and the interquartile range of the per-repeat paired ratios.

FLOPs are counted once per configuration with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
convolutions and attention; element-wise ops are not counted), and the FLOP-predicted throughput ratio
``flops(monolithic) / flops(method)`` is printed next to the measured one. Peak memory is measured in a separate,
untimed call: on CPU, the model's parameters, buffers and optimizer state plus the peak of the tensor storages the
call allocates (activations, temporaries, gradients; tracked by a small dispatch mode, `PeakMemory`); on CUDA,
``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/speed.py                                  # small sizes; minutes on 2 CPU cores
    python benchmarks/speed.py --size paper --device cuda       # the paper's sizes (T5-v1.1-base, batch 128, 224px)
    python benchmarks/speed.py --only t5 resnet --repeats 5     # a subset

Writes ``benchmarks/results/speed_<size>.json`` and ``docs/figures/speed_<size>.png`` (``--no-plot`` skips the
figure) and prints the tables of ratios.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import peft
import transformers
from peft import LoraConfig, PolyConfig, TaskType, XLoraConfig, get_peft_model

import smear_peft  # registers the SMEAR PEFT type
from smear_peft import SmearConfig
from smear_peft.architectures import find_preset

ROUTING_METHODS = ("monolithic", "tag", "top_k", "smear", "ensemble")
SCALING_EXPERTS = (1, 2, 4, 8, 16, 32)
SCALING_METHODS = ("smear", "top_k", "ensemble")
SECTIONS = ("t5", "resnet", "causal", "scaling")

#: Sizes. ``small`` finishes in minutes on 2 CPU cores; ``paper`` is the authors' setting (run it on a GPU).
SIZES = {
    "small": {
        "t5": dict(layers=4, batch=8, source_len=64, answer_len=6),
        "resnet": dict(image=112, batch=8),
        "causal": dict(layers=4, batch=8, seq_len=64),
        "repeats": 7,
    },
    "paper": {
        "t5": dict(layers=12, batch=128, source_len=128, answer_len=6),
        "resnet": dict(image=224, batch=128),
        "causal": dict(layers=12, batch=128, seq_len=128),
        "repeats": 10,
    },
}
T5_EXPERTS, T5_BOTTLENECK = 8, 24
RESNET_EXPERTS = 6
#: Expert dropout of the authors' README for the methods that use it (training only).
EXPERT_DROPOUT = {"smear": 0.1, "top_k": 0.1}


# ---------------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------------------------
def _register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels only; count the CPU flash-attention kernel the same way."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    for op, formula in (
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), fc.sdpa_flop),
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), fc.sdpa_backward_flop),
    ):
        if op is not None and op not in fc.flop_registry:
            fc.register_flop_formula(op)(formula.__wrapped__ if hasattr(formula, "__wrapped__") else formula)


def count_flops(fn: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class PeakMemory:
    """Peak bytes of tensor storages allocated during a block (a dispatch mode; works on any device, with frozen
    parameters, generate loops and double forward passes, unlike ``MemTracker``). Storages are counted once however
    many views share them and forgotten when freed; frees are noticed at the next op."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live: dict[int, tuple] = {}
        self.current = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key in [k for k, (ref, _) in tracker.live.items() if ref.expired()]:
                    tracker.current -= tracker.live.pop(key)[1]
                for tensor in tree_leaves(out):
                    if isinstance(tensor, torch.Tensor):
                        storage = tensor.untyped_storage()
                        ref = StorageWeakRef(storage)
                        if ref.cdata not in tracker.live:
                            tracker.live[ref.cdata] = (ref, storage.nbytes())
                            tracker.current += storage.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.mode = Mode()


def peak_memory_mb(case: Case, task: str, device: torch.device) -> float:
    """Peak memory of one call: the model's parameters, buffers and optimizer state plus the peak of what the call
    allocates (activations, temporaries, gradients). On CUDA, ``torch.cuda.max_memory_allocated``."""
    fn = case.tasks[task]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    tensors = [*case.model.parameters(), *case.model.buffers()]
    if task == "training" and case.optimizer is not None:
        tensors += [t for state in case.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    tracker = PeakMemory()
    with tracker.mode:
        fn()
    return (sum(resident.values()) + tracker.peak) / 2**20


@dataclass
class Case:
    """One configuration: a model and the calls that run each task on it."""

    name: str
    model: torch.nn.Module
    tasks: dict[str, Callable[[], None]]
    batch: int
    trainable: list = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None

    def prepare(self, task: str) -> None:
        """Untimed set-up before a call: train / eval mode and this model's own trainable set (backbones are shared)."""
        self.model.train(task == "training")
        trainable = {id(p) for p in self.trainable}
        for param in self.model.parameters():
            param.requires_grad_(id(param) in trainable)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()


def time_cases(cases: list[Case], task: str, repeats: int, timer: Timer, clock: str, desc: str) -> dict[str, dict]:
    """Interleaved timing of ``task`` on every case; returns per-case samples and medians."""
    samples = {c.name: {"wall": [], "cpu": []} for c in cases}
    for case in cases:  # warm-up (allocator, lazy init, caches)
        case.prepare(task)
        case.tasks[task]()
    bar = tqdm(total=repeats * len(cases), desc=desc, leave=False, dynamic_ncols=True)
    for rep in range(repeats):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            case.prepare(task)
            wall0, cpu0 = timer.now()
            case.tasks[task]()
            wall1, cpu1 = timer.now()
            samples[case.name]["wall"].append(wall1 - wall0)
            samples[case.name]["cpu"].append(cpu1 - cpu0)
            bar.update()
    bar.close()
    results = {}
    for case in cases:
        times = samples[case.name][clock]
        results[case.name] = {
            "median_s": statistics.median(times),
            "examples_per_s": case.batch / statistics.median(times),
            "median_wall_s": statistics.median(samples[case.name]["wall"]),
            "median_cpu_s": statistics.median(samples[case.name]["cpu"]),
            "samples": samples[case.name],
        }
    return results


def add_ratios(results: dict[str, dict], clock: str, reference: str = "monolithic") -> None:
    """Throughput ratios to the reference (ratio of medians) and the IQR of the per-repeat paired ratios."""
    ref = results[reference]
    for entry in results.values():
        entry["ratio"] = ref["median_s"] / entry["median_s"]
        entry["ratio_wall"] = ref["median_wall_s"] / entry["median_wall_s"]
        paired = sorted(r / m for r, m in zip(ref["samples"][clock], entry["samples"][clock]))
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        entry["ratio_iqr"] = [quartiles[0], quartiles[2]]
        if "flops" in entry and ref.get("flops"):
            entry["flop_predicted_ratio"] = ref["flops"] / entry["flops"]


def measure_section(
    cases: list[Case], tasks: list[str], args, timer: Timer, device: torch.device, section: str
) -> dict[str, dict]:
    out = {}
    for task in tasks:
        task_cases = [c for c in cases if task in c.tasks]
        results = time_cases(task_cases, task, args.repeats, timer, args.clock, f"{section}/{task}")
        for case in task_cases:
            case.prepare(task)
            results[case.name]["flops"] = count_flops(case.tasks[task])
            if not args.no_memory:
                case.prepare(task)
                results[case.name]["peak_memory_mb"] = peak_memory_mb(case, task, device)
        add_ratios(results, args.clock)
        out[task] = results
        print_table(f"{section}: {task}", results)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``base`` that shares its parameters (the frozen backbone), so many configurations fit in memory.

    Each `Case` re-applies its own ``requires_grad`` flags before a training step (`Case.prepare`)."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


def trainable_of(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_step(model: torch.nn.Module, params: list, lr: float) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer
    return step


def generate_without_decode_cache(model, routing_tags=None, **kwargs):
    """``generate`` with smear-peft's decode-time cache switched off: every decoding step routes and merges again."""
    return model.generate(routing_tags=routing_tags, routing_cache=False, **kwargs)


def t5_config(layers: int):
    from transformers import T5Config

    return T5Config(  # T5-v1.1-base
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=layers, num_decoder_layers=layers, num_heads=12,
        feed_forward_proj="gated-gelu", dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )


def smear_config(method: str, num_experts: int, **extra) -> SmearConfig:
    values = dict(num_experts=num_experts, routing=method, expert_dropout=EXPERT_DROPOUT.get(method, 0.0))
    values.update(extra)
    return SmearConfig(**values)


def t5_cases(spec: dict, device: torch.device, methods, num_experts: int = T5_EXPERTS, peft_baselines: bool = True,
             nocache: bool = True, tasks=("inference", "training", "generation"), suffix: str = "") -> list[Case]:
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(t5_config(spec["layers"])).to(device).eval()
    batch, source_len, answer_len = spec["batch"], spec["source_len"], spec["answer_len"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 32000, (batch, source_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(source_len // 2, source_len + 1, (batch,), generator=generator)
    attention_mask[torch.arange(source_len)[None] >= lengths[:, None]] = 0  # realistic right padding
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(2, 32000, (batch, answer_len), generator=generator)
    tags = torch.arange(batch) % T5_EXPERTS % num_experts
    inputs = {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention_mask).items()}
    labels, tags = labels.to(device), tags.to(device)
    gen_kwargs = dict(max_new_tokens=answer_len, min_new_tokens=answer_len, do_sample=False, num_beams=1)

    def make(name: str, model, extra: dict, nocache_variant: bool) -> list[Case]:
        trainable = trainable_of(model)
        step = optimizer_step(model, trainable, lr=3e-4)

        def inference() -> None:
            with torch.no_grad():
                model(**inputs, labels=labels, **extra)

        def training() -> None:
            model(**inputs, labels=labels, **extra).loss.backward()
            step()

        def generation() -> None:
            with torch.no_grad():
                model.generate(**inputs, **gen_kwargs, **extra)

        all_tasks = {"inference": inference, "training": training, "generation": generation}
        made = [Case(name + suffix, model, {t: all_tasks[t] for t in tasks}, batch, trainable, step.optimizer)]
        if nocache_variant and "generation" in tasks:
            def generation_nocache() -> None:
                with torch.no_grad():
                    generate_without_decode_cache(model, extra.get("routing_tags"), **inputs, **gen_kwargs)

            made.append(Case(f"{name}_nocache{suffix}", model, {"generation": generation_nocache}, batch, trainable, step.optimizer))
        return made

    cases = []
    for method in methods:
        model = get_peft_model(shared_copy(base), smear_config(method, num_experts, bottleneck_size=T5_BOTTLENECK))
        extra = {"routing_tags": tags} if method == "tag" else {}
        cases += make(method, model, extra, nocache and method in ("smear", "top_k"))
    if peft_baselines:
        targets = ["o", "wo"]  # output projections of the sublayers the routing blocks wrap
        lora = get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=T5_BOTTLENECK, lora_alpha=T5_BOTTLENECK, target_modules=targets))
        cases += make("lora", lora, {}, False)
        poly = get_peft_model(shared_copy(base), PolyConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=T5_BOTTLENECK, target_modules=targets, n_tasks=T5_EXPERTS, n_skills=T5_EXPERTS))
        cases += make("poly", poly, {"task_ids": tags}, False)
    return cases


def resnet_base(spec: dict, device: torch.device):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=345)
    return ResNetForImageClassification(config).to(device).eval()


def resnet_smear_config(method: str, num_experts: int) -> SmearConfig:
    if find_preset("resnet") is not None:
        return smear_config(method, num_experts)
    # Before the resnet preset: the block on each BasicBlock's output (after the residual add, before the final ReLU
    # in the authors' code; here after it), with the authors' C -> 32 -> C experts and input BatchNorm.
    targets = r".*encoder\.stages\.\d+\.layers\.\d+"
    return smear_config(method, num_experts, target_modules=targets, bottleneck_size=32, input_norm="batch_norm", post_norm=False)


def resnet_cases(spec: dict, device: torch.device, methods, num_experts: int = RESNET_EXPERTS, tasks=("inference", "training"), suffix: str = "") -> list[Case]:
    base = resnet_base(spec, device)
    generator = torch.Generator().manual_seed(0)
    batch = spec["batch"]
    pixels = torch.randn(batch, 3, spec["image"], spec["image"], generator=generator).to(device)
    labels = torch.randint(0, 345, (batch,), generator=generator).to(device)
    tags = (torch.arange(batch) % RESNET_EXPERTS % num_experts).to(device)
    cases = []
    for method in methods:
        model = get_peft_model(shared_copy(base), resnet_smear_config(method, num_experts))
        trainable = trainable_of(model)
        step = optimizer_step(model, trainable, lr=1e-3)
        extra = {"routing_tags": tags} if method == "tag" else {}

        def inference(model=model, extra=extra) -> None:
            with torch.no_grad():
                model(pixel_values=pixels, **extra)

        def training(model=model, extra=extra, step=step) -> None:
            model(pixel_values=pixels, labels=labels, **extra).loss.backward()
            step()

        all_tasks = {"inference": inference, "training": training}
        cases.append(Case(method + suffix, model, {t: all_tasks[t] for t in tasks}, batch, trainable, step.optimizer))
    return cases


def causal_cases(spec: dict, device: torch.device, workdir: str) -> list[Case]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # a decoder with the T5-v1.1-base width
        vocab_size=32128, hidden_size=768, intermediate_size=2048, num_hidden_layers=spec["layers"], num_attention_heads=12,
        num_key_value_heads=12, use_cache=False,  # X-LoRA requires use_cache=False; the same for every method
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device).eval()
    batch, seq_len = spec["batch"], spec["seq_len"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 32000, (batch, seq_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    tags = (torch.arange(batch) % T5_EXPERTS).to(device)
    targets = ["o_proj", "down_proj"]
    models = {}
    for method in ("monolithic", "smear"):
        cfg = smear_config(method, T5_EXPERTS, bottleneck_size=T5_BOTTLENECK, target_modules=targets, task_type="CAUSAL_LM")
        models[method] = (get_peft_model(shared_copy(base), cfg), {})
    models["lora"] = (get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=T5_BOTTLENECK, lora_alpha=T5_BOTTLENECK, target_modules=targets)), {})
    models["poly"] = (get_peft_model(shared_copy(base), PolyConfig(task_type=TaskType.CAUSAL_LM, r=T5_BOTTLENECK, target_modules=targets, n_tasks=T5_EXPERTS, n_skills=T5_EXPERTS)), {"task_ids": tags})
    adapters = {}
    for index in range(T5_EXPERTS):  # X-LoRA loads its LoRA experts from disk; names must be "0".."N-1"
        torch.manual_seed(100 + index)
        expert = get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=T5_BOTTLENECK, lora_alpha=T5_BOTTLENECK, target_modules=targets, init_lora_weights=False))
        path = os.path.join(workdir, f"lora_expert_{index}")
        expert.save_pretrained(path)
        adapters[str(index)] = path
        del expert
    xlora_config = XLoraConfig(task_type=TaskType.CAUSAL_LM, hidden_size=768, adapters=adapters, xlora_depth=1)
    models["xlora"] = (get_peft_model(shared_copy(base), xlora_config), {})
    cases = []
    for name, (model, extra) in models.items():
        trainable = trainable_of(model)
        step = optimizer_step(model, trainable, lr=3e-4)

        def inference(model=model, extra=extra) -> None:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, **extra)

        def training(model=model, extra=extra, step=step) -> None:
            model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, **extra).loss.backward()
            step()

        cases.append(Case(name, model, {"inference": inference, "training": training}, batch, trainable, step.optimizer))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------
def run_t5(spec, args, timer, device):
    cases = t5_cases(spec, device, ROUTING_METHODS)
    return measure_section(cases, ["inference", "training", "generation"], args, timer, device, "t5")


def run_resnet(spec, args, timer, device):
    cases = resnet_cases(spec, device, ROUTING_METHODS)
    return measure_section(cases, ["inference", "training"], args, timer, device, "resnet")


def run_causal(spec, args, timer, device):
    with tempfile.TemporaryDirectory() as workdir:
        cases = causal_cases(spec, device, workdir)
        return measure_section(cases, ["inference", "training"], args, timer, device, "causal")


def run_scaling(sizes, args, timer, device):
    """Inference throughput vs number of experts, relative to monolithic, for each model."""
    out = {}
    for model_name in ("t5", "resnet"):
        if model_name not in args.scaling_models:
            continue
        rows = {}
        for num_experts in SCALING_EXPERTS:
            if model_name == "t5":
                cases = t5_cases(sizes["t5"], device, ("monolithic", *SCALING_METHODS), num_experts, peft_baselines=False, nocache=False, tasks=("inference",))
            else:
                cases = resnet_cases(sizes["resnet"], device, ("monolithic", *SCALING_METHODS), num_experts, tasks=("inference",))
            results = time_cases(cases, "inference", args.repeats, timer, args.clock, f"scaling/{model_name}/N={num_experts}")
            for case in cases:
                case.prepare("inference")
                results[case.name]["flops"] = count_flops(case.tasks["inference"])
            add_ratios(results, args.clock)
            rows[str(num_experts)] = results
            del cases
            gc.collect()
        out[model_name] = rows
        print_scaling(model_name, rows)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------
def print_table(title: str, results: dict[str, dict]) -> None:
    print(f"\n{title}")
    header = f"  {'method':<18}{'ex/s':>9}{'ratio':>8}{'IQR of paired':>17}{'FLOP-pred.':>11}{'wall ratio':>11}{'peak MB':>10}"
    print(header)
    for name, r in results.items():
        iqr = f"{r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f}"
        memory = r.get("peak_memory_mb")
        print(
            f"  {name:<18}{r['examples_per_s']:>9.2f}{r['ratio']:>8.3f}{iqr:>17}"
            f"{r.get('flop_predicted_ratio', float('nan')):>11.3f}{r['ratio_wall']:>11.3f}"
            f"{(f'{memory:.0f}' if memory is not None else '-'):>10}"
        )


def print_scaling(model_name: str, rows: dict) -> None:
    print(f"\nscaling ({model_name}, inference): throughput ratio to monolithic (FLOP-predicted)")
    print("  " + f"{'N':>4}" + "".join(f"{m:>22}" for m in SCALING_METHODS))
    for n, results in rows.items():
        cells = "".join(f"{results[m]['ratio']:>13.3f} ({results[m]['flop_predicted_ratio']:.3f})" for m in SCALING_METHODS)
        print("  " + f"{n:>4}" + cells)


def markdown_tables(results: dict) -> str:
    """The summary tables of a results dict as markdown (for docs/results.md)."""
    lines = []
    for key, section in results["sections"].items():
        if key == "scaling":
            for model_name, rows in section.items():
                lines += [f"**scaling: {model_name}, inference** (throughput / monolithic; FLOP-predicted in brackets)", "",
                          "| N | " + " | ".join(SCALING_METHODS) + " |", "|---:|" + "---:|" * len(SCALING_METHODS)]
                for n, entry in rows.items():
                    lines.append(f"| {n} | " + " | ".join(f"{entry[m]['ratio']:.2f} ({entry[m]['flop_predicted_ratio']:.2f})" for m in SCALING_METHODS) + " |")
                lines.append("")
            continue
        tasks = list(section)
        methods = list(dict.fromkeys(m for t in tasks for m in section[t]))
        lines += [f"**{key}** (examples/s; throughput / monolithic; FLOP-predicted ratio; peak MB)", "",
                  "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for method in methods:
            cells = []
            for task in tasks:
                r = section[task].get(method)
                if r is None:
                    cells.append("")
                    continue
                memory = r.get("peak_memory_mb")
                cells.append(f"{r['examples_per_s']:.2f} ex/s; **{r['ratio']:.3f}x** (FLOPs {r['flop_predicted_ratio']:.3f}x)"
                             + (f"; {memory:.0f} MB" if memory is not None else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def machine_info(device: torch.device, args) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "smear_peft": smear_peft.__version__,
        "clock": args.clock,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def plot(results: dict, path: Path, size: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("t5", "T5 (seq2seq)"), ("resnet", "ResNet-18"), ("causal", "Llama-shaped decoder: vs PEFT")]
    panels = [(k, t) for k, t in panels if k in results["sections"]]
    has_scaling = "scaling" in results["sections"]
    count = len(panels) + int(has_scaling)
    ncols = min(count, 2)
    nrows = (count + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.4 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    order = ["monolithic", "tag", "top_k", "top_k_nocache", "smear", "smear_nocache", "ensemble", "lora", "poly", "xlora"]
    for ax, (key, title) in zip(axes, panels):
        section = results["sections"][key]
        tasks = list(section)
        methods = sorted(dict.fromkeys(m for t in tasks for m in section[t]), key=lambda m: order.index(m) if m in order else len(order))
        width = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            xs, ys, flops = [], [], []
            for j, method in enumerate(methods):
                if method in section[task]:
                    xs.append(j + (i - (len(tasks) - 1) / 2) * width)
                    ys.append(section[task][method]["ratio"])
                    flops.append(section[task][method].get("flop_predicted_ratio"))
            ax.bar(xs, ys, width, label=task)
            ax.scatter(xs, flops, marker="_", color="black", s=120, zorder=3, label="FLOP-predicted" if i == 0 else None)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(0.95, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=35, ha="right")
        ax.set_ylabel("throughput / monolithic")
        ax.set_ylim(0.4, 1.1)
        ax.set_title(title)
        ax.legend(fontsize=7)
    if has_scaling:
        ax = axes[-1]
        for model_name, rows in results["sections"]["scaling"].items():
            ns = [int(n) for n in rows]
            for method, style in zip(SCALING_METHODS, ("o-", "s--", "^-.")):
                ax.plot(ns, [rows[str(n)][method]["ratio"] for n in ns], style, label=f"{model_name} {method}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SCALING_EXPERTS)
        ax.set_xticklabels([str(n) for n in SCALING_EXPERTS])
        ax.set_xlabel("number of experts N")
        ax.set_ylabel("inference throughput / monolithic")
        ax.set_ylim(0.4, 1.1)
        ax.set_title("Scaling with N (inference)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    machine = results["machine"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['torch_threads']} thread(s), {machine['clock']} clock"
    fig.suptitle(f"smear-peft speed ({size} size; {where})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model / input sizes (default: small)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--scaling-models", nargs="+", choices=("t5", "resnet"), default=["t5", "resnet"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on CPU)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None, help="default: cpu on CPU, wall on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per configuration and task")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/speed_<size>.json)")
    parser.add_argument("--figure", type=Path, default=None, help="PNG path (default docs/figures/speed_<size>.png)")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="measure nothing: redraw the figure and print markdown tables from a results JSON")
    args = parser.parse_args(argv)
    if args.replot is not None:
        results = json.loads(args.replot.read_text())
        if not args.no_plot:
            figure = args.figure or REPO / "docs" / "figures" / f"speed_{results['size']}.png"
            plot(results, figure, results["size"])
            print(f"wrote {figure}")
        print(markdown_tables(results))
        return results

    device = torch.device(args.device)
    sizes = SIZES[args.size]
    args.repeats = args.repeats or sizes["repeats"]
    args.clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    _register_cpu_attention_flops()

    results = {
        "size": args.size,
        "sizes": {k: v for k, v in sizes.items() if k != "repeats"},
        "repeats": args.repeats,
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(device, args),
        "sections": {},
    }
    timer = Timer(device)
    runners = {"t5": run_t5, "resnet": run_resnet, "causal": run_causal}
    for section in tqdm([s for s in SECTIONS if s in args.only], desc="sections", dynamic_ncols=True):
        if section == "scaling":
            results["sections"]["scaling"] = run_scaling(sizes, args, timer, device)
        else:
            results["sections"][section] = runners[section](sizes[section], args, timer, device)
        gc.collect()
    results["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    output = args.output or REPO / "benchmarks" / "results" / f"speed_{args.size}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + markdown_tables(results))
    print(f"\nwrote {output}")
    if not args.no_plot:
        figure = args.figure or REPO / "docs" / "figures" / f"speed_{args.size}.png"
        plot(results, figure, args.size)
        print(f"wrote {figure}")
    return results


if __name__ == "__main__":
    main()
