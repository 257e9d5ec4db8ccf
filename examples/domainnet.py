"""Train routed expert adapters (SMEAR and the paper's baselines) on a frozen ResNet, per-domain image classification.

This is the DomainNet experiment of "Soft Merging of Experts with Adaptive Routing" (Muqeeth, Liu & Raffel, TMLR
2023), with the settings of the authors' code (github.com/r-three/smear, ``cvl/``): an ImageNet ResNet-18, frozen,
gets one expert routing block after each of its 8 basic blocks (6 experts each) and a new 345-way head; the blocks and
the head train with Adam (lr 1e-3) on all six DomainNet domains at once, and the checkpoint with the best validation
accuracy is tested. ``--dataset digits`` runs the same recipe offline on CPU in a few minutes: six renderings of
scikit-learn's handwritten digits stand in for the domains, and a small ResNet pretrained here on the unshifted digits
stands in for ImageNet.

Usage:
    # offline CPU demo (embedded digit domains; the small backbone is pretrained once and cached)
    accelerate launch --cpu examples/domainnet.py --config examples/configs/digits.yaml --output_dir runs/digits

    # the paper on one GPU: DomainNet in the official layout (see smear_peft/data/domainnet.py)
    accelerate launch examples/domainnet.py --config examples/configs/domainnet_resnet18.yaml \\
        --data_dir /data/domainnet --output_dir runs/domainnet-smear

    # another routing method, on 4 GPUs (still 128 images per step: 32 per GPU)
    accelerate launch --multi_gpu --num_processes 4 examples/domainnet.py --config examples/configs/domainnet_resnet18.yaml \\
        --data_dir /data/domainnet --routing st_gumbel --output_dir runs/domainnet-st-gumbel

    # resume an interrupted run exactly where its last checkpoint left it
    accelerate launch examples/domainnet.py --config ... --output_dir runs/domainnet-smear --resume_from_checkpoint latest

Every key of DEFAULTS below is a command-line flag. The defaults are the paper's; ``--config FILE.yaml`` overrides
them and the command line overrides the file; mistakes stop the script with exit code 2 before it writes anything
(smear_peft/scripts.py). The script never deletes a file it did not write: starting afresh in a folder that holds an
earlier run needs ``--overwrite_output_dir``. Results: a per-domain accuracy table, ``<output_dir>/metrics.json`` and
the best-validation adapter in ``<output_dir>`` (load it with ``PeftModel.from_pretrained`` after ``import smear_peft``).
"""

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import DataLoaderConfiguration
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import ResNetConfig, ResNetForImageClassification
from transformers.utils import logging as transformers_logging

import smear_peft  # registers the SMEAR method with PEFT
from smear_peft import ROUTING_METHODS, SmearConfig
from smear_peft.data.routed_images import collate_routed_images
from smear_peft.distributed import (
    adapter_state_dict,
    check_grad_clipping,
    engine_of,
    load_adapter_state,
    make_accelerator,
    save_adapter,
    sync_batch_norm_statistics,
)
from smear_peft.hub import push_saved_adapter
from smear_peft.losses import per_example_classification_loss, reinforce_loss
from smear_peft.recipes import authors_expert_dropout
from smear_peft.scripts import (
    load_checkpoint,
    non_negative,
    parse_settings,
    positive,
    resolve_checkpoint,
    save_checkpoint,
    start_run,
    usage_error,
)

# ----------------------------------------------------------------------------------------------------------------------
# Configuration: the paper's settings (authors' cvl/src/utils/Config.py and README commands unless noted)

