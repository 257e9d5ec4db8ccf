"""Launching the example scripts in tests: `accelerate_launch` (offline, on CPU, optionally under a sharding engine)
and `intercept_uploads` (Hub uploads of a launched script copied to a folder instead: nothing leaves the machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from smear_peft.distributed import CPU_SHARDING_ENV

REPO = Path(__file__).resolve().parents[2]


def accelerate_launch(
    script: Path, args: list[str], processes: int = 1, engine_config: Path | None = None,
    env_update: dict | None = None, timeout: int = 900,
) -> subprocess.CompletedProcess:
    """``accelerate launch SCRIPT ARGS`` offline on CPU; fails the test with the output's tail if the script fails.

    Without `engine_config`: ``--cpu`` for one process, ``--multi_gpu`` plus ACCELERATE_USE_CPU=1 for more
    (``accelerate launch --cpu --num_processes 2`` starts a single process). With `engine_config`
    (examples/configs/accelerate_zero3.yaml, ...) the engine runs on CPU processes through the test-only switch
    SMEAR_PEFT_CPU_SHARDING=1 (smear_peft.distributed.make_accelerator), launched without --cpu and ACCELERATE_USE_CPU,
    which would drop it. `env_update`: more environment variables (its PYTHONPATH goes first)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env_update = dict(env_update or {})
    env["PYTHONPATH"] = os.pathsep.join([env_update.pop("PYTHONPATH", ""), str(REPO), env.get("PYTHONPATH", "")])
    env.update(env_update)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", str(processes)]
    if engine_config is not None:
        env.pop("ACCELERATE_USE_CPU", None)
        env[CPU_SHARDING_ENV] = "1"
        launcher += ["--config_file", str(engine_config)]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        launcher += ["--multi_gpu"] if processes > 1 else ["--cpu"]
    result = subprocess.run([*launcher, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return result

SITECUSTOMIZE = '''
import os, shutil
import huggingface_hub


class _Repo:
    def __init__(self, repo_id):
        self.repo_id = repo_id


def _create_repo(self, repo_id, **kwargs):
    return _Repo(repo_id)


def _upload_folder(self, *, repo_id, folder_path, **kwargs):
    target = os.path.join(os.environ["SMEAR_TEST_UPLOADS"], repo_id.replace("/", "--"))
    if os.path.exists(target):
        raise RuntimeError(f"{repo_id} uploaded twice")
    shutil.copytree(folder_path, target)


huggingface_hub.HfApi.create_repo = _create_repo
huggingface_hub.HfApi.upload_folder = _upload_folder
'''


def intercept_uploads(tmp_path: Path) -> tuple[dict, Path]:
    """The `env_update` for `accelerate_launch` (a ``sitecustomize`` module on PYTHONPATH, which every launched
    process imports at start) and the folder where each ``HfApi.upload_folder`` call lands, as
    ``<uploads>/<repo owner>--<repo name>/`` (a second upload to the same repo fails the run)."""
    hooks, uploads = tmp_path / "hub_hooks", tmp_path / "uploads"
    hooks.mkdir()
    uploads.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(hooks), "SMEAR_TEST_UPLOADS": str(uploads)}, uploads
