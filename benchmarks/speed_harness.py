"""Measurement harness of benchmarks/speed.py: interleaved timing, FLOP counting and peak memory of `Case`s.

Read alone: a `Case` is a model plus one zero-argument call per task ("inference", "training", "generation");
`time_cases` times them interleaved (A B C A B C ..., the order rotating every repeat, each warmed up first) on the
clock `Timer` reads, `add_ratios` turns medians into throughput ratios to a reference case, `count_flops` counts
matrix-product / convolution / attention FLOPs with torch's FlopCounterMode (taught the CPU flash-attention kernel
by `register_cpu_attention_flops`), and `peak_memory_mb` measures one untimed call's peak memory.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


def register_cpu_attention_flops() -> None:
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
