"""Two gloo processes on CPU: sharded training steps of tiny SMEAR models compared with one process.

Run by ``tests/test_distributed.py`` (``python tests/distributed_worker.py OUT.json SCENARIO...``); each scenario is
``engine:model:routing`` with engine ``fsdp2`` (``fully_shard`` on every module owning adapter parameters, every
transformer block and the root), ``fsdp1`` / ``fsdp1_orig`` (``FullyShardedDataParallel`` with PEFT's
``fsdp_auto_wrap_policy``, ``use_orig_params`` False / True) or ``bn_sync`` (BatchNorm statistics after
`smear_peft.distributed.sync_batch_norm_statistics`).

The reference is computed in every process on an unsharded copy of the same model: the global batch split into the
ranks' micro-batches, the micro-batch losses averaged (what data parallelism computes; with BatchNorm in training
mode each micro-batch is normalised by its own statistics, as under DDP). Rank 0 writes the largest differences.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = 2
MICRO_BATCH = 2


def build(model_name: str, routing: str):
    import transformers
    from peft import get_peft_model

    from smear_peft import SmearConfig

    torch.manual_seed(0)
    values = dict(num_experts=3, reduction_factor=4, routing=routing, init_weights=False)
    if model_name == "t5":
        config = transformers.T5Config(
            vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            dropout_rate=0.0, tie_word_embeddings=False,
        )
        base = transformers.T5ForConditionalGeneration(config)
        # FSDP2 refuses a parameter shared by two modules in different units; T5 in transformers 5 keeps the encoder's
        # and decoder's embed_tokens as modules sharing `shared.weight` (the documented workaround).
        base.encoder.embed_tokens = base.shared
        base.decoder.embed_tokens = base.shared
    else:
        config = transformers.ResNetConfig(layer_type="basic", depths=[2, 2], hidden_sizes=[8, 16], embedding_size=8,
                                           num_labels=3)
        base = transformers.ResNetForImageClassification(config)
        values["modules_to_save"] = ["classifier"]
    model = get_peft_model(base, SmearConfig(**values))
    model.train()
    return model


def batch(model_name: str, rank: int) -> dict:
    generator = torch.Generator().manual_seed(100 + rank)
    if model_name == "t5":
        return {
            "input_ids": torch.randint(2, 64, (MICRO_BATCH, 6), generator=generator),
            "attention_mask": torch.ones(MICRO_BATCH, 6, dtype=torch.long),
            "labels": torch.randint(2, 64, (MICRO_BATCH, 3), generator=generator),
        }
    return {"pixel_values": torch.randn(MICRO_BATCH, 3, 16, 16, generator=generator),
            "labels": torch.randint(0, 3, (MICRO_BATCH,), generator=generator)}


def loss_of(model: nn.Module, model_name: str, rank: int) -> torch.Tensor:
    from smear_peft.losses import (
        per_example_classification_loss,
        per_example_seq2seq_loss,
        reinforce_loss,
    )

    inputs = batch(model_name, rank)
    torch.manual_seed(1000 + rank)  # sampled routing (reinforce) draws the same experts as the reference
    out = model(**inputs)
    per_example = (per_example_seq2seq_loss if model_name == "t5" else per_example_classification_loss)(
        out.logits, inputs["labels"]
    )
    return out.loss + reinforce_loss(out, per_example)


def reference_step(model: nn.Module, model_name: str) -> tuple[float, dict]:
    losses = [loss_of(model, model_name, r) for r in range(WORLD)]
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), grads


def adapter_units(model: nn.Module) -> list[nn.Module]:
    """Every module owning trainable adapter parameters: routers, experts, baselines, norms, trained heads."""
    from smear_peft import SmearLayer

    units = []
    for module in model.modules():
        if isinstance(module, SmearLayer):
            for attribute in module.adapter_layer_names:
                units += list(getattr(module, attribute).values())
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) and module not in units:
            units.append(module)  # e.g. the trained classifier copy (modules_to_save)
    return units


def max_diff(got: dict, want: dict) -> tuple[float, float, list]:
    missing = sorted(set(want) ^ set(got))
    worst = scale = 0.0
    for name, value in want.items():
        if name in got:
            worst = max(worst, (got[name].float() - value.float()).abs().max().item())
            scale = max(scale, value.abs().max().item())
    return worst, scale, missing


def run_fsdp2(model_name: str, routing: str, rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = build(model_name, routing)
    reference = copy.deepcopy(model)
    ref_loss, ref_grads = reference_step(reference, model_name)
    units = adapter_units(model)
    blocks = [m for m in model.modules() if type(m).__name__ in ("T5Block", "ResNetBasicLayer")]
    for module in units + blocks:
        fully_shard(module)
    fully_shard(model)
    loss = loss_of(model, model_name, rank)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None:
            grads[name] = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
    worst, scale, missing = max_diff(grads, ref_grads)
    return {"loss": total.item() / WORLD, "ref_loss": ref_loss, "grad_diff": worst, "grad_scale": scale,
            "missing": missing, "units": len(units), "sharded": sum(hasattr(p, "full_tensor") for p in model.parameters())}


def run_fsdp1(model_name: str, routing: str, rank: int, use_orig_params: bool) -> dict:
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = build(model_name, routing)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    ref_loss, ref_grads = reference_step(reference, model_name)
    sharded = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"),
                   use_orig_params=use_orig_params)
    units = sum(isinstance(m, FSDP) for m in sharded.modules())
    loss = loss_of(sharded, model_name, rank)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    # One SGD step with lr=1: parameter change == -gradient, read back from the full state dict.
    optimizer = torch.optim.SGD([p for p in sharded.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()
    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        state = sharded.state_dict()
    grads = {n: before[n] - state[n] for n in before if n in state}
    grads = {n: g for n, g in grads.items() if n in ref_grads or g.abs().max() > 0}
    worst, scale, missing = max_diff(grads, ref_grads)
    return {"loss": total.item() / WORLD, "ref_loss": ref_loss, "grad_diff": worst, "grad_scale": scale,
            "missing": missing, "units": units}


def run_bn_sync(mode: str, rank: int) -> dict:
    """Backbone and adapter BatchNorm statistics after one training forward per rank, then synchronised."""
    from smear_peft.distributed import batch_norm_statistics, sync_batch_norm_statistics

    model = build("resnet", "smear")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        loss_of(model, "resnet", rank)
    local = {n: t.clone() for n, t in batch_norm_statistics(model).items()}
    spread = torch.zeros(())
    for tensor in local.values():  # how far this rank's statistics are from rank 0's before synchronising
        theirs = tensor.clone()
        dist.broadcast(theirs, 0)
        spread = torch.maximum(spread, (theirs.double() - tensor.double()).abs().max().float())
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    sync_batch_norm_statistics(model, mode=mode)
    synced = batch_norm_statistics(model)
    # Expected: rank 0's statistics (DDP's buffer broadcast) or the mean over ranks of each rank's statistics.
    per_rank = []
    for r in range(WORLD):
        copy_r = copy.deepcopy(reference)
        with torch.no_grad():
            loss_of(copy_r, "resnet", r)
        per_rank.append(batch_norm_statistics(copy_r))
    if mode == "broadcast":
        want = per_rank[0]
    else:
        want = {n: (sum(s[n].double() for s in per_rank) / WORLD).to(t.dtype) if t.is_floating_point() else per_rank[0][n]
                for n, t in per_rank[0].items()}
    worst, scale, missing = max_diff(synced, want)
    changed = max((local[n].float() - synced[n].float()).abs().max().item() for n in local)
    after = torch.zeros(())
    for tensor in synced.values():
        theirs = tensor.clone()
        dist.broadcast(theirs, 0)
        after = torch.maximum(after, (theirs.double() - tensor.double()).abs().max().float())
    dist.all_reduce(after, op=dist.ReduceOp.MAX)
    return {"stat_diff": worst, "stat_scale": scale, "missing": missing, "count": len(synced), "changed_on_rank": changed,
            "rank_spread_before": spread.item(), "rank_spread_after": after.item()}


def shard(model: nn.Module, engine: str) -> nn.Module:
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in adapter_units(model) + [m for m in model.modules() if type(m).__name__ in ("T5Block", "ResNetBasicLayer")]:
            fully_shard(module)
        fully_shard(model)
        return model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"),
                use_orig_params=engine == "fsdp1_orig")


def run_save(engine: str, model_name: str, rank: int, out_dir: str) -> dict:
    """One training step, then generation through the root, BatchNorm sync and `save_adapter`; rank 0 reloads the
    adapter on a fresh base model and compares its outputs with the sharded model's."""
    from peft import PeftModel

    from smear_peft.distributed import generate, save_adapter

    model = shard(build(model_name, "smear"), engine)
    loss_of(model, model_name, rank).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    path = os.path.join(out_dir, f"{engine}-{model_name}")
    saved = save_adapter(model, path)
    model.eval()
    probe = batch(model_name, 7)
    probe = {k: v for k, v in probe.items() if k != "labels"}
    if model_name == "t5":
        probe["decoder_input_ids"] = torch.zeros(MICRO_BATCH, 1, dtype=torch.long)
    with torch.no_grad():
        logits = model(**probe).logits
        tokens = generate(model, input_ids=probe["input_ids"], attention_mask=probe["attention_mask"],
                          max_new_tokens=4, do_sample=False) if model_name == "t5" else None
    gathered = [torch.empty_like(logits) for _ in range(WORLD)]
    dist.all_gather(gathered, logits.contiguous())
    result = {"saved_tensors": len(saved), "rank_logit_spread": (gathered[1] - gathered[0]).abs().max().item()}
    if rank == 0:
        fresh = build(model_name, "smear").base_model.model  # same base weights (seed 0), adapter replaced below
        import transformers

        torch.manual_seed(0)
        if model_name == "t5":
            fresh = transformers.T5ForConditionalGeneration(fresh.config)
        else:
            fresh = transformers.ResNetForImageClassification(fresh.config)
        reloaded = PeftModel.from_pretrained(fresh, path).eval()
        with torch.no_grad():
            result["logit_diff"] = (reloaded(**probe).logits - logits).abs().max().item()
            if tokens is not None:
                again = reloaded.generate(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"],
                                          max_new_tokens=4, do_sample=False)
                result["same_generation"] = bool(torch.equal(again, tokens))
    return result


