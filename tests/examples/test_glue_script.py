"""Tests of examples/glue.py: settings parsing (fast), and end-to-end runs of the tiny offline config (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .launching import accelerate_launch, intercept_uploads

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "glue.py"
TINY = REPO / "examples" / "configs" / "glue_tiny.yaml"
PAPER = REPO / "examples" / "configs" / "glue_t5_base.yaml"
# Less data than glue_tiny.yaml for runs that check mechanics: 3 tasks, 5 steps per epoch, 40 test rows.
SMALL_DATA = ["--tasks", "[rte, sst2, stsb]", "--synthetic_data", "{num_train: 32, num_validation: 4}",
              "--validation_examples_per_task", "2"]
pytestmark = pytest.mark.filterwarnings("ignore:An input array is constant")  # correlations of untrained models


def load_script():
    spec = importlib.util.spec_from_file_location("glue_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


glue = load_script()


def run_script(
    args: list[str], processes: int = 1, engine_config: Path | None = None, env_update: dict | None = None
) -> subprocess.CompletedProcess:
    """glue.py on the tiny config under `accelerate launch` (tests/examples/launching.py), offline, on CPU."""
    return accelerate_launch(SCRIPT, ["--config", str(TINY), "--report_to", "none", *args], processes, engine_config,
                             env_update)


# -- settings ---------------------------------------------------------------------------------------------------------
def test_yaml_then_command_line_override_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 10\nrouting: top_k\nmodel_config: {d_model: 8}\nadam_epsilon: 1e-6\n")
    config = glue.parse_config(
        ["--config", str(path), "--max_steps", "7", "--learning_rate", "1e-3", "--tasks", "[rte, mnli]",
         "--push_to_hub", "--hub_model_id", "me/run", "--expert_dropout", "2e-1"]
    )
    assert config["max_steps"] == 7 and config["routing"] == "top_k"  # CLI over YAML, YAML over defaults
    assert config["learning_rate"] == 1e-3 and config["model_config"] == {"d_model": 8}
    assert config["adam_epsilon"] == 1e-6 and config["expert_dropout"] == 0.2  # PyYAML reads "1e-6" as a string
    assert config["tasks"] == ["rte", "mnli"] and config["push_to_hub"] is True
    assert config["batch_size"] == glue.DEFAULTS["batch_size"]
    assert glue.parse_config(["--tag_plus", "false"])["tag_plus"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tag_plus"], "--routing tag"),
        (["--loss_reduction", "max"], "loss_reduction"),
        (["--push_to_hub"], "hub_model_id"),
    ],
)
def test_inconsistent_settings_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        glue.parse_config(argv)
    assert message in capsys.readouterr().err


def test_unknown_yaml_key_is_rejected(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("max_step: 10\n")
    with pytest.raises(SystemExit):
        glue.parse_config(["--config", str(path)])
    assert "max_step" in capsys.readouterr().err


def test_paper_config_spells_out_the_defaults():
    assert glue.parse_config(["--config", str(PAPER)]) == glue.parse_config([])


@pytest.mark.parametrize(
    "routing, expected_dropout", [("smear", 0.1), ("top_k", 0.1), ("st_gumbel", 0.0), ("reinforce", 0.0), ("hash", 0.0)]
)
def test_expert_dropout_defaults_to_the_authors_value_per_method(routing, expected_dropout):
    config = glue.parse_config(["--routing", routing])
    assert glue.build_smear_config(config).expert_dropout == expected_dropout
    assert glue.build_smear_config({**config, "expert_dropout": 0.3}).expert_dropout == 0.3


def test_tag_plus_maps_rte_to_mnli_in_the_encoder_only():
    smear_config = glue.build_smear_config(glue.parse_config(["--routing", "tag", "--tag_plus"]))
    rte, mnli = glue.GLUE_TASKS.index("rte"), glue.GLUE_TASKS.index("mnli")
    assert smear_config.tag_expert_table("encoder")[rte] == mnli
    assert smear_config.tag_expert_table("decoder")[rte] == rte


def test_evaluation_batches_hold_one_task_and_generate_the_authors_budget():
    """The authors evaluate each task with its own loader and `generate(max_length=L)` (transformers 3.5: at most
    L - 1 new tokens after the decoder start token), L = the task's longest answer in tokens with </s>."""
    from accelerate import Accelerator
    from peft import get_peft_model

    config = glue.parse_config(["--config", str(TINY), *SMALL_DATA, "--routing", "smear", "--tasks", "[rte, stsb]",
                                "--smear_config", "{reduction_factor: 8, pooling: mean}"])
    tokenizer = glue.build_tokenizer(config)
    rows = glue.build_split(config, glue.load_glue(config), "test")
    collator = glue.GlueSeq2SeqCollator(
        tokenizer, config["max_source_length"], config["max_target_length"], include_text_fields=True
    )
    loaders = glue.per_task_loaders(rows, 7, collator)
    lengths = glue.answer_lengths(rows, tokenizer)
    for task in ("rte", "stsb"):
        answers = {a for c, t in zip(rows["answer_choices"], rows["task"]) if t == task for a in (c or [])}
        answers |= {a for a, t in zip(rows["target_text"], rows["task"]) if t == task}
        assert lengths[task] == max(len(a.encode()) + 1 for a in answers)  # ByT5: one token per byte, plus </s>
    assert glue.new_token_budget(5) == 4
    model = get_peft_model(glue.build_base_model(config), glue.build_smear_config(config))
    calls, original = [], model.generate

    def generate(**kwargs):
        output = original(**kwargs)
        calls.append((kwargs, output))
        return output

    model.generate = generate
    scores = glue.evaluate(model, loaders, tokenizer, Accelerator(cpu=True), lengths)
    assert scores["rows"] == len(rows) and len(calls) == sum(len(loader) for loader in loaders.values())
    for kwargs, output in calls:
        tags = kwargs["routing_tags"].unique()
        assert len(tags) == 1  # one task per batch
        task = glue.GLUE_TASKS[tags.item()]
        assert kwargs["max_new_tokens"] == lengths[task] - 1
        assert output.shape[1] - 1 <= lengths[task] - 1  # after the decoder start token
        # padded to the longest prompt of this task's batch only, as the authors' per-task loader
        assert kwargs["attention_mask"].sum(1).max() == kwargs["input_ids"].shape[1]


