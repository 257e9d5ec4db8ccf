"""The example scripts' shared command-line rules (smear_peft/scripts.py): every mistake stops with a clear message
and exit code 2 before any file is written, and a script only ever deletes the checkpoints it wrote itself."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smear_peft.recipes import AUTHORS_METHOD_DEFAULTS, authors_expert_dropout
from smear_peft.routing import ROUTING_METHODS
from smear_peft.scripts import (
    CHECKPOINT_MARKER,
    RUN_MARKER,
    checkpoint_dirs,
    parse_settings,
    resolve_checkpoint,
    save_checkpoint,
    start_run,
)

REPO = Path(__file__).resolve().parents[2]
GLUE_TINY = REPO / "examples" / "configs" / "glue_tiny.yaml"
DIGITS = REPO / "examples" / "configs" / "digits.yaml"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example_cli", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


glue, domainnet = load("glue"), load("domainnet")


def snapshot(root: Path) -> dict:
    """Every file and folder under root, with its content: to show that nothing was touched."""
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def user_folder(tmp_path: Path) -> Path:
    """An output folder that holds a user's own files, in checkpoints/ too."""
    output = tmp_path / "run"
    (output / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (output / "checkpoints" / "checkpoint-7" / "weights.pt").write_text("the user's, not ours")
    (output / "checkpoints" / "notes.txt").write_text("mine")
    (output / "paper.tex").write_text("mine too")
    return output


GLUE_BASE = ["--config", str(GLUE_TINY), "--report_to", "none", "--tasks", "[rte, stsb]",
             "--synthetic_data", "{num_train: 8, num_validation: 2}"]
DIGITS_BASE = ["--config", str(DIGITS), "--report_to", "none"]
MISTAKES = [
    (["--max_steps", "0"], "--max_steps must be > 0"),
    (["--eval_every", "0"], "--eval_every must be > 0"),
    (["--log_every", "-1"], "--log_every must be > 0"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be > 0"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--expert_dropout", "1.5"], "--expert_dropout must be in [0, 1)"),
    (["--max_step", "5"], "unrecognized arguments: --max_step"),  # prefixes are not accepted
    (["--push_to_hub", "flase"], "expected true or false, got 'flase'"),
    (["--config", "no/such/file.yaml"], "no such file"),
    (["--routing", "soft"], "--routing must be one of"),
    (["--expert_dropout", "lots"], "--expert_dropout must be a number"),
    (["--batch_size", "100000"], "larger than"),
]