def run_deepspeed(stage: int, model_name: str, routing: str, rank: int, out_dir: str) -> dict:
    """DeepSpeed ZeRO-``stage`` (CPU accelerator, gloo) driven directly: one SGD step (lr 1) compared with one process,
    then `save_adapter` / `generate` / reload as in `run_save`; under ZeRO-3 also a naive rank-0 ``save_pretrained``,
    which `verify_saved_adapter` must reject (its tensors are empty)."""
    import deepspeed
    from peft import PeftModel

    # DeepSpeed's CPU communication backend JIT-compiles a shared-memory op (minutes of C++); gloo needs none.
    for name in list(deepspeed.ops.__compatible_ops__):
        if "shm" in name:
            deepspeed.ops.__compatible_ops__[name] = False

    from smear_peft.distributed import gather_state_dict, generate, save_adapter, verify_saved_adapter

    model = build(model_name, routing)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    ref_loss, ref_grads = reference_step(reference, model_name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                      optimizer=torch.optim.SGD(trainable, lr=1.0))
    loss = loss_of(engine, model_name, rank)
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    state = gather_state_dict(engine)
    grads = {n: before[n] - state[n] for n in before if n in state}
    worst, scale, missing = max_diff(grads, ref_grads)
    result = {"loss": total.item() / WORLD, "ref_loss": ref_loss, "grad_diff": worst, "grad_scale": scale,
              "missing": missing, "units": stage}
    path = os.path.join(out_dir, f"zero{stage}-{model_name}")
    saved = save_adapter(engine, path)
    result["saved_tensors"] = len(saved)
    if stage == 3 and rank == 0:
        naive = path + "-naive"
        engine.module.save_pretrained(naive)  # what examples/glue.py did: zero-element tensors
        try:
            verify_saved_adapter(naive)
            result["naive_rejected"] = False
        except RuntimeError:
            result["naive_rejected"] = True
    engine.eval()
    probe = {k: v for k, v in batch(model_name, 7).items() if k != "labels"}
    if model_name == "t5":
        probe["decoder_input_ids"] = torch.zeros(MICRO_BATCH, 1, dtype=torch.long)
    with torch.no_grad():
        logits = engine(**probe).logits
        tokens = generate(engine, input_ids=probe["input_ids"], attention_mask=probe["attention_mask"],
                          max_new_tokens=4, do_sample=False) if model_name == "t5" else None
    if rank == 0:
        import transformers

        fresh = build(model_name, routing).base_model.model
        torch.manual_seed(0)
        fresh = (transformers.T5ForConditionalGeneration if model_name == "t5" else transformers.ResNetForImageClassification)(fresh.config)
        reloaded = PeftModel.from_pretrained(fresh, path).eval()
        with torch.no_grad():
            result["logit_diff"] = (reloaded(**probe).logits - logits).abs().max().item()
            if tokens is not None:
                again = reloaded.generate(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"],
                                          max_new_tokens=4, do_sample=False)
                result["same_generation"] = bool(torch.equal(again, tokens))
    return result