def test_authors_backbone_is_on_by_default_and_reloads_with_the_adapter(tmp_path):
    config = glue.parse_config(["--config", str(TINY)])
    assert config["authors_backbone"] and glue.parse_config(["--config", str(PAPER)])["authors_backbone"]
    assert config["sampler_seed"] == 0  # the authors' MultiTaskBatchSampler: seed 0 + epoch
    base = glue.build_base_model(config)
    assert base.config.scale_decoder_outputs and base.authors_bias_source == "initialised"
    plain = glue.build_base_model({**config, "authors_backbone": False})
    assert not plain.config.scale_decoder_outputs
    from smear_peft.authors_t5 import save_authors_backbone

    save_authors_backbone(base, str(tmp_path))
    with torch.no_grad():
        base.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight.mul_(2)
    reloaded = glue.build_base_model(config, authors_weights_dir=str(tmp_path))
    assert reloaded.authors_bias_source == "weights_dir"
    weight = reloaded.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight
    assert torch.equal(weight * 2, base.decoder.block[0].layer[1].EncDecAttention.relative_attention_bias.weight)


# -- end to end (slow) ------------------------------------------------------------------------------------------------
def evaluate_saved_adapter(output_dir: Path) -> dict:
    """Re-runs the test evaluation in this process on the adapter the script saved."""
    import smear_peft  # noqa: F401  (registers SMEAR with PEFT)
    from accelerate import Accelerator
    from peft import PeftModel

    config = yaml.safe_load((output_dir / "config.yaml").read_text())
    model = PeftModel.from_pretrained(glue.build_base_model(config, authors_weights_dir=str(output_dir)), str(output_dir))
    tokenizer = glue.build_tokenizer(config)
    rows = glue.build_split(config, glue.load_glue(config), "test")
    collator = glue.GlueSeq2SeqCollator(
        tokenizer, config["max_source_length"], config["max_target_length"], include_text_fields=True
    )
    loaders = glue.per_task_loaders(rows, config["eval_batch_size"], collator)
    return glue.evaluate(model, loaders, tokenizer, Accelerator(cpu=True), glue.answer_lengths(rows, tokenizer))


