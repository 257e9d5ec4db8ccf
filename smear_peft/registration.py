"""Registering the "SMEAR" method with PEFT: the one place where smear-peft extends PEFT at import time.

PEFT 0.21 has no plugin mechanism: `peft.register_peft_method` only accepts names already in its closed `PeftType`
enum. We therefore

1. add a ``SMEAR`` member to `PeftType` (so configs, checkpoints and model cards carry ``"peft_type": "SMEAR"``);
2. call `register_peft_method`, which fills PEFT's config / tuner / prefix mappings;
3. route `PeftModel.push_to_hub` to `smear_peft.hub.push_to_hub` for SMEAR adapters only (the inherited transformers
   method replaces PEFT's model card with a generic one); other PEFT methods keep PEFT's behaviour.

Every step is idempotent. Loading a SMEAR adapter needs ``import smear_peft`` first; without it PEFT raises
``KeyError: 'SMEAR'`` (see the README).
"""

from __future__ import annotations

from peft import PeftModel
from peft.utils.peft_types import register_peft_method
from peft.utils import PeftType

from . import hub
from .config import SmearConfig
from .model import SmearModel

PEFT_TYPE_NAME = "SMEAR"


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


def _smear_aware_push_to_hub(original):
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if hub.is_smear_model(self):
            return hub.push_to_hub(self, repo_id, *args, **kwargs)
        return original(self, repo_id, *args, **kwargs)

    push_to_hub.__doc__ = original.__doc__
    push_to_hub._smear_original = original
    return push_to_hub


def register() -> None:
    """Make "SMEAR" a PEFT method (idempotent)."""
    peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=SmearConfig, model_cls=SmearModel, prefix=SmearModel.prefix)
    if not hasattr(PeftModel.push_to_hub, "_smear_original"):
        PeftModel.push_to_hub = _smear_aware_push_to_hub(PeftModel.push_to_hub)
