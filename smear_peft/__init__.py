"""smear-peft: SMEAR and routed expert adapters for PEFT.

``import smear_peft`` registers the "SMEAR" PEFT method, after which the usual PEFT API works::

    from peft import get_peft_model, PeftModel
    from smear_peft import SmearConfig

    model = get_peft_model(base_model, SmearConfig(num_experts=8, routing="smear"))
"""

from .architectures import ArchitecturePreset, register_preset, supported_model_types
from .config import SmearConfig
from .hub import push_to_hub
from .layer import SmearLayer
from .model import SmearModel
from .registration import register
from .routing import ROUTING_METHODS

register()

__version__ = "0.1.0"

__all__ = [
    "ArchitecturePreset",
    "ROUTING_METHODS",
    "SmearConfig",
    "SmearLayer",
    "SmearModel",
    "push_to_hub",
    "register_preset",
    "supported_model_types",
]
