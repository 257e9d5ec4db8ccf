"""Registering the "SMEAR" method with PEFT: the one place where smear-peft extends PEFT at import time.

PEFT 0.21 has no plugin mechanism: `peft.register_peft_method` only accepts names already in its closed `PeftType`
enum. We therefore

1. check that the installed PEFT is a version this extension was verified against (`SUPPORTED_PEFT`), since step 2
   relies on how its enum is built;
2. add a ``SMEAR`` member to `PeftType` (so configs, checkpoints and model cards carry ``"peft_type": "SMEAR"``);
3. call `register_peft_method`, which fills PEFT's config / tuner / prefix mappings.

Nothing else of PEFT is touched: its classes, methods and mappings behave exactly as before for every other method
(`tests/test_registration.py` checks LoRA's save, push_to_hub and get_peft_model with each task type before and after
the import). Every step is idempotent. Loading a SMEAR adapter needs ``import smear_peft`` first; without it PEFT raises
``KeyError: 'SMEAR'`` (see the README).
"""

from __future__ import annotations

import peft
from packaging.version import Version
from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

from .config import SmearConfig
from .model import SmearModel

PEFT_TYPE_NAME = "SMEAR"
#: PEFT versions the registration was verified against: ``[minimum, maximum)``.
SUPPORTED_PEFT = ("0.21.0", "0.22.0")


def check_peft_version(version: str = peft.__version__) -> None:
    low, high = SUPPORTED_PEFT
    if not Version(low) <= Version(Version(version).base_version) < Version(high):
        raise ImportError(
            f"smear-peft supports peft>={low},<{high} (it extends PEFT's closed PeftType enum, whose layout it checks "
            f"per version); found peft {version}. Install a supported version: pip install 'peft>={low},<{high}'."
        )


def _add_peft_type_member(name: str) -> PeftType:
    """Extend `PeftType` (a ``str`` enum) with a member, as if it had been declared in PEFT."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register() -> None:
    """Make "SMEAR" a PEFT method (idempotent)."""
    check_peft_version()
    peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=SmearConfig, model_cls=SmearModel, prefix=SmearModel.prefix)