DEFAULTS = {
    # data
    "dataset": "domainnet",  # "domainnet", or "digits": the embedded offline stand-in (smear_peft.data.digits)
    "data_dir": None,  # DomainNet root in the official layout (images + <domain>_{train,test}.txt lists)
    "hub_dataset_id": None,  # ... or a `datasets` copy of DomainNet (columns image, label, domain)
    "image_size": 224,
    "dataloader_num_workers": 8,
    # model
    "model_name_or_path": "microsoft/resnet-18",  # ImageNet ResNet-18; null: pretrain a small one (digits only)
    "num_experts": 6,  # one per domain, so that tag routing has an expert per domain
    "routing": "smear",  # any of smear_peft.ROUTING_METHODS
    "expert_dropout": None,  # null: the authors' choice for the routing method (0.1 for smear and top_k, else 0)
    "bottleneck_size": 32,  # per-pixel C -> 32 -> C experts at every stage
    "monolithic_params": "compute",  # routing=monolithic: one expert of the same size ("1x compute") or "params"
    "gumbel_anneal_rate": 1e-4,  # ST-Gumbel: tau = max(tau * exp(-rate * step), 0.5) every 1000 steps, from 10
    "gumbel_anneal_every": 1000,
    "batch_norm_statistics": "update",  # the frozen backbone's BatchNorm statistics track the training data (authors)
    # optimisation
    "max_steps": 100_000,
    "batch_size": 128,  # images per optimizer step, split over the processes
    "eval_batch_size": 128,  # per process
    "learning_rate": 1e-3,  # (old name: lr)
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,  # (old name: grad_clip_norm)
    "eval_every": 1000,  # validation (model selection) every this many steps
    "log_every": 100,
    "checkpoint_every": 1000,
    "seed": 42,
    # pretraining of the small digits backbone (model_name_or_path: null); ignored otherwise
    "pretrain_steps": 300,
    "pretrain_lr": 3e-3,
    "pretrain_batch_size": 128,
    "pretrain_embedding_size": 16,
    "pretrain_hidden_sizes": [16, 32, 64, 128],
    "pretrain_depths": [2, 2, 2, 2],
    "cache_dir": "~/.cache/smear_peft",
    # output
    "output_dir": "runs/domainnet",
    "report_to": "tensorboard",  # an Accelerate tracker ("tensorboard", "wandb", "all", ...) or "none"
    "checkpoints_total_limit": 2,  # most recent checkpoints kept in <output_dir>/checkpoints (old name: keep_checkpoints)
    "resume_from_checkpoint": None,  # a checkpoint folder, or "latest"
    "overwrite_output_dir": False,  # start afresh in a folder that holds an earlier run (removes only its checkpoints)
    "push_to_hub": False,
    "hub_model_id": None,
}

# Rules of this script's own numeric knobs (those shared with glue.py are in smear_peft.scripts.RULES).
RULES = {
    "image_size": positive, "dataloader_num_workers": non_negative, "bottleneck_size": positive,
    "gumbel_anneal_rate": non_negative, "gumbel_anneal_every": positive, "pretrain_steps": positive,
    "pretrain_lr": positive, "pretrain_batch_size": positive, "pretrain_embedding_size": positive,
}


def parse_config(argv=None):
    """Defaults, then ``--config FILE.yaml`` (a section ``pretrain: {steps: 300}`` sets ``pretrain_steps``), then the
    command line. Returns the settings as attributes."""
    config = parse_settings(DEFAULTS, argv, __doc__, RULES, prog="domainnet.py")

    def error(message):
        usage_error(message, "domainnet.py")

    if config["routing"] not in ROUTING_METHODS:
        error(f"--routing must be one of {', '.join(ROUTING_METHODS)}, got {config['routing']!r}.")
    if config["expert_dropout"] is None:
        config["expert_dropout"] = authors_expert_dropout(config["routing"])
    if config["dataset"] not in ("domainnet", "digits"):
        error(f"--dataset must be domainnet or digits, got {config['dataset']!r}.")
    if config["dataset"] == "domainnet" and (config["data_dir"] is None) == (config["hub_dataset_id"] is None):
        error("--dataset domainnet needs exactly one of --data_dir (official layout) or --hub_dataset_id.")
    if config["model_name_or_path"] is None and config["dataset"] != "digits":
        error("--model_name_or_path is required: only the digits backbone can be pretrained by this script.")
    if config["push_to_hub"] and not config["hub_model_id"]:
        error("--push_to_hub needs --hub_model_id.")
    if config["monolithic_params"] not in ("compute", "params"):
        error(f"--monolithic_params must be compute or params, got {config['monolithic_params']!r}.")
    if config["batch_norm_statistics"] not in ("update", "frozen"):
        error(f"--batch_norm_statistics must be update or frozen, got {config['batch_norm_statistics']!r}.")
    for key in ("pretrain_hidden_sizes", "pretrain_depths"):
        if not all(isinstance(v, int) and v > 0 for v in config[key]):
            error(f"--{key} must be a list of positive integers, got {config[key]!r}.")
    return argparse.Namespace(**config)


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_splits(args):
    """Train / validation / test datasets of routed images (items: pixel_values, labels, routing_tags = domain)."""
    if args.dataset == "digits":
        from smear_peft.data.digits import load_digit_domains

        return load_digit_domains(image_size=args.image_size)
    from smear_peft.data.domainnet import load_domainnet, load_domainnet_from_hub

    if args.data_dir is not None:
        return load_domainnet(args.data_dir, image_size=args.image_size)
    return load_domainnet_from_hub(args.hub_dataset_id, image_size=args.image_size)


