"""Output of benchmarks/speed.py: console tables, the markdown tables of docs/results.md, machine information and
the figure.

Read alone: every function takes the results dictionary that speed.py writes as JSON (``sections`` -> section ->
task -> method -> {examples_per_s, ratio, ratio_iqr, flops, flop_predicted_ratio, peak_memory_mb, samples}; the
``scaling`` section is model -> number of experts -> method -> the same) and prints or draws it.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import peft
import torch
import transformers
from speed_cases import SCALING_EXPERTS, SCALING_METHODS

import smear_peft


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