@pytest.mark.parametrize("script", ["glue", "domainnet"])
@pytest.mark.parametrize("argv, message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_every_mistake_exits_2_with_a_message_and_touches_nothing(script, argv, message, tmp_path, capsys):
    output = user_folder(tmp_path)
    before = snapshot(tmp_path)
    module, base = (glue, GLUE_BASE) if script == "glue" else (domainnet, DIGITS_BASE)
    if script == "domainnet" and argv[0] == "--batch_size":
        argv = ["--batch_size", "6000"]  # more than the 1,080 training digits, divisible by the processes
    with pytest.raises(SystemExit) as stopped:
        module.main([*base, *argv, "--output_dir", str(output)])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", ["glue", "domainnet"])
def test_both_scripts_refuse_to_start_afresh_over_an_earlier_run(script, tmp_path, capsys):
    output = user_folder(tmp_path)
    start_run(output, f"{script}.py", True, fresh=True)
    save_checkpoint(FakeAccelerator(), output, 3, keep=2)
    before = snapshot(tmp_path)
    module, base = (glue, GLUE_BASE) if script == "glue" else (domainnet, DIGITS_BASE)
    with pytest.raises(SystemExit) as stopped:
        module.main([*base, "--output_dir", str(output)])
    assert stopped.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_a_wrongly_typed_yaml_value_is_an_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    for text, message in [("push_to_hub: flase\n", "push_to_hub must be true or false"),
                          ("max_steps: 1.5\n", "max_steps must be an integer"),
                          ("learning_rate: fast\n", "learning_rate must be a number"),
                          ("- a list\n", "key: value")]:
        path.write_text(text)
        with pytest.raises(SystemExit) as stopped:
            glue.parse_config(["--config", str(path)])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow  # two interpreter start-ups with torch, transformers and datasets imports
def test_the_exit_code_is_2_for_the_shell_too(tmp_path):
    """One real process per script: argparse's convention reaches the caller."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for script, base in (("glue", GLUE_BASE), ("domainnet", DIGITS_BASE)):
        result = subprocess.run(
            [sys.executable, str(REPO / "examples" / f"{script}.py"), *base, "--max_step", "5",
             "--output_dir", str(tmp_path / script)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 2 and "unrecognized arguments: --max_step" in result.stderr
        assert not (tmp_path / script).exists()


def test_old_knob_names_are_aliases_on_the_command_line_and_in_files(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("lr: 2.0e-3\ngrad_clip_norm: 0.5\nkeep_checkpoints: 3\n")
    for module, extra in ((glue, []), (domainnet, ["--dataset", "digits", "--model_name_or_path", "null"])):
        config = vars(module.parse_config(["--config", str(path), *extra])) if module is domainnet else \
            module.parse_config(["--config", str(path)])
        assert (config["learning_rate"], config["max_grad_norm"], config["checkpoints_total_limit"]) == (2e-3, 0.5, 3)
        config = module.parse_config(["--lr", "0.25", "--grad_clip_norm", "2", *extra])
        config = vars(config) if module is domainnet else config
        assert (config["learning_rate"], config["max_grad_norm"]) == (0.25, 2.0)


def test_both_scripts_share_the_names_and_rules_of_their_common_knobs():
    shared = set(glue.DEFAULTS) & set(domainnet.DEFAULTS)
    for key in ("learning_rate", "max_grad_norm", "checkpoints_total_limit", "checkpoint_every", "eval_every",
                "max_steps", "batch_size", "eval_batch_size", "overwrite_output_dir", "resume_from_checkpoint"):
        assert key in shared
    assert not {"lr", "grad_clip_norm", "keep_checkpoints"} & (set(glue.DEFAULTS) | set(domainnet.DEFAULTS))
    from smear_peft.scripts import RULES

    for module in (glue, domainnet):  # every numeric knob has a rule
        rules = {**RULES, **module.RULES}
        numeric = {k for k, v in module.DEFAULTS.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numeric <= set(rules), numeric - set(rules)


def test_one_table_of_the_authors_per_method_defaults():
    assert set(AUTHORS_METHOD_DEFAULTS) == set(ROUTING_METHODS)
    assert {m: authors_expert_dropout(m) for m in ROUTING_METHODS if authors_expert_dropout(m)} == {
        "smear": 0.1, "top_k": 0.1}
    for path in [REPO / "examples" / "glue.py", REPO / "examples" / "domainnet.py", *REPO.glob("benchmarks/*.py")]:
        assert "EXPERT_DROPOUT" not in path.read_text(), path  # no copies of the table


# -- the deletion rule ------------------------------------------------------------------------------------------------
class FakeAccelerator:
    is_main_process = True

    def save_state(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_text("state")

    def wait_for_everyone(self):
        pass


def test_retention_removes_only_the_scripts_own_checkpoints(tmp_path):
    output = user_folder(tmp_path)
    for step in (10, 20, 30):
        save_checkpoint(FakeAccelerator(), output, step, keep=2)
    assert [p.name for p in checkpoint_dirs(output)] == ["checkpoint-20", "checkpoint-30"]
    assert json.loads((output / "checkpoints" / "checkpoint-30" / CHECKPOINT_MARKER).read_text()) == {"step": 30}
    assert (output / "checkpoints" / "checkpoint-7" / "weights.pt").read_text() == "the user's, not ours"
    assert (output / "checkpoints" / "notes.txt").exists() and (output / "paper.tex").exists()


def test_a_fresh_start_over_an_earlier_run_needs_overwrite_and_then_removes_only_its_checkpoints(tmp_path, capsys):
    output = user_folder(tmp_path)
    assert resolve_checkpoint(output, None, False) is None  # a folder of the user's own files is fine
    start_run(output, "glue.py", True, fresh=True)
    save_checkpoint(FakeAccelerator(), output, 5, keep=2)
    assert (output / RUN_MARKER).exists()
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        resolve_checkpoint(output, None, False)
    assert stopped.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert resolve_checkpoint(output, "latest", False) == output / "checkpoints" / "checkpoint-5"  # resuming is fine
    with pytest.raises(SystemExit):  # a folder that is not one of our checkpoints can't be resumed from
        resolve_checkpoint(output, str(output / "checkpoints" / "checkpoint-7"), False)
    assert resolve_checkpoint(output, None, True) is None
    start_run(output, "glue.py", True, fresh=True)
    assert checkpoint_dirs(output) == []
    assert (output / "checkpoints" / "checkpoint-7" / "weights.pt").exists()
    assert (output / "checkpoints" / "notes.txt").exists() and (output / "paper.tex").exists()


def test_settings_precedence_and_strict_booleans(tmp_path):
    defaults = {"flag": False, "steps": 3, "rate": 0.5, "name": "a", "items": [1], "extra": None}
    path = tmp_path / "s.yaml"
    path.write_text("steps: 4\nrate: 1e-3\nextra: {x: 1}\n")
    settings = parse_settings(defaults, ["--config", str(path), "--steps", "5", "--flag"])
    assert settings == {"flag": True, "steps": 5, "rate": 1e-3, "name": "a", "items": [1], "extra": {"x": 1}}
    assert parse_settings(defaults, ["--flag", "no"])["flag"] is False
    for argv in (["--flag", "maybe"], ["--step", "1"], ["--steps", "1.5"]):
        with pytest.raises(SystemExit) as stopped:
            parse_settings(defaults, argv)
        assert stopped.value.code == 2