def worker(rank: int, init_file: str, scenarios: list, out: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if os.environ.get("SMEAR_WORKER_TRACE"):  # debugging hangs: stacks of both processes after N seconds
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["SMEAR_WORKER_TRACE"]), exit=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for scenario in scenarios:
            engine, *rest = scenario.split(":")
            try:
                if engine == "fsdp2":
                    results[scenario] = run_fsdp2(rest[0], rest[1], rank)
                elif engine in ("fsdp1", "fsdp1_orig"):
                    results[scenario] = run_fsdp1(rest[0], rest[1], rank, engine == "fsdp1_orig")
                elif engine == "bn_sync":
                    results[scenario] = run_bn_sync(rest[0], rank)
                elif engine in ("zero2", "zero3"):
                    results[scenario] = run_deepspeed(int(engine[-1]), rest[0], rest[1], rank,
                                                      os.path.dirname(os.path.abspath(out)))
                elif engine == "save":
                    results[scenario] = run_save(rest[0], rest[1], rank, os.path.dirname(os.path.abspath(out)))
                else:
                    raise ValueError(f"unknown engine {engine}")
            except Exception:  # noqa: BLE001 - reported per scenario
                results[scenario] = {"error": traceback.format_exc(limit=6)}
            dist.barrier()
    finally:
        if rank == 0:
            with open(out, "w") as handle:
                json.dump(results, handle, indent=1)
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    out, scenarios = argv[0], argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), scenarios, out), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main(sys.argv[1:])
