"""Routing heatmaps of a saved SMEAR adapter on a quality benchmark (paper Fig. 3 style).

For every routing block, the mean routing distribution over the test examples of each tag (digit domain or text
task), recorded with `smear_peft.analysis.RoutingRecorder` and drawn with `smear_peft.analysis.plot_routing_heatmaps`::

    python benchmarks/heatmaps.py --adapter ~/.cache/smear_peft/benchmarks/adapters/text/smear --output fig.png
    python benchmarks/heatmaps.py --adapter DIR --dataset digits --output fig.png --means-json means.json

``--adapter`` is a folder written by ``model.save_pretrained`` for one of ``benchmarks/quality.py``'s benchmarks
(``quality.py`` saves seed 0 of every method under ``$SMEAR_PEFT_CACHE/adapters/<benchmark>/<method>``, with a
``benchmark.json`` naming the benchmark, so ``--dataset`` may be left out). The frozen backbone is loaded from the
same cache (or pretrained again, deterministically, if it is missing). Text models are run teacher-forced on the
test targets: decoder routing depends only on the encoder's output, so it is the routing used while generating.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import smear_peft  # noqa: E402,F401  (registers SMEAR with PEFT)
from peft import PeftModel  # noqa: E402
from smear_peft.analysis import RoutingRecorder, plot_routing_heatmaps  # noqa: E402

import quality  # noqa: E402


def record_routing(adapter: Path, dataset: str, split: str = "test", batch_size: int = 200) -> RoutingRecorder:
    """Load the adapter on its benchmark's backbone and record its routing over a split."""
    settings = quality.SETTINGS[dataset](False)
    backbone = quality.pretrained_backbone(settings)
    model = PeftModel.from_pretrained(backbone, str(adapter)).eval()
    data = quality.load_data(settings)
    tensors = data.test if split == "test" else data.train
    n = len(tensors["routing_tags"])
    recorder = RoutingRecorder(model, tag_names=data.group_names)
    with recorder, torch.no_grad():
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            batch = quality._trim(quality._select(tensors, idx), causal=dataset in quality.CAUSAL)
            tags = batch.pop("routing_tags")
            keys = idx + (1_000_000 if split == "test" else 0)  # the keys quality.py gives hash routing
            model(**batch, routing_tags=tags, routing_keys=keys)
    return recorder


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="folder of a saved SMEAR adapter")
    parser.add_argument("--dataset", choices=sorted(quality.SETTINGS), default=None,
                        help="benchmark of the adapter (default: read from the adapter's benchmark.json)")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default=None)
    parser.add_argument("--ncols", type=int, default=None)
    parser.add_argument("--means-json", type=Path, default=None, help="also write the mean routing per tag as JSON")
    args = parser.parse_args(argv)

    info_path = args.adapter / "benchmark.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    dataset = args.dataset or info.get("benchmark")
    if dataset is None:
        parser.error(f"{args.adapter} has no benchmark.json; pass --dataset {{{','.join(sorted(quality.SETTINGS))}}}.")
    torch.set_num_threads(1)
    recorder = record_routing(args.adapter, dataset, args.split)
    means = recorder.mean_probs_per_tag()
    method = info.get("method", args.adapter.name)
    title = args.title or f"{quality.METHOD_LABELS.get(method, method)} routing on {dataset} ({args.split}): mean " \
                          f"routing probability per {'domain' if dataset == 'digits' else 'task'}"
    ncols = args.ncols or (4 if dataset == "digits" else 5)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot_routing_heatmaps(means, args.output, ncols=ncols, title=title)
    print(f"wrote {args.output} ({len(means.blocks)} blocks, tags: {', '.join(means.tag_labels)})")
    if args.means_json is not None:
        payload = {
            "adapter": str(args.adapter), "dataset": dataset, "split": args.split, "method": method,
            "tags": means.tag_labels, "blocks": means.blocks,
            "means": [[[round(float(v), 4) for v in row] for row in block] for block in means.means.tolist()],
        }
        args.means_json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.means_json}")


if __name__ == "__main__":
    main()