class WithExampleIndex(Dataset):
    """Adds each example's index in its split: the key of hash routing, which (as in the authors' code) sends every
    example to a fixed random expert per block, whatever its random crop."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "routing_keys": index}


def collate(examples):
    batch = collate_routed_images(examples)
    batch["routing_keys"] = torch.tensor([example["routing_keys"] for example in examples])
    return batch


def training_loader(dataset, batch_size, args):
    """Shuffled batches of ``dataset``; an epoch ends with its last, partial batch, as the authors' loader (no
    ``drop_last``). The loader's own generator (not the global one) seeds its workers, so iterating it never shifts
    the global random stream that expert dropout and sampled routing draw from: resuming stays exact."""
    return DataLoader(
        WithExampleIndex(dataset), batch_size=batch_size, shuffle=True, drop_last=False, collate_fn=collate,
        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed),
    )


def train_batches(accelerator, loader, start_step):
    """Batches forever, from ``start_step`` on. An epoch's order depends only on (seed, epoch) (Accelerate's seedable
    sampler), so a run resumed mid-epoch sees the same batches as one that never stopped."""
    epoch, skip = divmod(start_step, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------------------
# The digits backbone: what ImageNet is to DomainNet, the unshifted ("original") digits are to the digit domains


def pretrain_digit_backbone(args, device, say):
    """Train a small ResNet on the original domain only, save it without its head, and cache it by its settings."""
    from smear_peft.data.digits import load_digit_pretraining_splits

    settings = {key: value for key, value in vars(args).items() if key.startswith("pretrain_")}
    settings.update(image_size=args.image_size, seed=args.seed)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(args.cache_dir).expanduser() / "digits_backbone" / digest
    if (path / "config.json").exists():
        say(f"Digits backbone: cached in {path}")
        return str(path)

    say(f"Digits backbone: pretraining on the original domain for {args.pretrain_steps} steps (cached in {path})")
    start = time.perf_counter()
    set_seed(args.seed)
    splits = load_digit_pretraining_splits(image_size=args.image_size)
    model = ResNetForImageClassification(
        ResNetConfig(
            layer_type="basic",
            embedding_size=args.pretrain_embedding_size,
            hidden_sizes=args.pretrain_hidden_sizes,
            depths=args.pretrain_depths,
            num_labels=splits.num_labels,
        )
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.pretrain_lr)
    loader = DataLoader(splits.train, batch_size=args.pretrain_batch_size, shuffle=True, drop_last=True)
    batches = (batch for _ in range(math.ceil(args.pretrain_steps / len(loader))) for batch in loader)
    model.train()
    for _, batch in zip(range(args.pretrain_steps), batches):
        loss = model(pixel_values=batch["pixel_values"].to(device), labels=batch["labels"].to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        validation = DataLoader(splits.validation, batch_size=512)
        correct = sum(
            (model(pixel_values=b["pixel_values"].to(device)).logits.argmax(-1).cpu() == b["labels"]).sum().item()
            for b in validation
        )
    accuracy = correct / len(splits.validation)
    # Save the backbone without its head, like an ImageNet checkpoint whose head is replaced: loading it into
    # ResNetForImageClassification gives a freshly initialised classifier for the adapter stage to train.
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    model.resnet.save_pretrained(staging)
    (staging / "pretraining.json").write_text(json.dumps({"validation_accuracy": accuracy, **settings}, indent=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, path)  # atomic: an interrupted run never leaves a half-written cache entry
    say(
        f"Digits backbone: validation accuracy {accuracy:.3f} on the original domain ({time.perf_counter() - start:.0f}s)"
    )
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(accelerator, model, loader, domain_names):
    """Accuracy pooled over all examples (the authors' model-selection metric), per domain, and averaged over domains.
    Also returns the seconds spent in the forward pass and argmax, the authors' inference time."""
    model.eval()
    sync_batch_norm_statistics(model)  # FSDP / DeepSpeed don't broadcast buffers as DDP does: rank 0's, as under DDP
    correct = torch.zeros(len(domain_names), dtype=torch.long, device=accelerator.device)
    total = torch.zeros_like(correct)
    seconds = 0.0
    for batch in loader:
        start = time.perf_counter()
        outputs = model(
            pixel_values=batch["pixel_values"], routing_tags=batch["routing_tags"], routing_keys=batch["routing_keys"]
        )
        logits = outputs.logits
        predictions = logits.argmax(-1)
        if predictions.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        predictions, labels, tags = accelerator.gather_for_metrics(
            (predictions, batch["labels"], batch["routing_tags"])
        )
        correct += torch.bincount(tags[predictions == labels], minlength=len(domain_names))
        total += torch.bincount(tags, minlength=len(domain_names))
    model.train()
    per_domain = {name: c / t for name, c, t in zip(domain_names, correct.tolist(), total.tolist()) if t}
    metrics = {
        "accuracy": correct.sum().item() / total.sum().item(),
        "domain_average": sum(per_domain.values()) / len(per_domain),
        "per_domain": per_domain,
    }
    return metrics, seconds


def results_table(validation, test):
    rows = [f"{'domain':<16}{'validation':>12}{'test':>10}"]
    for name, accuracy in test["per_domain"].items():
        rows.append(f"{name:<16}{validation['per_domain'].get(name, math.nan):>12.4f}{accuracy:>10.4f}")
    rows.append(f"{'domain average':<16}{validation['domain_average']:>12.4f}{test['domain_average']:>10.4f}")
    rows.append(f"{'all examples':<16}{validation['accuracy']:>12.4f}{test['accuracy']:>10.4f}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: Accelerate saves the model, the optimizer and every RNG; this object saves the rest of the state


class TrainingState:
    """The step and the best validation result so far, with that step's adapter (a few MB: experts, routers, head)."""

    def __init__(self):
        self.step = 0
        self.best_accuracy = 0.0  # rounded to 4 decimals, as the authors'
        self.best_step = 0
        self.best_validation = None
        self.best_adapter = None

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def is_new_best(accuracy, best_accuracy):
    """The authors' model selection: validation accuracy rounded to 4 decimals (their Scorer), strictly better than
    the best so far (which starts at 0)."""
    return round(accuracy, 4) > best_accuracy


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_config(argv)
    # The checkpoint to resume from, or None; a fresh start in a folder holding an earlier run stops here (exit 2)
    # unless --overwrite_output_dir. Nothing has been written yet.
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    transformers_logging.set_verbosity_error()  # the load report would list the new head as "missing": it is meant to be
    transformers_logging.disable_progress_bar()
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=output_dir,
        # Each epoch's shuffle is seeded by (seed, epoch): identical on every process, and replayable on resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )

    def say(message):
        if accelerator.is_main_process:
            tqdm.write(message)

    # -- data ----------------------------------------------------------------------------------------------------------
    splits = load_splits(args)
    domain_names = splits.domain_names
    say(
        f"{args.dataset}: {len(splits.train)} train / {len(splits.validation)} validation / {len(splits.test)} test "
        f"images, {splits.num_labels} classes, domains {', '.join(domain_names)}"
    )
    if args.batch_size % accelerator.num_processes:
        usage_error(f"--batch_size {args.batch_size} must be divisible by the {accelerator.num_processes} processes.")
    if args.batch_size > len(splits.train):
        usage_error(f"--batch_size {args.batch_size} is larger than the {len(splits.train)} training images.")
    loader_options = {"collate_fn": collate, "num_workers": args.dataloader_num_workers}
    train_loader = training_loader(splits.train, args.batch_size // accelerator.num_processes, args)
    validation_loader = DataLoader(
        WithExampleIndex(splits.validation), batch_size=args.eval_batch_size, **loader_options
    )
    test_loader = DataLoader(WithExampleIndex(splits.test), batch_size=args.eval_batch_size, **loader_options)

    # -- model: frozen backbone + routing blocks + a new head -----------------------------------------------------------
    backbone = args.model_name_or_path
    if backbone is None:
        with accelerator.main_process_first():  # one process pretrains, the others then find it in the cache
            backbone = pretrain_digit_backbone(args, accelerator.device, say)
    set_seed(args.seed)  # the same initialisation whether or not the backbone was just pretrained
    # The pretrained head is replaced by a freshly initialised one for this label set (345 classes on DomainNet).
    model = ResNetForImageClassification.from_pretrained(
        backbone, num_labels=splits.num_labels, ignore_mismatched_sizes=True
    )
    smear_config = SmearConfig(
        num_experts=args.num_experts,
        routing=args.routing,
        expert_dropout=args.expert_dropout,
        bottleneck_size=args.bottleneck_size,
        monolithic_params=args.monolithic_params,
        # The authors' ST-Gumbel schedule for ResNet: rate 1e-4 every 1000 steps (T5: 1e-6 every 5000).
        gumbel_anneal_rate=args.gumbel_anneal_rate,
        gumbel_anneal_every=args.gumbel_anneal_every,
        batch_norm_statistics=args.batch_norm_statistics,
        num_tags=len(domain_names),  # tag routing: domain i -> expert i
        tag_names=list(domain_names),
        modules_to_save=["classifier"],  # the new head trains in full and is saved with the adapter
    )
    # The preset for transformers' ResNet puts a block after every basic block (8 in ResNet-18), after the residual
    # add and before the final ReLU; everything else in the backbone stays frozen.
    model = get_peft_model(model, smear_config)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)  # constant lr, as the authors

    model, optimizer, train_loader, validation_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, test_loader
    )
    peft_model = accelerator.unwrap_model(model)
    check_grad_clipping(accelerator, args.max_grad_norm)  # DeepSpeed clips itself: same norm, or a warning
    if engine_of(model) in ("fsdp1", "fsdp2"):  # the best adapter could not be loaded back for the test: stop now
        usage_error(
            "Testing the best-validation adapter loads it back into the model, which this script does under DDP and "
            "DeepSpeed (ZeRO-2/3) but not FSDP (smear_peft.distributed.load_adapter_state). ResNets fit on one GPU: "
            "launch with examples/configs/accelerate_ddp.yaml or accelerate_zero3.yaml.",
            "domainnet.py",
        )
    state = TrainingState()
    accelerator.register_for_checkpointing(state)
    if checkpoint:
        load_checkpoint(accelerator, checkpoint)
        say(f"Resumed from {checkpoint} at step {state.step} (best validation so far {state.best_accuracy:.4f})")
    # Mark the folder as this run's (a fresh start first removes the earlier run's own checkpoints, nothing else).
    start_run(output_dir, "domainnet.py", accelerator.is_main_process, fresh=checkpoint is None)
    accelerator.wait_for_everyone()

    hyperparameters = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    accelerator.init_trackers("smear_domainnet", config=hyperparameters)

    # -- training ------------------------------------------------------------------------------------------------------
    batches = train_batches(accelerator, train_loader, state.step)
    progress = tqdm(
        initial=state.step, total=args.max_steps, desc="training", disable=not accelerator.is_local_main_process
    )
    running_loss, train_start = 0.0, time.perf_counter()
    model.train()  # the backbone is frozen, but its BatchNorm statistics update (batch_norm_statistics="update")
    while state.step < args.max_steps:
        # ST-Gumbel's temperature is a function of the step (the authors' schedule), so resuming restores it too.
        temperatures = peft_model.base_model.set_training_step(state.step)
        batch = next(batches)
        outputs = model(
            pixel_values=batch["pixel_values"], routing_tags=batch["routing_tags"], routing_keys=batch["routing_keys"]
        )
        logits = outputs.logits
        # Per-example cross-entropy: its mean is the task loss; REINFORCE also uses each example's loss as its
        # (negative) reward. reinforce_loss is 0 for every other routing method.
        example_losses = per_example_classification_loss(logits, batch["labels"])
        task_loss = example_losses.mean()
        loss = task_loss + reinforce_loss(outputs, example_losses)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        progress.update()
        running_loss += task_loss.detach()

        if state.step % args.log_every == 0:
            logs = {"train/loss": running_loss.item() / args.log_every}
            if temperatures:  # st_gumbel
                logs["train/gumbel_temperature"] = temperatures["default"]
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{logs['train/loss']:.3f}")
            running_loss = 0.0

        if state.step % args.eval_every == 0 or state.step == args.max_steps:
            validation, _ = evaluate(accelerator, model, validation_loader, domain_names)
            accelerator.log(
                {
                    "validation/accuracy": validation["accuracy"],
                    "validation/domain_average": validation["domain_average"],
                    **{f"validation/{d}": a for d, a in validation["per_domain"].items()},
                },
                step=state.step,
            )
            if is_new_best(validation["accuracy"], state.best_accuracy):  # accuracy over all examples, as theirs
                state.best_accuracy, state.best_step, state.best_validation = (
                    round(validation["accuracy"], 4),
                    state.step,
                    validation,
                )
                # Gathered on every process: under FSDP / ZeRO-3 the parameters hold shards.
                state.best_adapter = {k: v.cpu().clone() for k, v in adapter_state_dict(model, accelerator=accelerator).items()}
            say(
                f"step {state.step}: validation accuracy {validation['accuracy']:.4f} "
                f"(best {state.best_accuracy:.4f} at step {state.best_step})"
            )
        if state.step % args.checkpoint_every == 0:
            save_checkpoint(accelerator, output_dir, state.step, args.checkpoints_total_limit)
    progress.close()
    train_seconds = time.perf_counter() - train_start

    # -- test the best-validation adapter, save it -----------------------------------------------------------------------
    if state.best_adapter is None:  # no validation accuracy above 0 (the authors' run would find no best_model.pt)
        say("No validation accuracy above 0.0000: testing the last weights.")
        state.best_step = state.step
        state.best_validation, _ = evaluate(accelerator, model, validation_loader, domain_names)
    else:  # every process holds the gathered copy; under ZeRO-3 the partitions are gathered while it is written
        load_adapter_state(model, state.best_adapter, accelerator=accelerator)
    test, inference_seconds = evaluate(accelerator, model, test_loader, domain_names)
    say(
        f"\nBest validation step {state.best_step} of {args.max_steps}; routing {args.routing}; "
        f"test inference {inference_seconds:.2f}s for {len(splits.test)} images\n"
        + results_table(state.best_validation, test)
    )
    accelerator.log({"test/accuracy": test["accuracy"], "test/domain_average": test["domain_average"]}, step=state.step)
    # Gathered on every process (FSDP / ZeRO-3 shards), written by rank 0, read back: raises on an empty adapter.
    save_adapter(model, str(output_dir), accelerator=accelerator)
    if accelerator.is_main_process:
        metrics = {
            "dataset": args.dataset,
            "routing": args.routing,
            "backbone": backbone,
            "best_step": state.best_step,
            "validation": state.best_validation,
            "test": test,
            "test_inference_seconds": inference_seconds,
            "test_examples": len(splits.test),
            "train_seconds_this_run": train_seconds,
            "config": vars(args),
        }
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        say(f"Adapter and metrics.json saved in {output_dir}")
        if args.push_to_hub:
            # The folder just saved (gathered on every process, read back) with its SMEAR model card; never this
            # process's module, which holds shards under ZeRO-3.
            push_saved_adapter(str(output_dir), args.hub_model_id,
                               num_blocks=sum(1 for _ in peft_model.base_model.smear_layers()))
            say(f"Pushed to https://huggingface.co/{args.hub_model_id}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
