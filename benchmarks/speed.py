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

The code is in three parts, each readable alone: ``speed_harness.py`` (timing, FLOPs, memory), ``speed_cases.py``
(the models and methods measured) and ``speed_report.py`` (tables and figure); this file runs the sections.

Writes ``benchmarks/results/speed_<size>.json`` and ``docs/figures/speed_<size>.png`` (``--no-plot`` skips the
figure) and prints the tables of ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import smear_peft  # noqa: E402,F401  (registers the SMEAR PEFT type)
from speed_cases import ROUTING_METHODS, SCALING_EXPERTS, SCALING_METHODS, SIZES, causal_cases, resnet_cases, t5_cases
from speed_harness import (
    Case,
    Timer,
    add_ratios,
    count_flops,
    peak_memory_mb,
    register_cpu_attention_flops,
    time_cases,
)
from speed_report import machine_info, markdown_tables, plot, print_scaling, print_table

SECTIONS = ("t5", "resnet", "causal", "scaling")


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------
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




def run_t5(spec, args, timer, device):
    cases = t5_cases(spec, device, ROUTING_METHODS)
    return measure_section(cases, ["inference", "training", "generation"], args, timer, device, "t5")


def run_resnet(spec, args, timer, device):
    cases = resnet_cases(spec, device, ROUTING_METHODS)
    return measure_section(cases, ["inference", "training"], args, timer, device, "resnet")


def run_causal(spec, args, timer, device):
    with tempfile.TemporaryDirectory() as workdir:
        cases = causal_cases(spec, device, workdir)
        return measure_section(cases, ["inference", "training", "generation"], args, timer, device, "causal")


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
    register_cpu_attention_flops()

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
