"""Model cards and Hub uploads for SMEAR adapters, without patching PEFT.

* ``save_pretrained`` writes PEFT's README; `SmearConfig.save_pretrained` (called by PEFT right after it) adds the
  SMEAR section and tags, so a saved folder uploaded with ``huggingface_hub.upload_folder`` carries them.
* ``model.push_to_hub(repo)`` is PEFT's (inherited from transformers) and behaves as for every PEFT method: transformers
  replaces the README with its generic card. `push_to_hub` below uploads the adapter with the SMEAR card instead:
  ``smear_peft.push_to_hub(model, repo)``.
* A folder already saved (under FSDP / ZeRO-3: by `smear_peft.distributed.save_adapter`, gathered on every process)
  is uploaded as it is, with the SMEAR card: ``smear_peft.hub.push_saved_adapter(folder, repo)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable, Optional

from huggingface_hub import HfApi, ModelCard

CARD_SECTION_HEADING = "## SMEAR adapter"


def is_smear_model(peft_model) -> bool:
    config = getattr(peft_model, "active_peft_config", None)
    return getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)) == "SMEAR"


def card_section(config, repo_id: Optional[str] = None, num_blocks: Optional[int] = None) -> str:
    """The SMEAR section of an adapter's model card (``## SMEAR adapter``)."""
    base_model = config.base_model_name_or_path or "unknown"
    lines = [
        CARD_SECTION_HEADING,
        "",
        "Routed expert adapters trained with [smear-peft](https://github.com/smear-peft/smear-peft) "
        "(SMEAR: Soft Merging of Experts with Adaptive Routing, Muqeeth, Liu & Raffel, TMLR 2023).",
        "",
        f"- Base model: `{base_model}`",
        f"- Routing: `{config.routing}`",
        f"- Experts per block: {config.num_experts}",
    ]
    if getattr(config, "expert_type", "adapter") == "adapter":
        if num_blocks is not None:
            lines.append(f"- Routing blocks: {num_blocks} (sublayers: {', '.join(config.sublayers)})")
        lines.append(f"- Bottleneck: {config.bottleneck_size or f'hidden size // {config.reduction_factor}'}")
    else:
        lora = f" (r={config.r}, lora_alpha={config.lora_alpha})" if config.expert_type == "lora" else ""
        lines.append(f"- Experts: {config.expert_type}{lora}")
        if num_blocks is not None:
            lines.append(f"- Routed Linear layers: {num_blocks}")
    lines += [
        f"- Expert dropout: {config.expert_dropout}; pooling: `{config.pooling}`",
        "",
        "```python",
        "import smear_peft  # registers the SMEAR method with PEFT; needed before loading",
        "from peft import PeftModel",
        "",
        f'model = PeftModel.from_pretrained(base_model, "{repo_id or "<repo id>"}")',
        "```",
    ]
    return "\n".join(lines)


def add_card_section(output_dir: str, config, repo_id: Optional[str] = None, num_blocks: Optional[int] = None) -> None:
    """Add (or replace) the SMEAR section and tags in the README that PEFT's ``save_pretrained`` wrote."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.exists(path):
        return
    card = ModelCard.load(path)
    card.data.tags = sorted(set(card.data.tags or []) | {"smear-peft", "smear", "mixture-of-experts", f"routing:{config.routing}"})
    card.data.library_name = "peft"
    if config.base_model_name_or_path:
        card.data.base_model = config.base_model_name_or_path
    text = card.text
    if CARD_SECTION_HEADING in text:
        text = text[: text.index(CARD_SECTION_HEADING)].rstrip() + "\n"
    card.text = text.rstrip() + "\n\n" + card_section(config, repo_id, num_blocks) + "\n"
    card.save(path)


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
    """Save the adapter, write its model card and upload the folder to ``repo_id``.

    This saves the module in this process: under FSDP / ZeRO-3, where it holds shards, save with
    `smear_peft.distributed.save_adapter` on every process and upload that folder with `push_saved_adapter`."""
    save_kwargs.pop("tags", None)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, **save_kwargs)
        return push_saved_adapter(
            folder, repo_id, num_blocks=sum(1 for _ in peft_model.base_model.smear_layers()),
            commit_message=commit_message, commit_description=commit_description, private=private, token=token,
            revision=revision, create_pr=create_pr,
        )


#: What `push_saved_adapter` uploads from a saved folder (the rest, e.g. checkpoints and logs, stays local).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def push_saved_adapter(
    saved_dir: str,
    repo_id: str,
    *,
    num_blocks: Optional[int] = None,
    extra_files: Iterable[str] = (),
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
):
    """Upload the adapter saved in ``saved_dir`` (its `ADAPTER_FILES`, plus ``extra_files`` named relative to it) to
    ``repo_id``, with the SMEAR section of the model card. Nothing else in the folder is uploaded.

    The folder is what was saved, e.g. by `smear_peft.distributed.save_adapter`, which gathers sharded parameters on
    every process: the upload never reads the model. Its tensors are checked first
    (`smear_peft.distributed.verify_saved_adapter`): a missing or empty adapter raises instead of being uploaded."""
    from peft import PeftConfig

    from .distributed import verify_saved_adapter

    verify_saved_adapter(saved_dir)
    missing = [name for name in extra_files if not os.path.isfile(os.path.join(saved_dir, name))]
    if missing:
        raise FileNotFoundError(f"{saved_dir} has no {', '.join(missing)} to upload with the adapter.")
    config = PeftConfig.from_pretrained(saved_dir)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        for name in [*ADAPTER_FILES, *extra_files]:
            if os.path.isfile(os.path.join(saved_dir, name)):
                shutil.copy2(os.path.join(saved_dir, name), os.path.join(folder, name))
        add_card_section(folder, config, repo_id, num_blocks)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload SMEAR adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
