"""What the example scripts (``examples/glue.py``, ``examples/domainnet.py``) do the same way.

* **Settings**: a script's ``DEFAULTS``, updated by the YAML file of ``--config``, updated by the command line
  (`parse_settings`). Every key is a flag; flags must be spelled out (no prefixes); booleans accept only
  true/false/yes/no/1/0; numbers are validated against one rule per key (`RULES`) before anything is written.
  Mistakes exit with status 2 and a one-line message, as argparse does.
* **Output folder**: a script never deletes what it did not write. It marks its run (`RUN_MARKER`) and each
  checkpoint (`CHECKPOINT_MARKER`); starting afresh in a folder that holds an earlier run needs
  ``--overwrite_output_dir``, which removes only that run's marked checkpoints (`prepare_output_dir`).
* **Checkpoints**: ``<output_dir>/checkpoints/checkpoint-<step>/`` written by ``accelerator.save_state``, the newest
  ``checkpoints_total_limit`` kept (`save_checkpoint`, `load_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import yaml

# Old names still accepted, on the command line and in YAML files.
ALIASES = {"lr": "learning_rate", "grad_clip_norm": "max_grad_norm", "keep_checkpoints": "checkpoints_total_limit"}

RUN_MARKER = "smear_peft_run.json"  # in output_dir: a run of an example script started here
CHECKPOINT_MARKER = "smear_peft_checkpoint.json"  # in each checkpoint folder the script wrote: {"step": N}


# -- numeric rules ------------------------------------------------------------------------------------------------
def positive(value) -> bool:
    return value > 0


def non_negative(value) -> bool:
    return value >= 0


def probability(value) -> bool:  # [0, 1)
    return 0 <= value < 1


RULE_TEXT = {positive: "> 0", non_negative: ">= 0", probability: "in [0, 1)"}

# The rule of every numeric knob the two scripts share; a script adds its own (`parse_settings(rules=...)`).
# A None value (where a default is None) is always allowed.
RULES: dict[str, Callable] = {
    "num_experts": positive,
    "expert_dropout": probability,
    "max_steps": positive,
    "batch_size": positive,
    "per_device_batch_size": positive,
    "eval_batch_size": positive,
    "learning_rate": positive,
    "weight_decay": non_negative,
    "max_grad_norm": positive,
    "eval_every": positive,
    "log_every": positive,
    "checkpoint_every": positive,
    "checkpoints_total_limit": positive,
    "seed": non_negative,
    "sampler_seed": non_negative,
}


def usage_error(message: str, prog: Optional[str] = None) -> None:
    """Print ``prog: error: message`` to stderr and exit with status 2 (argparse's convention)."""
    prog = prog or os.path.basename(sys.argv[0]) or "script"
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def yaml_value(text: str):
    """A command-line value read as YAML (lists, dicts, null), numbers written like ``3e-4`` included."""
    return _yaml_number(yaml.safe_load(text))


def _yaml_number(value):
    """YAML 1.1 (PyYAML) reads ``3e-4`` as a string (it wants ``3.0e-4``): read it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(key: str, value, default):
    """A YAML file's value for ``key``, with the type of its default; ValueError when it has another type."""
    if value is None or default is None:
        return _yaml_number(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        value = _yaml_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    if isinstance(default, (list, dict)) and not isinstance(value, type(default)):
        raise ValueError(f"{key} must be a {type(default).__name__}, got {value!r}")
    return value


def read_config_file(path: str, defaults: dict) -> dict:
    """The keys of a YAML settings file. A one-level section whose name is not a key (``pretrain: {steps: 300}``)
    sets the keys ``pretrain_<name>``. Raises ValueError with the fix on any mistake."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected `key: value` lines")
    flat = {}
    for key, value in raw.items():
        key = ALIASES.get(key, key)
        if key not in defaults and isinstance(value, dict):
            flat.update({f"{key}_{inner}": inner_value for inner, inner_value in value.items()})
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(defaults))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(defaults)}")
    return {key: _coerce(key, value, defaults[key]) for key, value in flat.items()}


def parse_settings(
    defaults: dict,
    argv: Optional[list[str]] = None,
    description: Optional[str] = None,
    rules: Optional[dict[str, Callable]] = None,
    prog: Optional[str] = None,
) -> dict:
    """``defaults`` < the YAML file of ``--config`` < command-line flags; every numeric value checked by its rule.

    Each key of ``defaults`` is a flag ``--key``; its aliases (`ALIASES`) too. A boolean flag alone means true
    (``--push_to_hub``); None, list and dict values are read as YAML (``--tasks "[rte, mnli]"``). Exits with status 2
    and a message on any mistake.
    """
    rules = {**RULES, **(rules or {})}
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML file with any of the keys below; command-line flags override it")
    old_names = {new: old for old, new in ALIASES.items()}
    for key, default in defaults.items():
        if isinstance(default, bool):
            kind = dict(nargs="?", const=True, type=parse_bool)  # `--push_to_hub` or `--push_to_hub false`
        elif isinstance(default, (int, float, str)):
            kind = dict(type=type(default))
        else:  # None, lists and dicts: YAML
            kind = dict(type=yaml_value)
        names = [f"--{key}"] + ([f"--{old_names[key]}"] if key in old_names else [])
        parser.add_argument(*names, dest=key, default=argparse.SUPPRESS, help=f"default: {default!r}", **kind)
    args = vars(parser.parse_args(argv))
    settings = dict(defaults)
    path = args.pop("config", None)
    if path:
        try:
            settings.update(read_config_file(path, defaults))
        except ValueError as error:
            parser.error(str(error))
    settings.update(args)
    for key, value in settings.items():
        rule = rules.get(key)
        if rule is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            parser.error(f"--{key} must be a number, got {value!r}")
        if isinstance(value, float) and math.isnan(value) or not rule(value):
            parser.error(f"--{key} must be {RULE_TEXT.get(rule, 'valid')}, got {value!r}")
    return settings


# -- output folder and checkpoints -------------------------------------------------------------------------------
def checkpoint_dirs(output_dir) -> list[Path]:
    """The checkpoints this script wrote under ``output_dir/checkpoints`` (those with `CHECKPOINT_MARKER`), oldest
    first. Anything else there is the user's and is never listed, hence never removed."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        marker = path / CHECKPOINT_MARKER
        if path.is_dir() and marker.is_file():
            try:
                found.append((int(json.loads(marker.read_text())["step"]), path))
            except (ValueError, KeyError, TypeError):
                continue
    return [path for _, path in sorted(found)]


def holds_previous_run(output_dir) -> bool:
    return (Path(output_dir) / RUN_MARKER).is_file() or bool(checkpoint_dirs(output_dir))


def resolve_checkpoint(output_dir, resume_from_checkpoint: Optional[str], overwrite_output_dir: bool) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh start; exits with status 2, having touched nothing, when
    the request can't be met: a named checkpoint that isn't one of ours, or a fresh start in a folder that holds an
    earlier run without ``--overwrite_output_dir``. ``"latest"`` with no checkpoint yet starts afresh."""
    if resume_from_checkpoint and resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not (path / CHECKPOINT_MARKER).is_file():
            usage_error(f"--resume_from_checkpoint {path}: not a checkpoint written by this script (no {CHECKPOINT_MARKER})")
        return path
    if resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        if found:
            return found[-1]
    if holds_previous_run(output_dir) and not overwrite_output_dir:
        usage_error(
            f"{output_dir} holds an earlier run. Resume it with --resume_from_checkpoint latest, start afresh with "
            "--overwrite_output_dir (removes only that run's checkpoints), or choose another --output_dir."
        )
    return None


def start_run(output_dir, script: str, is_main_process: bool, fresh: bool) -> None:
    """Mark ``output_dir`` as holding a run of ``script``. A fresh start first removes the earlier run's
    checkpoints, the ones it marked; nothing else."""
    if not is_main_process:
        return
    output_dir = Path(output_dir)
    if fresh:
        for path in checkpoint_dirs(output_dir):
            shutil.rmtree(path)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_MARKER).write_text(json.dumps({"script": script}) + "\n")


def save_checkpoint(accelerator, output_dir, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into ``checkpoints/checkpoint-<step>``, marked; then only the newest ``keep`` of
    this script's checkpoints remain."""
    path = Path(output_dir) / "checkpoints" / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}) + "\n")
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, path) -> int:
    """``accelerator.load_state(path)``; returns the step it was saved at."""
    accelerator.load_state(str(path))
    return int(json.loads((Path(path) / CHECKPOINT_MARKER).read_text())["step"])