@pytest.mark.slow
def test_two_process_run_saves_an_adapter_that_reproduces_its_test_metrics(tmp_path):
    output_dir = tmp_path / "run"
    result = run_script(["--output_dir", str(output_dir), "--max_steps", "20", "--checkpoint_every", "10"], processes=2)
    assert "2 processes x 8 x 1 accumulation" in result.stdout

    metrics = json.loads((output_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert metrics["step"] == 20 and test["rows"] == 640
    assert len([k for k in test if "/" in k and not k.endswith("invalid_fraction")]) == 11
    assert test["generation_seconds"] > 0 and "average_over_tasks" in test
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]

    again = evaluate_saved_adapter(output_dir)
    for key, value in test.items():
        if key != "generation_seconds":
            assert again[key] == pytest.approx(value, abs=1e-9), key


# The sharding engines' accelerate configs, each with a file only that engine's checkpoints hold.
ENGINES = {
    "zero3": ("accelerate_zero3.yaml", "zero_to_fp32.py"),
    "fsdp2": ("accelerate_fsdp2.yaml", "pytorch_model_fsdp.bin"),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_sharded_run_saves_and_uploads_an_adapter_that_reproduces_its_test_metrics(engine, tmp_path):
    """`accelerate launch --config_file examples/configs/accelerate_zero3.yaml` (or _fsdp2) on 2 CPU processes (the
    test-only switch keeps the engine on CPU): the adapter is gathered from the shards, reloads with
    PeftModel.from_pretrained and gives the logged test metrics, generations included (their digest); --push_to_hub
    uploads that saved folder (intercepted), once."""
    config_file, checkpoint_file = ENGINES[engine]
    env, uploads = intercept_uploads(tmp_path)
    output_dir = tmp_path / "run"
    result = run_script(
        ["--output_dir", str(output_dir), "--max_steps", "20", "--checkpoint_every", "10", "--push_to_hub",
         "--hub_model_id", f"me/{engine}"],
        processes=2, engine_config=REPO / "examples" / "configs" / config_file, env_update=env,
    )
    assert "2 processes x 8 x 1 accumulation" in result.stdout
    assert (output_dir / "checkpoints" / "checkpoint-20" / checkpoint_file).is_file()  # the engine's own checkpoint

    test = json.loads((output_dir / "metrics.json").read_text())["test"]
    assert test["rows"] == 640
    again = evaluate_saved_adapter(output_dir)
    for key, value in test.items():
        if key != "generation_seconds":
            assert again[key] == pytest.approx(value, abs=1e-9), key

    uploaded = uploads / f"me--{engine}"
    assert [p.name for p in uploads.iterdir()] == [uploaded.name]
    assert sorted(p.name for p in uploaded.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "authors_backbone.safetensors"]
    for name in ("adapter_model.safetensors", "authors_backbone.safetensors"):
        assert (uploaded / name).read_bytes() == (output_dir / name).read_bytes(), name
    card = (uploaded / "README.md").read_text()
    assert "## SMEAR adapter" in card and "Routing blocks: 10" in card and f"me/{engine}" in card


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    # Dropout and expert dropout are on, so this also checks the restored RNG states; step 3 -> 6 crosses an epoch.
    args = ["--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "100", *SMALL_DATA]
    run_script([*args, "--output_dir", str(tmp_path / "full")])
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-3"
    result = run_script([*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(checkpoint)])
    assert "at step 3" in result.stdout

    full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())["test"]
    resumed_metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["test"]
    assert {k: v for k, v in full_metrics.items() if k != "generation_seconds"} == {
        k: v for k, v in resumed_metrics.items() if k != "generation_seconds"
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "routing",
    [["top_k"], ["st_gumbel"], ["reinforce"], ["tag"], ["tag", "--tag_plus"], ["hash"], ["monolithic"], ["ensemble"]],
    ids=lambda r: "+".join(r),
)
def test_every_routing_method_trains_and_evaluates(routing, tmp_path):
    argv = ["--config", str(TINY), "--report_to", "none", "--output_dir", str(tmp_path), "--max_steps", "2",
            "--eval_every", "100", "--checkpoint_every", "100", *SMALL_DATA, "--routing", *routing]
    glue.main(argv)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["routing"] == routing[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["routing"] == routing[0] + ("+" if "--tag_plus" in routing else "")
    assert 0 <= metrics["test"]["average_over_metric_entries"] <= 100


@pytest.mark.slow
def test_one_process_accumulation_and_two_processes_take_the_same_steps(tmp_path):
    # How the 16-example batch is split (one process, 4 accumulated micro-batches, 2 processes) must not change the
    # gradient of the summed loss. Dropout is off, and Adam with a huge epsilon is plain SGD (update = lr / eps x
    # gradient), so the adapters differ only by the gradients' floating-point noise (Adam's normalisation would turn
    # noise in near-zero gradients into lr-sized differences); gradient clipping, which would hide a wrongly scaled
    # loss, is off.
    settings = yaml.safe_load(TINY.read_text())
    settings["model_config"]["dropout_rate"] = 0.0
    config = tmp_path / "no_dropout.yaml"
    config.write_text(yaml.safe_dump(settings))
    args = ["--config", str(config), "--report_to", "none", "--max_steps", "4", "--eval_every", "100",
            "--checkpoint_every", "100", "--expert_dropout", "0", "--learning_rate", "100", "--adam_epsilon", "1e6",
            "--warmup_steps", "0", "--max_grad_norm", "1e9", *SMALL_DATA]
    glue.main([*args, "--output_dir", str(tmp_path / "whole")])
    glue.main([*args, "--output_dir", str(tmp_path / "accumulated"), "--per_device_batch_size", "4"])
    run_script([*args, "--output_dir", str(tmp_path / "two_processes")], processes=2)

    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    for run in ("accumulated", "two_processes"):
        other = load_file(str(tmp_path / run / "adapter_model.safetensors"))
        for key in whole:
            torch.testing.assert_close(other[key], whole[key], rtol=0, atol=1e-6, msg=lambda m: f"{run} {key}: {m}")
