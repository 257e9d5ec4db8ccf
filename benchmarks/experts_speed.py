#!/usr/bin/env python
"""Speed of routed LoRA / (IA)³ experts (``SmearConfig(expert_type=...)``) against PEFT's LoRA, X-LoRA, Poly and IA3.

One Llama-shaped decoder built from a config (random weights, nothing downloaded): width 1024, intermediate 2816, 16
heads, ``--layers`` layers (2), vocab 8192 (small, so that the LM head does not hide the layers' cost). Every LoRA
method targets the same seven projections of every layer (q/k/v/o, gate/up/down) with rank 16:

* ``lora``: PEFT LoRA r=16 (the baseline of the LoRA ratios);
* ``smear_lora``: SMEAR over 8 LoRA experts r=16, routed on the prompt;
* ``xlora``: PEFT X-LoRA over 8 LoRA experts r=16 (it runs the model twice per forward and cannot use the KV cache);
* ``poly``: PEFT Poly, 8 skills r=16, per-task routing (``task_ids``);
* ``ia3`` (the baseline of the (IA)³ ratios) and ``smear_ia3`` (8 (IA)³ experts) on PEFT's IA3 targets (k, v, down).

Tasks: inference (a forward of ``batch`` x ``seq_len`` tokens), a training step (forward with labels, backward,
AdamW: torch's default implementation, or ``--optimizer adamw_fused``, the fused kernel that transformers' ``Trainer``
uses by default), and generation of ``--new_tokens`` (64) tokens greedily from a ``--prompt_len`` prompt with the KV
cache (not for X-LoRA, which disables it). SMEAR routes on the first ``--prompt_len`` tokens (``routing_mask``) in
inference and training, on the prompt in generation.

Timing as ``benchmarks/speed.py``: one torch thread, CPU time of this process (``time.process_time``), configurations
interleaved with the order rotating every repeat, medians; ratios are to the baseline measured in the same run.

    python benchmarks/experts_speed.py                 # writes benchmarks/results/experts_speed.json + figure
    python benchmarks/experts_speed.py --replot benchmarks/results/experts_speed.json
    python benchmarks/experts_speed.py --tasks training --optimizer adamw_fused \
        --output benchmarks/results/experts_speed_fused_adamw.json --figure docs/figures/experts_speed_fused_adamw.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

# Timing helpers shared with benchmarks/speed.py (split into speed_cases / speed_harness / speed_report).
from speed_cases import optimizer_step, shared_copy, trainable_of  # noqa: E402
from speed_harness import Case, Timer, add_ratios, time_cases  # noqa: E402
from speed_report import machine_info, print_table  # noqa: E402
from peft import IA3Config, LoraConfig, PolyConfig, TaskType, XLoraConfig, get_peft_model  # noqa: E402

from smear_peft import SmearConfig  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NUM_EXPERTS, RANK = 8, 16
LORA_METHODS = ("lora", "smear_lora", "xlora", "poly")
IA3_METHODS = ("ia3", "smear_ia3")


def build_models(args, workdir: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    models = {}
    smear = dict(num_experts=NUM_EXPERTS, routing="smear", task_type="CAUSAL_LM")
    models["lora"] = get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=RANK, lora_alpha=2 * RANK, target_modules=LORA_TARGETS))
    models["smear_lora"] = get_peft_model(shared_copy(base), SmearConfig(expert_type="lora", r=RANK, lora_alpha=2 * RANK, target_modules=LORA_TARGETS, **smear))
    models["poly"] = get_peft_model(shared_copy(base), PolyConfig(task_type=TaskType.CAUSAL_LM, r=RANK, target_modules=LORA_TARGETS, n_tasks=NUM_EXPERTS, n_skills=NUM_EXPERTS))
    adapters = {}
    for index in range(NUM_EXPERTS):  # X-LoRA loads its experts from disk; names "0".."N-1"
        torch.manual_seed(100 + index)
        expert = get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=RANK, lora_alpha=2 * RANK, target_modules=LORA_TARGETS, init_lora_weights=False))
        path = os.path.join(workdir, f"lora_expert_{index}")
        expert.save_pretrained(path)
        adapters[str(index)] = path
        del expert
    xbase = shared_copy(base)
    xbase.config.use_cache = False  # X-LoRA requires it
    models["xlora"] = get_peft_model(xbase, XLoraConfig(task_type=TaskType.CAUSAL_LM, hidden_size=1024, adapters=adapters, xlora_depth=1))
    models["ia3"] = get_peft_model(shared_copy(base), IA3Config(task_type=TaskType.CAUSAL_LM))
    models["smear_ia3"] = get_peft_model(shared_copy(base), SmearConfig(expert_type="ia3", **smear))
    return models


def make_cases(models: dict, args) -> list:
    generator = torch.Generator().manual_seed(0)
    batch, seq_len, prompt_len = args.batch, args.seq_len, args.prompt_len
    input_ids = torch.randint(2, 8192, (batch, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    routing_mask = torch.zeros_like(input_ids)
    routing_mask[:, :prompt_len] = 1
    prompt = input_ids[:, :prompt_len]
    task_ids = torch.arange(batch) % NUM_EXPERTS
    cases = []
    for name, model in models.items():
        extra = {"task_ids": task_ids} if name == "poly" else {"routing_mask": routing_mask} if name.startswith("smear") else {}
        gen_extra = {"task_ids": task_ids} if name == "poly" else {}
        trainable = trainable_of(model)
        step = optimizer_step(model, trainable, lr=1e-4, fused=args.optimizer == "adamw_fused")

        def inference(model=model, extra=extra) -> None:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask, **extra)

        def training(model=model, extra=extra, step=step) -> None:
            model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, **extra).loss.backward()
            step()

        def generation(model=model, extra=gen_extra, name=name) -> None:
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, use_cache=name != "xlora", **extra)

        tasks = {"inference": inference, "training": training, "generation": generation}
        cases.append(Case(name, model, tasks, batch, trainable, step.optimizer))
    return cases


def measure(cases, args) -> dict:
    timer = Timer(torch.device("cpu"))
    out = {}
    for group, baseline, methods in (("lora", "lora", LORA_METHODS), ("ia3", "ia3", IA3_METHODS)):
        out[group] = {}
        for task in args.tasks:
            chosen = [c for c in cases if c.name in methods]
            repeats = args.generation_repeats if task == "generation" else args.repeats
            results = time_cases(chosen, task, repeats, timer, "cpu", f"{group}/{task}")
            add_ratios(results, "cpu", reference=baseline)
            for entry in results.values():
                entry.pop("samples_raw", None)
            out[group][task] = results
            print_table(f"{group}: {task} (ratio to {baseline})", results)
    return out


def markdown(results: dict) -> str:
    lines = []
    for group, sections in results["groups"].items():
        tasks = list(sections)
        methods = list(dict.fromkeys(m for t in tasks for m in sections[t]))
        lines += [f"| {group} methods | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for method in methods:
            cells = []
            for task in tasks:
                r = sections[task][method]
                cells.append(f"{r['examples_per_s']:.2f} ex/s; **{r['ratio']:.2f}x** ({r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = results["groups"]
    settings = results["settings"]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.2), squeeze=False)
    for ax, (group, sections) in zip(axes[0], groups.items()):
        tasks = list(sections)
        methods = list(dict.fromkeys(m for t in tasks for m in sections[t]))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            values = [sections[t][method]["ratio"] for t in tasks]
            bars = ax.bar([k + i * width for k in range(len(tasks))], values, width, label=method)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))])
        ax.set_xticklabels(tasks)
        ax.set_ylabel(f"throughput / PEFT {group}")
        ax.set_title(f"{group} experts (Llama-shaped, width 1024; batch {settings['batch']} x {settings['seq_len']} tokens)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--generation_repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["inference", "training", "generation"],
                        choices=["inference", "training", "generation"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_fused"],
                        help="Training step's optimizer: torch's default AdamW (on CPU a loop over the parameters) or "
                        "the fused AdamW kernel (transformers' Trainer default, optim='adamw_torch_fused').")
    parser.add_argument("--output", default=str(HERE / "results" / "experts_speed.json"))
    parser.add_argument("--figure", default=str(HERE.parent / "docs" / "figures" / "experts_speed.png"))
    parser.add_argument("--replot", default=None, help="Only redraw the figure and print the tables of a results JSON.")
    args = parser.parse_args()
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
    else:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as workdir:
            models = build_models(args, workdir)
            cases = make_cases(models, args)
            groups = measure(cases, args)
        info = machine_info(torch.device("cpu"), argparse.Namespace(clock="cpu"))
        results = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "replot"}, "groups": groups}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.figure))
    print(markdown(results))


if __name__ == "__main__":
    main()
