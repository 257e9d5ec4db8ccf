"""Hub uploads of a launched script, intercepted: nothing leaves the machine, the uploaded folder is copied instead.

`intercept_uploads(tmp_path)` returns the environment for `accelerate launch` (a ``sitecustomize`` module on
PYTHONPATH, which every launched process imports at start) and the folder where each ``HfApi.upload_folder`` call
lands, as ``<uploads>/<repo owner>--<repo name>/``.
"""

from __future__ import annotations

from pathlib import Path

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
    hooks, uploads = tmp_path / "hub_hooks", tmp_path / "uploads"
    hooks.mkdir()
    uploads.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(hooks), "SMEAR_TEST_UPLOADS": str(uploads)}, uploads
