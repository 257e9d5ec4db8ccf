"""The configurations benchmarks/speed.py measures: models built from configs (random weights, nothing
downloaded), each wrapped in a `Case` with its tasks.

Read alone: `SIZES` gives the model and input sizes; `t5_cases`, `resnet_cases` and `causal_cases` build one `Case`
per method (SMEAR's routing methods, and PEFT's LoRA, Poly and X-LoRA where they apply) on a backbone they share,
with the calls each task times.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from peft import LoraConfig, PolyConfig, TaskType, XLoraConfig, get_peft_model
from speed_harness import Case

from smear_peft import SmearConfig
from smear_peft.architectures import find_preset
from smear_peft.recipes import authors_expert_dropout

ROUTING_METHODS = ("monolithic", "tag", "top_k", "smear", "ensemble")
SCALING_EXPERTS = (1, 2, 4, 8, 16, 32)
SCALING_METHODS = ("smear", "top_k", "ensemble")

#: Sizes. ``small`` finishes in minutes on 2 CPU cores; ``paper`` is the authors' setting (run it on a GPU).
SIZES = {
    "small": {
        "t5": dict(layers=4, batch=8, source_len=64, answer_len=6),
        "resnet": dict(image=112, batch=8),
        "causal": dict(layers=4, batch=8, seq_len=64, new_tokens=16),
        "repeats": 7,
    },
    "paper": {
        "t5": dict(layers=12, batch=128, source_len=128, answer_len=6),
        "resnet": dict(image=224, batch=128),
        "causal": dict(layers=12, batch=128, seq_len=128, new_tokens=64),
        "repeats": 10,
    },
}
T5_EXPERTS, T5_BOTTLENECK = 8, 24
RESNET_EXPERTS = 6
#: Expert dropout of the authors' README for the methods that use it (training only).


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``base`` that shares its parameters (the frozen backbone), so many configurations fit in memory.

    Each `Case` re-applies its own ``requires_grad`` flags before a training step (`Case.prepare`)."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


def trainable_of(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_step(model: torch.nn.Module, params: list, lr: float, fused: bool = False) -> Callable[[], None]:
    """AdamW step + ``zero_grad``: torch's default implementation (on CPU a loop over the parameters), or with
    ``fused=True`` the fused kernel (transformers' ``Trainer`` default, ``optim="adamw_torch_fused"``)."""
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True if fused else None)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer
    return step


def generate_without_decode_cache(model, routing_tags=None, **kwargs):
    """``generate`` with smear-peft's decode-time cache switched off: every decoding step routes and merges again."""
    return model.generate(routing_tags=routing_tags, routing_cache=False, **kwargs)


def t5_config(layers: int):
    from transformers import T5Config

    return T5Config(  # T5-v1.1-base
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=layers, num_decoder_layers=layers, num_heads=12,
        feed_forward_proj="gated-gelu", dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        tie_word_embeddings=False,
    )


def smear_config(method: str, num_experts: int, **extra) -> SmearConfig:
    values = dict(num_experts=num_experts, routing=method, expert_dropout=authors_expert_dropout(method))
    values.update(extra)
    return SmearConfig(**values)


def t5_cases(spec: dict, device: torch.device, methods, num_experts: int = T5_EXPERTS, peft_baselines: bool = True,
             nocache: bool = True, tasks=("inference", "training", "generation"), suffix: str = "") -> list[Case]:
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(t5_config(spec["layers"])).to(device).eval()
    batch, source_len, answer_len = spec["batch"], spec["source_len"], spec["answer_len"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 32000, (batch, source_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(source_len // 2, source_len + 1, (batch,), generator=generator)
    attention_mask[torch.arange(source_len)[None] >= lengths[:, None]] = 0  # realistic right padding
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = torch.randint(2, 32000, (batch, answer_len), generator=generator)
    tags = torch.arange(batch) % T5_EXPERTS % num_experts
    inputs = {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention_mask).items()}
    labels, tags = labels.to(device), tags.to(device)
    gen_kwargs = dict(max_new_tokens=answer_len, min_new_tokens=answer_len, do_sample=False, num_beams=1)

    def make(name: str, model, extra: dict, nocache_variant: bool) -> list[Case]:
        trainable = trainable_of(model)
        step = optimizer_step(model, trainable, lr=3e-4)

        def inference() -> None:
            with torch.no_grad():
                model(**inputs, labels=labels, **extra)

        def training() -> None:
            model(**inputs, labels=labels, **extra).loss.backward()
            step()

        def generation() -> None:
            with torch.no_grad():
                model.generate(**inputs, **gen_kwargs, **extra)

        all_tasks = {"inference": inference, "training": training, "generation": generation}
        made = [Case(name + suffix, model, {t: all_tasks[t] for t in tasks}, batch, trainable, step.optimizer)]
        if nocache_variant and "generation" in tasks:
            def generation_nocache() -> None:
                with torch.no_grad():
                    generate_without_decode_cache(model, extra.get("routing_tags"), **inputs, **gen_kwargs)

            made.append(Case(f"{name}_nocache{suffix}", model, {"generation": generation_nocache}, batch, trainable, step.optimizer))
        return made

    cases = []
    for method in methods:
        model = get_peft_model(shared_copy(base), smear_config(method, num_experts, bottleneck_size=T5_BOTTLENECK))
        extra = {"routing_tags": tags} if method == "tag" else {}
        cases += make(method, model, extra, nocache and method in ("smear", "top_k"))
    if peft_baselines:
        targets = ["o", "wo"]  # output projections of the sublayers the routing blocks wrap
        lora = get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=T5_BOTTLENECK, lora_alpha=T5_BOTTLENECK, target_modules=targets))
        cases += make("lora", lora, {}, False)
        poly = get_peft_model(shared_copy(base), PolyConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=T5_BOTTLENECK, target_modules=targets, n_tasks=T5_EXPERTS, n_skills=T5_EXPERTS))
        cases += make("poly", poly, {"task_ids": tags}, False)
    return cases


