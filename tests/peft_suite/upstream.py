"""PEFT's own test suite, from the source distribution of the installed PEFT version (never copied into this repo).

`load()` makes the sdist's ``tests/`` folder importable as the package ``peft_upstream_tests`` (PEFT's test modules
use relative imports, and our own ``tests`` package name is taken):

1. the folder is cached in ``$SMEAR_PEFT_TEST_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/smear-peft/peft-tests-<version>``,
   outside the repository; once there, nothing is fetched again (offline);
2. otherwise ``pip download --no-deps --no-binary :all: peft==<installed>`` fetches the sdist and its ``tests/`` folder
   is unpacked into the cache;
3. if that fails (no package registry), `load` raises `PeftSuiteUnavailable` with the reason: the conformance tests
   fail loudly at collection, they are never skipped.

PEFT's ``testing_common.py`` imports ``diffusers`` only for an ``isinstance`` check in a test we do not run; without
diffusers installed a stub module with that one class stands in for it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path
from unittest import mock

PACKAGE = "peft_upstream_tests"
#: Files of PEFT's tests/ folder that the conformance tests import.
REQUIRED = ("testing_common.py", "testing_utils.py", "test_custom_models.py", "test_encoder_decoder_models.py", "test_decoder_models.py")


class PeftSuiteUnavailable(RuntimeError):
    """PEFT's test suite could not be fetched; the message says why and how to provide it."""


def peft_version() -> str:
    return importlib.metadata.version("peft")


def cache_dir(version: str | None = None) -> Path:
    version = version or peft_version()
    explicit = os.environ.get("SMEAR_PEFT_TEST_CACHE")
    if explicit:
        return Path(explicit).expanduser() / f"peft-tests-{version}"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "smear-peft" / f"peft-tests-{version}"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def fetch(version: str | None = None) -> Path:
    """The cached ``tests/`` folder of PEFT ``version`` (the installed one by default), fetched on first use."""
    version = version or peft_version()
    target = cache_dir(version)
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            f"peft=={version}", "-d", tmp,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob(f"peft-{version}.tar.gz"))
        if result.returncode != 0 or not archives:
            raise PeftSuiteUnavailable(
                f"Could not fetch PEFT {version}'s source distribution, which holds the PEFT test suite that "
                f"tests/peft_suite runs against SMEAR.\n  command: {' '.join(command)}\n  exit code: "
                f"{result.returncode}\n  pip said: {(result.stderr or result.stdout).strip()[-2000:]}\n"
                f"Fix: allow access to the package registry once, or unpack the tests/ folder of peft-{version}.tar.gz "
                f"into {target} (or a folder named peft-tests-{version} under $SMEAR_PEFT_TEST_CACHE)."
            )
        unpacked = Path(tmp) / "tests"
        prefix = f"peft-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):] or "."
            try:
                archive.extractall(unpacked, members=members, filter="data")
            except TypeError:  # Python < 3.11.4 / 3.10.12: no extraction filters (members are plain files and dirs)
                archive.extractall(unpacked, members=members)
        if not _complete(unpacked):
            raise PeftSuiteUnavailable(f"peft-{version}.tar.gz has no complete tests/ folder (need {', '.join(REQUIRED)}).")
        try:
            os.replace(unpacked, target)  # atomic: a concurrent run may have won the race, which is fine
        except OSError:
            if not _complete(target):
                raise
    return target


def _stub_diffusers() -> None:
    try:
        importlib.import_module("diffusers")
    except ImportError:
        stub = types.ModuleType("diffusers")
        stub.__doc__ = "Stub for PEFT's testing_common (isinstance check only); diffusers is not installed."

        class StableDiffusionPipeline:  # never instantiated
            pass

        stub.StableDiffusionPipeline = StableDiffusionPipeline
        sys.modules["diffusers"] = stub


@contextlib.contextmanager
def offline(model_id: str = ""):
    """Stands in for PEFT's ``hub_online_once``, which turns the Hub *on* for each model id's first use: our models
    are built from configs, so the Hub stays off (no network timeouts, no downloads)."""
    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}),
        mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True),
        mock.patch("transformers.utils.hub.is_offline_mode", lambda: True),
    ):
        yield


def load(module: str) -> types.ModuleType:
    """Import ``module`` (e.g. ``"testing_common"``) from PEFT's fetched test suite."""
    if PACKAGE not in sys.modules:
        folder = fetch()
        _stub_diffusers()
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        package.__file__ = str(folder / "__init__.py")
        package.__doc__ = f"PEFT {peft_version()}'s tests/ folder (from its sdist, cached in {folder})."
        sys.modules[PACKAGE] = package
    loaded = importlib.import_module(f"{PACKAGE}.{module}")
    for name, value in list(sys.modules.items()):
        if name.startswith(PACKAGE + ".") and hasattr(value, "hub_online_once"):
            value.hub_online_once = offline
    return loaded
