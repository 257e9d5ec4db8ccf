"""Tests of examples/domainnet.py: the config handling, the DomainNet path on a generated folder, and the digits run
end to end (accuracy, metrics.json, reloading the saved adapter, exact resume)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .launching import accelerate_launch, intercept_uploads

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "domainnet.py"
DIGITS_CONFIG = REPO / "examples" / "configs" / "digits.yaml"


def load_script():
    spec = importlib.util.spec_from_file_location("domainnet_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(*args: str, processes: int = 1, engine_config: Path | None = None, env_update: dict | None = None) -> str:
    """``accelerate launch --cpu examples/domainnet.py ARGS`` offline (tests/examples/launching.py; or 2 processes,
    or under a sharding engine); returns the output (fails with it on error)."""
    result = accelerate_launch(SCRIPT, list(args), processes, engine_config, env_update)
    return result.stdout + result.stderr


# -- configuration -------------------------------------------------------------------------------------------------------


def test_config_precedence_defaults_file_command_line(tmp_path: Path) -> None:
    script = load_script()
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset: digits\nmodel_name_or_path: null\nlr: 1e-2\nmax_steps: 7\npretrain:\n  steps: 5\n  depths: [1, 1]\n"
    )
    args = script.parse_config(["--config", str(config), "--max_steps", "9", "--routing", "reinforce"])
    assert args.learning_rate == 0.01 and isinstance(args.learning_rate, float)  # YAML's "1e-2" is a string
    # (the file uses the old name `lr`, still accepted)
    assert args.max_steps == 9  # the command line wins over the file
    assert args.pretrain_steps == 5 and args.pretrain_depths == [1, 1]  # the pretrain section, flattened
    assert args.batch_size == 128 and args.max_grad_norm == 1.0  # the paper's defaults otherwise
    assert args.expert_dropout == 0.0  # the authors run REINFORCE without expert dropout ...
    assert script.parse_config(["--config", str(config)]).expert_dropout == 0.1  # ... and SMEAR with 0.1
    assert script.parse_config(["--config", str(config), "--expert_dropout", "0.3"]).expert_dropout == 0.3


def test_config_errors(tmp_path: Path, capsys) -> None:
    script = load_script()
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        script.parse_config(["--config", str(bad)])
    assert "unknown keys" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # DomainNet needs its data
        script.parse_config([])
    with pytest.raises(SystemExit):
        script.parse_config(["--dataset", "digits", "--routing", "soft"])


def test_example_config_files_parse() -> None:
    script = load_script()
    paper = script.parse_config(["--config", str(REPO / "examples/configs/domainnet_resnet18.yaml"), "--data_dir", "x"])
    defaults = script.parse_config(["--data_dir", "x"])
    assert vars(paper) == vars(defaults)  # the paper's config file spells out the defaults
    digits = script.parse_config(["--config", str(DIGITS_CONFIG)])
    assert digits.dataset == "digits" and digits.model_name_or_path is None


def test_model_selection_and_epochs_follow_the_authors() -> None:
    script = load_script()
    # validation accuracy rounded to 4 decimals (their Scorer), strictly better than the best so far (from 0)
    assert script.is_new_best(0.12346, 0.1234) and not script.is_new_best(0.12344, 0.1234)
    assert not script.is_new_best(0.0, 0.0) and script.is_new_best(0.00005, 0.0)
    # every training image is seen each epoch: the last, partial batch is kept
    args = script.parse_config(["--dataset", "digits", "--model_name_or_path", "null", "--dataloader_num_workers", "0"])
    dataset = [{"pixel_values": torch.zeros(3, 2, 2), "labels": i % 3, "routing_tags": 0} for i in range(10)]
    loader = script.training_loader(dataset, 4, args)
    assert len(loader) == 3 and [len(b["labels"]) for b in loader] == [4, 4, 2]


# -- the DomainNet path, on a generated folder in the official layout --------------------------------------------------

CLASSES = {"aircraft_carrier": 0, "zigzag": 344}


def write_tiny_domainnet(root: Path, per_split: int = 4) -> None:
    """Images ``<root>/<domain>/<class>/<file>`` and the official ``<domain>_{train,test}.txt`` lists."""
    from smear_peft.data.domainnet import DOMAINNET_DOMAINS

    for domain_index, domain in enumerate(DOMAINNET_DOMAINS):
        for split in ("train", "test"):
            lines = []
            for i in range(per_split + (1 + domain_index if split == "train" else 0)):  # >= 1 validation image
                class_name = list(CLASSES)[i % 2]
                relative = f"{domain}/{class_name}/{split}_{i}.jpg"
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40 + i, 36), (40 * domain_index, 100 * (i % 2), 20 * i)).save(root / relative)
                lines.append(f"{relative} {CLASSES[class_name]}\n")
            (root / f"{domain}_{split}.txt").write_text("".join(lines))


def test_domainnet_path_runs_every_routing_method(tmp_path: Path) -> None:
    """The paper's data and model path (official list files, a pretrained ResNet whose head is replaced by a 345-way
    one) runs a few steps for every routing method, offline, with a tiny ResNet in place of ResNet-18."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from smear_peft import ROUTING_METHODS

    write_tiny_domainnet(tmp_path / "domainnet")
    tiny = ResNetConfig(
        layer_type="basic", embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_labels=3
    )
    ResNetForImageClassification(tiny).save_pretrained(tmp_path / "tiny-resnet")
    common = [
        "--data_dir", str(tmp_path / "domainnet"), "--model_name_or_path", str(tmp_path / "tiny-resnet"),
        "--image_size", "32", "--batch_size", "6", "--eval_batch_size", "5", "--dataloader_num_workers", "0",
        "--max_steps", "3", "--eval_every", "2", "--checkpoint_every", "1", "--log_every", "1", "--report_to", "none",
    ]  # fmt: skip
    # One process runs every method (the imports dominate the time of a run this small).
    runs = [[*common, "--routing", routing, "--output_dir", str(tmp_path / routing)] for routing in ROUTING_METHODS]
    runs[0] += ["--resume_from_checkpoint", "latest"]  # nothing to resume yet: starts from scratch
    runs.append([*common, "--routing", "hash", "--output_dir", str(tmp_path / "hash"), "--max_steps", "1",
                 "--overwrite_output_dir"])  # again, afresh
    code = (
        "import importlib.util, sys, json\n"
        f"spec = importlib.util.spec_from_file_location('domainnet_example', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "for argv in json.loads(sys.argv[1]):\n    module.main(argv)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(runs)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    for routing in ROUTING_METHODS:
        metrics = json.loads((tmp_path / routing / "metrics.json").read_text())
        assert metrics["routing"] == routing
        assert metrics["test_examples"] == 6 * 4
        assert set(metrics["test"]["per_domain"]) == {"clipart", "infograph", "painting", "quickdraw", "real", "sketch"}
        adapter = load_file(tmp_path / routing / "adapter_model.safetensors")
        assert next(v for k, v in adapter.items() if "classifier" in k and k.endswith("weight")).shape[0] == 345
        checkpoints = {path.name for path in (tmp_path / routing / "checkpoints").iterdir()}
        # The second hash run into the same folder replaced the first one's checkpoints instead of mixing with them.
        assert checkpoints == ({"checkpoint-1"} if routing == "hash" else {"checkpoint-2", "checkpoint-3"})


# -- the README's quick start: digits, end to end --------------------------------------------------------------------

DIGITS_STEPS = 300
EVAL_EVERY = 50


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The quick-start command with a private backbone cache (and fewer steps)."""
    root = tmp_path_factory.mktemp("digits")
    output = launch(
        "--config", str(DIGITS_CONFIG), "--output_dir", str(root / "run"), "--cache_dir", str(root / "cache"),
        "--max_steps", str(DIGITS_STEPS), "--eval_every", str(EVAL_EVERY), "--report_to", "none",
    )  # fmt: skip
    return {"root": root, "output_dir": root / "run", "output": output}


@pytest.mark.slow
def test_digits_run_is_far_above_chance(digits_run: dict) -> None:
    metrics = json.loads((digits_run["output_dir"] / "metrics.json").read_text())
    test = metrics["test"]
    assert test["domain_average"] > 0.5 and test["accuracy"] > 0.5  # chance is 0.1
    assert min(test["per_domain"].values()) > 0.2
    assert metrics["validation"]["accuracy"] > 0.5
    assert metrics["test_examples"] == 360 and metrics["test_inference_seconds"] > 0
    for domain in ("original", "inverted", "rotated", "noisy", "blurred", "sketch", "domain average", "all examples"):
        assert domain in digits_run["output"]  # the printed table
    assert "Digits backbone: pretraining" in digits_run["output"]


def assert_saved_adapter_reproduces_its_metrics(output_dir: Path, cache: Path) -> None:
    """The adapter in ``output_dir``, reloaded with PeftModel.from_pretrained, gets the validation and test images
    right exactly as metrics.json says, per domain (the validation: the best step's, the adapter's own)."""
    from peft import PeftModel
    from transformers import ResNetForImageClassification

    import smear_peft  # noqa: F401  (registers SMEAR with PEFT)
    from smear_peft.data.digits import load_digit_domains

    metrics = json.loads((output_dir / "metrics.json").read_text())
    backbone = Path(metrics["backbone"])
    assert backbone.is_relative_to(cache)  # the private cache, not the user's
    base = ResNetForImageClassification.from_pretrained(backbone, num_labels=10)
    model = PeftModel.from_pretrained(base, output_dir).eval()
    splits = load_digit_domains(image_size=32)
    for split, logged in ((splits.test, metrics["test"]), (splits.validation, metrics["validation"])):
        with torch.no_grad():
            predictions = torch.cat([
                model(pixel_values=split.pixel_values[i : i + 100], routing_tags=split.routing_tags[i : i + 100]).logits.argmax(-1)
                for i in range(0, len(split), 100)
            ])  # fmt: skip
        correct = predictions == split.labels  # the same images must be right: compare counts of correct predictions
        assert correct.sum().item() == round(logged["accuracy"] * len(split))
        for tag, domain in enumerate(splits.domain_names):
            in_domain = split.routing_tags == tag
            assert correct[in_domain].sum().item() == round(logged["per_domain"][domain] * in_domain.sum().item())


@pytest.mark.slow
def test_saved_adapter_reloads_with_the_same_test_accuracy(digits_run: dict) -> None:
    assert_saved_adapter_reproduces_its_metrics(digits_run["output_dir"], digits_run["root"] / "cache")


@pytest.mark.slow
def test_zero3_run_tests_the_best_adapter_and_uploads_it(tmp_path: Path) -> None:
    """`accelerate launch --config_file examples/configs/accelerate_zero3.yaml` on 2 CPU processes (the test-only
    switch keeps DeepSpeed on CPU). A learning rate this high overshoots, so the best validation step comes before the
    last: the best adapter must be written back into the ZeRO-3 partitions before testing. The saved adapter reloads
    and reproduces both the best step's validation and the test metrics; --push_to_hub uploads that folder."""
    env, uploads = intercept_uploads(tmp_path)
    output_dir, max_steps = tmp_path / "run", 40
    launch(
        "--config", str(DIGITS_CONFIG), "--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "cache"),
        "--pretrain_steps", "40", "--max_steps", str(max_steps), "--eval_every", "10", "--checkpoint_every", "20",
        "--learning_rate", "0.05", "--report_to", "none", "--push_to_hub", "--hub_model_id", "me/digits-zero3",
        processes=2, engine_config=REPO / "examples" / "configs" / "accelerate_zero3.yaml", env_update=env,
    )  # fmt: skip
    assert (output_dir / "checkpoints" / f"checkpoint-{max_steps}" / "zero_to_fp32.py").is_file()  # DeepSpeed's
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["best_step"] < max_steps
    assert_saved_adapter_reproduces_its_metrics(output_dir, tmp_path / "cache")
    uploaded = uploads / "me--digits-zero3"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (uploaded / "adapter_model.safetensors").read_bytes() == (output_dir / "adapter_model.safetensors").read_bytes()
    assert "Routing blocks: 8" in (uploaded / "README.md").read_text()


@pytest.mark.slow
def test_resume_gives_identical_state(digits_run: dict) -> None:
    """Resuming the run from its second-to-last checkpoint (mid-epoch) reproduces its last checkpoint bit for bit."""
    checkpoints = digits_run["output_dir"] / "checkpoints"
    resume_from = checkpoints / f"checkpoint-{DIGITS_STEPS - EVAL_EVERY}"
    assert resume_from.is_dir() and (DIGITS_STEPS - EVAL_EVERY) % 9 != 0  # 9 batches per epoch (the last partial): mid-epoch
    resumed_dir = digits_run["root"] / "resumed"
    output = launch(
        "--config", str(DIGITS_CONFIG), "--output_dir", str(resumed_dir), "--cache_dir", str(digits_run["root"] / "cache"),
        "--max_steps", str(DIGITS_STEPS), "--eval_every", str(EVAL_EVERY), "--report_to", "none",
        "--resume_from_checkpoint", str(resume_from),
    )  # fmt: skip
    assert f"at step {DIGITS_STEPS - EVAL_EVERY}" in output
    assert "Digits backbone: cached" in output
    final = f"checkpoint-{DIGITS_STEPS}"
    original, resumed = (load_file(d / final / "model.safetensors") for d in (checkpoints, resumed_dir / "checkpoints"))
    assert original.keys() == resumed.keys()
    assert all(torch.equal(original[key], resumed[key]) for key in original)  # weights, BatchNorm statistics, tau
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (digits_run["output_dir"], resumed_dir))
    for key in ("best_step", "validation", "test"):
        assert first[key] == second[key]
    optimizer = [
        torch.load(d / final / "optimizer.bin", weights_only=True) for d in (checkpoints, resumed_dir / "checkpoints")
    ]
    for state_a, state_b in zip(optimizer[0]["state"].values(), optimizer[1]["state"].values()):
        assert all(torch.equal(state_a[name], state_b[name]) for name in ("exp_avg", "exp_avg_sq"))
