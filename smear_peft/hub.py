"""Model cards and Hub uploads for SMEAR adapters.

`PeftModel.push_to_hub` is transformers' generic one: it saves the adapter, then replaces PEFT's README with a
generic transformers card. For SMEAR adapters smear-peft routes it to `push_to_hub` below (see `registration.py`),
which uploads the adapter with a card naming smear-peft, the routing method, the experts and the base model.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from huggingface_hub import HfApi, ModelCard

CARD_SECTION_HEADING = "## SMEAR adapter"


def is_smear_model(peft_model) -> bool:
    config = getattr(peft_model, "active_peft_config", None)
    return getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)) == "SMEAR"


def write_model_card(peft_model, output_dir: str) -> ModelCard:
    """Add the SMEAR section and tags to the README that `save_pretrained` wrote in ``output_dir``."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("---\nlibrary_name: peft\n---\n")
    config = peft_model.active_peft_config
    base_model = config.base_model_name_or_path or getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None) or "unknown"
    num_blocks = sum(1 for _ in peft_model.base_model.smear_layers())
    tags = set(card.data.tags or []) | {"smear-peft", "smear", "mixture-of-experts", f"routing:{config.routing}"}
    card.data.tags = sorted(tags)
    card.data.library_name = "peft"
    if base_model != "unknown":
        card.data.base_model = base_model
    section = "\n".join(
        [
            CARD_SECTION_HEADING,
            "",
            "Routed expert adapters trained with [smear-peft](https://github.com/smear-peft/smear-peft) "
            "(SMEAR: Soft Merging of Experts with Adaptive Routing, Muqeeth, Liu & Raffel, TMLR 2023).",
            "",
            f"- Base model: `{base_model}`",
            f"- Routing: `{config.routing}`",
            f"- Experts per block: {config.num_experts}",
            *(
                [
                    f"- Routing blocks: {num_blocks} (sublayers: {', '.join(config.sublayers)})",
                    f"- Bottleneck: {config.bottleneck_size or f'hidden size // {config.reduction_factor}'}",
                ]
                if getattr(config, "expert_type", "adapter") == "adapter"
                else [
                    f"- Experts: {config.expert_type}" + (f" (r={config.r}, lora_alpha={config.lora_alpha})" if config.expert_type == "lora" else ""),
                    f"- Routed Linear layers: {num_blocks}",
                ]
            ),
            f"- Expert dropout: {config.expert_dropout}; pooling: `{config.pooling}`",
            "",
            "```python",
            "import smear_peft  # registers the SMEAR method with PEFT; needed before loading",
            "from peft import PeftModel",
            "",
            f'model = PeftModel.from_pretrained(base_model, "{getattr(peft_model, "_smear_repo_id", "<repo id>")}")',
            "```",
        ]
    )
    text = card.text
    if CARD_SECTION_HEADING in text:
        text = text[: text.index(CARD_SECTION_HEADING)].rstrip() + "\n"
    card.text = text.rstrip() + "\n\n" + section + "\n"
    card.save(path)
    return card


def push_to_hub(
    peft_model,
    repo_id: str,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    **save_kwargs,
):
    """Save the adapter, write its model card and upload the folder to ``repo_id``."""
    save_kwargs.pop("tags", None)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, **save_kwargs)
        peft_model._smear_repo_id = repo_id
        write_model_card(peft_model, folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload SMEAR adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