def resnet_base(spec: dict, device: torch.device):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=345)
    return ResNetForImageClassification(config).to(device).eval()


def resnet_smear_config(method: str, num_experts: int) -> SmearConfig:
    if find_preset("resnet") is not None:
        return smear_config(method, num_experts)
    # Before the resnet preset: the block on each BasicBlock's output (after the residual add, before the final ReLU
    # in the authors' code; here after it), with the authors' C -> 32 -> C experts and input BatchNorm.
    targets = r".*encoder\.stages\.\d+\.layers\.\d+"
    return smear_config(method, num_experts, target_modules=targets, bottleneck_size=32, input_norm="batch_norm", post_norm=False)


def resnet_cases(spec: dict, device: torch.device, methods, num_experts: int = RESNET_EXPERTS, tasks=("inference", "training"), suffix: str = "") -> list[Case]:
    base = resnet_base(spec, device)
    generator = torch.Generator().manual_seed(0)
    batch = spec["batch"]
    pixels = torch.randn(batch, 3, spec["image"], spec["image"], generator=generator).to(device)
    labels = torch.randint(0, 345, (batch,), generator=generator).to(device)
    tags = (torch.arange(batch) % RESNET_EXPERTS % num_experts).to(device)
    cases = []
    for method in methods:
        model = get_peft_model(shared_copy(base), resnet_smear_config(method, num_experts))
        trainable = trainable_of(model)
        step = optimizer_step(model, trainable, lr=1e-3)
        extra = {"routing_tags": tags} if method == "tag" else {}

        def inference(model=model, extra=extra) -> None:
            with torch.no_grad():
                model(pixel_values=pixels, **extra)

        def training(model=model, extra=extra, step=step) -> None:
            model(pixel_values=pixels, labels=labels, **extra).loss.backward()
            step()

        all_tasks = {"inference": inference, "training": training}
        cases.append(Case(method + suffix, model, {t: all_tasks[t] for t in tasks}, batch, trainable, step.optimizer))
    return cases


def causal_cases(spec: dict, device: torch.device, workdir: str) -> list[Case]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # a decoder with the T5-v1.1-base width
        vocab_size=32128, hidden_size=768, intermediate_size=2048, num_hidden_layers=spec["layers"], num_attention_heads=12,
        num_key_value_heads=12, use_cache=False,  # X-LoRA requires use_cache=False; the same for every method
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device).eval()
    batch, seq_len = spec["batch"], spec["seq_len"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 32000, (batch, seq_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    # Instruction tuning: the first half of each sequence is the prompt (labels -100), which SMEAR's causal prompt
    # routing reads; the same labels for every method.
    labels = input_ids.masked_fill(torch.arange(seq_len, device=device) < seq_len // 2, -100)
    prompt, prompt_mask = input_ids[:, : seq_len // 2], attention_mask[:, : seq_len // 2]
    tags = (torch.arange(batch) % T5_EXPERTS).to(device)
    targets = ["o_proj", "down_proj"]
    models = {}
    for method in ("monolithic", "smear"):
        cfg = smear_config(method, T5_EXPERTS, bottleneck_size=T5_BOTTLENECK, target_modules=targets, task_type="CAUSAL_LM")
        models[method] = (get_peft_model(shared_copy(base), cfg), {})
    models["lora"] = (get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=T5_BOTTLENECK, lora_alpha=T5_BOTTLENECK, target_modules=targets)), {})
    models["poly"] = (get_peft_model(shared_copy(base), PolyConfig(task_type=TaskType.CAUSAL_LM, r=T5_BOTTLENECK, target_modules=targets, n_tasks=T5_EXPERTS, n_skills=T5_EXPERTS)), {"task_ids": tags})
    adapters = {}
    for index in range(T5_EXPERTS):  # X-LoRA loads its LoRA experts from disk; names must be "0".."N-1"
        torch.manual_seed(100 + index)
        expert = get_peft_model(shared_copy(base), LoraConfig(task_type=TaskType.CAUSAL_LM, r=T5_BOTTLENECK, lora_alpha=T5_BOTTLENECK, target_modules=targets, init_lora_weights=False))
        path = os.path.join(workdir, f"lora_expert_{index}")
        expert.save_pretrained(path)
        adapters[str(index)] = path
        del expert
    xlora_config = XLoraConfig(task_type=TaskType.CAUSAL_LM, hidden_size=768, adapters=adapters, xlora_depth=1)
    models["xlora"] = (get_peft_model(shared_copy(base), xlora_config), {})
    cases = []
    for name, (model, extra) in models.items():
        trainable = trainable_of(model)
        step = optimizer_step(model, trainable, lr=3e-4)

        def inference(model=model, extra=extra) -> None:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)

        def training(model=model, extra=extra, step=step) -> None:
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra).loss.backward()
            step()

        def generation(model=model) -> None:  # greedy, KV cache on; SMEAR routes once on the prompt
            with torch.no_grad():
                model.generate(
                    input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=spec["new_tokens"],
                    min_new_tokens=spec["new_tokens"], do_sample=False,
                    use_cache=True, pad_token_id=0,
                )

        tasks = {"inference": inference, "training": training}
        if name in ("monolithic", "smear", "lora"):  # Poly needs task ids in generate; X-LoRA disables the KV cache
            tasks["generation"] = generation
        cases.append(Case(name, model, tasks, batch, trainable, step.optimizer))
    return cases
