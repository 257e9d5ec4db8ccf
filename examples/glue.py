"""Train T5 with SMEAR (or any routing baseline) on GLUE and evaluate it as the SMEAR paper does.

This is the T5-GLUE experiment of "Soft Merging of Experts with Adaptive Routing" (Muqeeth, Liu & Raffel, TMLR 2023)
in one Accelerate script: a frozen T5-v1.1-base gets expert routing blocks after every attention and feed-forward
sublayer (60 blocks of 8 experts), which are trained, together with T5's layer norms, on the eight GLUE tasks mixed
in proportion to their sizes and prompted with PromptSource templates. The test splits are scored from greedy
generations under every template. Defaults are the authors' settings (see docs/reproducing.md).

Usage:
    # the paper's run, on one or more GPUs (the effective batch stays 128)
    accelerate launch examples/glue.py --config examples/configs/glue_t5_base.yaml --output_dir runs/smear
    accelerate launch examples/glue.py --routing tag --tag_plus --output_dir runs/tag_plus
    accelerate launch examples/glue.py --routing reinforce --output_dir runs/reinforce
    # continue a run where its last checkpoint left off
    accelerate launch examples/glue.py --config ... --output_dir runs/smear --resume_from_checkpoint latest
    # offline on CPU in a few minutes: tiny random T5, byte tokenizer, synthetic GLUE-format data
    accelerate launch --cpu examples/glue.py --config examples/configs/glue_tiny.yaml --output_dir runs/tiny
    # ... in two CPU processes (`--cpu --num_processes 2` would start only one)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/glue.py \
        --config examples/configs/glue_tiny.yaml --output_dir runs/tiny

Every key of DEFAULTS below can be set in the YAML file given by --config and overridden on the command line
(``--key value``; lists and dicts as YAML, e.g. ``--tasks "[rte, mnli]"``); mistakes stop the script with exit code
2 before it writes anything (smear_peft/scripts.py). Outputs in --output_dir: the adapter (``PeftModel.from_pretrained
(base, output_dir)`` after ``import smear_peft``; with --authors_backbone, first ``apply_authors_backbone(base,
weights_dir=output_dir)``), config.yaml, metrics.json, checkpoints/ and tracker logs. The script never deletes a file
it did not write: starting afresh in a folder that holds an earlier run needs --overwrite_output_dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import defaultdict

import datasets
import torch
import transformers
import yaml
from accelerate.utils import gather_object, send_to_device, set_seed
from peft import get_peft_model
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    T5Config,
    T5ForConditionalGeneration,
)

import smear_peft  # noqa: F401  (registers the SMEAR method with PEFT)
from smear_peft import ROUTING_METHODS, SmearConfig
from smear_peft.authors_t5 import apply_authors_backbone, authors_backbone_weights, save_authors_backbone
from smear_peft.data.glue import (
    GLUE_TASKS,
    ExamplesProportionalSampler,
    GlueSeq2SeqCollator,
    build_glue_split,
    load_raw_glue,
)
from smear_peft.data.glue_synthetic import synthetic_glue
from smear_peft.data.prompts import BUILTIN_TEMPLATES_DIR, PROMPTSOURCE_INSTALL_HINT, promptsource_templates_dir
from smear_peft.distributed import (
    check_grad_clipping,
    generate,
    make_accelerator,
    save_adapter,
    set_deepspeed_micro_batch,
)
from smear_peft.hub import push_saved_adapter
from smear_peft.losses import per_example_seq2seq_loss, reinforce_loss
from smear_peft.metrics import TASK_METRICS, load_glue_metric
from smear_peft.recipes import authors_expert_dropout
from smear_peft.scripts import (
    load_checkpoint,
    non_negative,
    parse_settings,
    positive,
    probability,
    resolve_checkpoint,
    save_checkpoint,
    start_run,
    usage_error,
)

# -----------------------------------------------------------------------------------------------------------------
# Settings. Defaults are the authors' T5-GLUE settings (r-three/smear, hyperformer/configs/adapter/*.json + README).
DEFAULTS = dict(
    # model
    model_name_or_path="google/t5-v1_1-base",
    model_config=None,  # dict of T5Config fields: build a randomly initialised T5 instead of loading one (offline)
    tokenizer=None,  # None: the model's own tokenizer; "byt5": ByT5's byte-level tokenizer, which needs no files
    authors_backbone=True,  # the authors' T5 fork: decoder output x d_model**-0.5, cross-attention bias (authors_t5)
    # routing blocks (smear_peft.SmearConfig)
    routing="smear",  # smear, top_k, st_gumbel, reinforce, tag, hash, monolithic, ensemble
    num_experts=8,
    expert_dropout=None,  # None: the authors' value for the method (0.1 for smear and top_k, 0 for the others)
    tag_plus=False,  # tag routing only: the paper's "Tag+", RTE uses MNLI's expert in the encoder blocks
    smear_config={},  # other SmearConfig fields, e.g. {pooling: mean, reduction_factor: 4, monolithic_params: params}
    # data
    tasks=list(GLUE_TASKS),
    dataset_path="nyu-mll/glue",  # Hub id, local copy, or a folder with one save_to_disk DatasetDict per task
    synthetic_data=None,  # e.g. {num_train: 64, num_validation: 16}: synthetic GLUE-format data instead (offline)
    templates="promptsource",  # promptsource (installed package), builtin (ours, offline), auto, or a folder
    large_task_validation_size=1000,  # QQP/QNLI/SST-2 train rows held out for validation (authors: 1000)
    max_source_length=128,
    max_target_length=128,
    # optimisation
    max_steps=400_000,
    batch_size=128,  # effective batch: per_device_batch_size x processes x gradient accumulation steps
    per_device_batch_size=None,  # None: batch_size / processes, no accumulation
    learning_rate=3e-4,
    weight_decay=0.0,
    adam_epsilon=1e-8,
    warmup_steps=2000,  # linear warmup, then constant
    max_grad_norm=1.0,
    label_smoothing=0.1,
    loss_reduction="sum",  # sum: the authors' sum over target tokens; mean: token mean (a deviation)
    mixed_precision="auto",  # auto: bf16 on GPUs that support it, else fp32; or no, fp16, bf16
    seed=42,
    sampler_seed=0,  # the training sampler draws epoch e with seed sampler_seed + e (authors: 0 + e)
    # evaluation, logging, checkpoints
    eval_every=5000,  # validation (the authors evaluate and save every 5000 steps)
    validation_examples_per_task=500,  # a fixed random sample of each task's validation split (None: all)
    eval_batch_size=128,  # per device; every batch holds one task, as the authors' per-task loaders
    log_every=100,
    checkpoint_every=5000,
    checkpoints_total_limit=2,  # keep the newest N (a checkpoint holds the whole model and the optimizer)
    output_dir="runs/glue",
    resume_from_checkpoint=None,  # a checkpoint folder, or "latest" (the newest under output_dir/checkpoints)
    overwrite_output_dir=False,  # start afresh in a folder that holds an earlier run (removes only its checkpoints)
    report_to="tensorboard",  # any Accelerate tracker(s), comma-separated, or "none"
    push_to_hub=False,
    hub_model_id=None,
)
# Rules of this script's own numeric knobs (those shared with domainnet.py are in smear_peft.scripts.RULES).
RULES = dict(
    max_source_length=positive, max_target_length=positive, adam_epsilon=positive, warmup_steps=non_negative,
    label_smoothing=probability, large_task_validation_size=non_negative, validation_examples_per_task=positive,
)


def parse_config(argv: list[str] | None = None) -> dict:
    """DEFAULTS, updated by the YAML file of --config, updated by command-line flags (all share the same keys)."""
    config = parse_settings(DEFAULTS, argv, __doc__, RULES, prog="glue.py")
    if config["routing"] not in ROUTING_METHODS:
        usage_error(f"--routing must be one of {', '.join(ROUTING_METHODS)}, got {config['routing']!r}", "glue.py")
    if config["loss_reduction"] not in ("sum", "mean"):
        usage_error(f"loss_reduction must be 'sum' or 'mean', got {config['loss_reduction']!r}", "glue.py")
    if config["tag_plus"] and config["routing"] != "tag":
        usage_error("--tag_plus is a variant of tag routing: add --routing tag", "glue.py")
    if config["push_to_hub"] and not config["hub_model_id"]:
        usage_error("--push_to_hub needs --hub_model_id user/name", "glue.py")
    if config["mixed_precision"] not in ("auto", "no", "fp16", "bf16"):
        usage_error(f"--mixed_precision must be auto, no, fp16 or bf16, got {config['mixed_precision']!r}", "glue.py")
    return config


# -----------------------------------------------------------------------------------------------------------------
# Building blocks: model, data, evaluation.
def build_tokenizer(config: dict):
    if config["tokenizer"] == "byt5":
        return ByT5Tokenizer()
    return AutoTokenizer.from_pretrained(config["tokenizer"] or config["model_name_or_path"])


def build_base_model(config: dict, authors_weights_dir: str | None = None):
    """The frozen backbone. A model built from `model_config` is seeded, so the saved adapter can be reloaded onto
    the same random weights (the adapter holds only the routing blocks and the layer norms).

    With `authors_backbone`, the authors' T5 fork (smear_peft/authors_t5.py): decoder output scaled by
    d_model**-0.5 before the head, and decoder block 0's cross-attention position bias, frozen, taken from
    `authors_weights_dir` (a finished run's output_dir) when given, else from the checkpoint, else drawn N(0, 1)."""
    if config["model_config"] is not None:
        torch.manual_seed(config["seed"])
        model = T5ForConditionalGeneration(T5Config(**config["model_config"]))
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(config["model_name_or_path"])
    if config["authors_backbone"]:
        model.authors_bias_source = apply_authors_backbone(
            model,
            model_name_or_path=None if config["model_config"] is not None else config["model_name_or_path"],
            weights_dir=authors_weights_dir,
            generator=torch.Generator().manual_seed(config["seed"]),
        )
    return model


def build_smear_config(config: dict) -> SmearConfig:
    routing = config["routing"]
    dropout = config["expert_dropout"]
    extra = dict(config["smear_config"])
    if routing == "tag":  # a task's routing tag is its index in GLUE_TASKS: one expert per task
        extra["tag_names"] = list(GLUE_TASKS)
        if config["tag_plus"]:  # the authors' Tag: RTE shares MNLI's expert in the encoder, the decoder stays per task
            extra["tag_to_expert"] = {"encoder": {"rte": "mnli"}}
    return SmearConfig(
        routing=routing,
        num_experts=config["num_experts"],
        expert_dropout=authors_expert_dropout(routing) if dropout is None else dropout,
        **extra,
    )


def load_glue(config: dict) -> dict:
    """Official GLUE splits per task, in memory: every epoch renders fresh prompts, and in-memory datasets keep
    those renderings out of the datasets cache on disk."""
    if config["synthetic_data"] is not None:
        return synthetic_glue(config["tasks"], **config["synthetic_data"])
    return {task: load_raw_glue(task, config["dataset_path"], keep_in_memory=True) for task in config["tasks"]}


def templates_dir(config: dict):
    choice = config["templates"]
    if choice == "builtin":
        return BUILTIN_TEMPLATES_DIR
    if choice in ("promptsource", "auto"):
        installed = promptsource_templates_dir()
        if installed is None and choice == "promptsource":
            raise SystemExit(f"The paper's prompts come from PromptSource: {PROMPTSOURCE_INSTALL_HINT}")
        return installed or BUILTIN_TEMPLATES_DIR
    return choice


def build_split(config: dict, raw: dict, split: str, template_seed: int = 0) -> datasets.Dataset:
    """Prompted rows of one split: train and validation with one template per example (drawn from template_seed),
    test with every (example, template) pair."""
    return build_glue_split(
        split,
        tasks=config["tasks"],
        raw=raw,
        templates_dir=templates_dir(config),
        template_seed=template_seed,
        large_task_validation_size=config["large_task_validation_size"],
    )


def sample_per_task(rows: datasets.Dataset, per_task: int | None, seed: int) -> datasets.Dataset:
    """A fixed random sample of up to `per_task` rows of each task, so every task weighs in a validation average."""
    if per_task is None:
        return rows
    generator = torch.Generator().manual_seed(seed)
    by_task = defaultdict(list)
    for index, task in enumerate(rows["task"]):
        by_task[task].append(index)
    keep = []
    for indices in by_task.values():
        order = torch.randperm(len(indices), generator=generator)[:per_task]
        keep += [indices[i] for i in order.tolist()]
    return rows.select(sorted(keep))


def answer_lengths(rows: datasets.Dataset, tokenizer) -> dict[str, int]:
    """Per task, the longest possible answer in tokens (with </s>): the authors' generation `max_length`. Answers are
    the templates' answer choices; STS-B has none, its answers are scores like "3.8", whose length the split's
    targets give."""
    answers = defaultdict(set)
    for task, choices, target in zip(rows["task"], rows["answer_choices"], rows["target_text"]):
        answers[task].update(choices or [target])
    return {task: max(len(tokenizer(text).input_ids) for text in texts) for task, texts in answers.items()}


def new_token_budget(max_length: int) -> int:
    """transformers 3.5's `generate(max_length=L)` on an encoder-decoder counts the decoder start token, so it makes at
    most L - 1 new tokens: the authors' budget, as `max_new_tokens`."""
    return max_length - 1


def per_task_loaders(rows: datasets.Dataset, batch_size: int, collator) -> dict[str, DataLoader]:
    """One loader per task, as the authors evaluate: a batch never mixes tasks, so padding (and routing with
    pooling="mean", which averages over it) is theirs."""
    by_task = defaultdict(list)
    for index, task in enumerate(rows["task"]):
        by_task[task].append(index)
    return {task: DataLoader(rows.select(indices), batch_size=batch_size, collate_fn=collator)
            for task, indices in by_task.items()}


@torch.no_grad()
def evaluate(model, loaders: dict, tokenizer, accelerator, max_answer_tokens: dict[str, int]) -> dict:
    """Greedy generation on every process, task by task, gathered: the GLUE metrics of the rows, their two averages,
    the time spent in `generate` (what the authors time; the slowest process when there are several), and
    `predictions_sha256`, a digest of every (task, target, prediction) row, in any order: equal digests mean the same
    generations, which is how a reloaded adapter is checked against its run (the tiny config's metrics are often 0)."""
    peft_model = accelerator.unwrap_model(model)
    was_training = peft_model.training
    peft_model.eval()
    rows, seconds = [], 0.0
    for task, loader in loaders.items():
        for batch in loader:
            start = time.perf_counter()
            with accelerator.autocast():
                # Through the sharded root (FSDP / ZeRO-3), on every process.
                generated = generate(
                    model,
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    routing_tags=batch["routing_tags"],
                    routing_keys=batch["routing_keys"],
                    max_new_tokens=new_token_budget(max_answer_tokens[task]),
                    do_sample=False,
                    num_beams=1,
                )
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            predictions = tokenizer.batch_decode(generated, skip_special_tokens=True)
            rows += accelerator.gather_for_metrics(list(zip(predictions, batch["target_text"], batch["task"])))
    peft_model.train(was_training)
    predictions, references, tasks = zip(*rows)
    scores = load_glue_metric().compute(predictions=predictions, references=references, tasks=tasks)
    scores["rows"] = len(rows)
    digest = hashlib.sha256(json.dumps(sorted(zip(tasks, references, predictions))).encode())
    scores["predictions_sha256"] = digest.hexdigest()
    scores["generation_seconds"] = max(gather_object([seconds]))
    return scores


def numbers(scores: dict) -> dict:
    """The numeric scores (what trackers log; the predictions' digest is kept for metrics.json)."""
    return {k: v for k, v in scores.items() if isinstance(v, (int, float))}


def metrics_table(scores: dict) -> str:
    lines = [f"{'task':<6} {'metric':<22} {'score':>7}   invalid"]
    for task, metrics in TASK_METRICS.items():
        for metric in metrics:
            if f"{task}/{metric}" in scores:
                invalid = f"{100 * scores[f'{task}/invalid_fraction']:6.1f}%"
                lines.append(f"{task:<6} {metric:<22} {scores[f'{task}/{metric}']:7.2f}   {invalid}")
    lines.append(f"average over metric entries (the authors' average) {scores['average_over_metric_entries']:7.2f}")
    lines.append(f"average over tasks                                 {scores['average_over_tasks']:7.2f}")
    lines.append(f"{scores['rows']} rows; generation took {scores['generation_seconds']:.1f} s")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    output_dir = config["output_dir"]
    # The checkpoint to resume from, or None; a fresh start in a folder holding an earlier run stops here (exit 2)
    # unless --overwrite_output_dir. Nothing has been written yet.
    checkpoint = resolve_checkpoint(output_dir, config["resume_from_checkpoint"], config["overwrite_output_dir"])

    # -- processes, precision, batch arithmetic -------------------------------------------------------------------
    mixed_precision = config["mixed_precision"]
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    report_to = None if config["report_to"] == "none" else config["report_to"].split(",")
    # `step_scheduler_with_optimizer=False`: the schedule counts optimizer steps of the whole 128-example batch,
    # however many processes share it (Accelerate would otherwise step it once per process).
    accelerator = make_accelerator(
        mixed_precision=mixed_precision, log_with=report_to, project_dir=output_dir, step_scheduler_with_optimizer=False
    )
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    processes = accelerator.num_processes
    per_device_batch_size = config["per_device_batch_size"] or config["batch_size"] // processes
    accumulation = config["batch_size"] // (per_device_batch_size * processes)
    if accumulation < 1 or per_device_batch_size * processes * accumulation != config["batch_size"]:
        usage_error(
            f"batch_size={config['batch_size']} must equal per_device_batch_size ({per_device_batch_size}) x "
            f"processes ({processes}) x gradient accumulation steps; pick a per_device_batch_size that divides it.",
            "glue.py",
        )
    try:  # this loop feeds its own batches: DeepSpeed learns their size here
        set_deepspeed_micro_batch(accelerator, per_device_batch_size, accumulation)
    except ValueError as error:
        usage_error(str(error), "glue.py")
    set_seed(config["seed"])

    # -- model: frozen T5 + expert routing blocks (+ trainable T5 layer norms, as the authors) -----------------------
    tokenizer = build_tokenizer(config)
    base = build_base_model(config)
    if accelerator.distributed_type == "FSDP":
        # FSDP2 refuses a parameter shared by two modules in different units: T5's encoder and decoder embed_tokens
        # share `shared.weight` as separate modules in transformers 5. Make them one module (same computation).
        base.encoder.embed_tokens = base.shared
        base.decoder.embed_tokens = base.shared
    model = get_peft_model(base, build_smear_config(config))
    # Frozen, saved with the adapter: taken now, whole (ZeRO-3 / FSDP leave each process a shard after prepare).
    authors_weights = authors_backbone_weights(model) if config["authors_backbone"] else None
    smear = model.base_model  # the SMEAR tuner: REINFORCE's auxiliary loss and ST-Gumbel's temperature live here
    if accelerator.is_main_process:
        model.print_trainable_parameters()
        if config["authors_backbone"]:
            print(f"Authors' backbone: cross-attention position bias {smear.model.authors_bias_source}")

    # -- data -------------------------------------------------------------------------------------------------------
    # The authors' splits (validation carved out of train or of the official validation split, see
    # smear_peft.data.glue), mixed in proportion to the tasks' sizes: batches are uniform draws with replacement
    # over all training rows, an "epoch" being (rows // batch_size) steps.
    raw = load_glue(config)
    train_rows = len(build_split(config, raw, "train"))
    steps_per_epoch = train_rows // config["batch_size"]
    if steps_per_epoch == 0:
        usage_error(f"--batch_size {config['batch_size']} is larger than the {train_rows} training rows", "glue.py")
    train_collator = GlueSeq2SeqCollator(tokenizer, config["max_source_length"], config["max_target_length"])

    def train_batches(first_step: int):
        """This process's micro-batches from optimizer step `first_step` on.

        Epoch e redraws every example's prompt template (the authors draw one at random on every fetch) and its
        sampling order (seed + e), so a resumed run sees exactly the batches the uninterrupted run would have seen.
        Every optimizer step consumes `processes x accumulation` consecutive micro-batches of the epoch's stream
        (process p takes micro-batches p, p + processes, ..., as Accelerate shards a loader), i.e. 128 consecutive
        draws whatever the number of processes."""
        epoch, step_in_epoch = divmod(first_step, steps_per_epoch)
        while True:
            rows = build_split(config, raw, "train", template_seed=config["seed"] + epoch)
            sampler = ExamplesProportionalSampler(len(rows), seed=config["sampler_seed"])
            sampler.set_epoch(epoch)
            batches = list(BatchSampler(sampler, per_device_batch_size, drop_last=True))
            mine = batches[accelerator.process_index :: processes][: steps_per_epoch * accumulation]
            # The loader gets its own generator: starting an epoch then draws nothing from the global RNG that
            # dropout uses, which keeps resumed runs identical to uninterrupted ones.
            loader = DataLoader(
                rows, batch_sampler=mine[step_in_epoch * accumulation :], collate_fn=train_collator,
                generator=torch.Generator(),
            )
            for batch in loader:
                yield send_to_device(batch, accelerator.device)
            epoch, step_in_epoch = epoch + 1, 0

    # Validation: a fixed sample, one fixed template per example. Test: every example under every template.
    eval_collator = GlueSeq2SeqCollator(
        tokenizer, config["max_source_length"], config["max_target_length"], include_text_fields=True
    )
    validation_rows = build_split(config, raw, "validation")
    validation_rows = sample_per_task(validation_rows, config["validation_examples_per_task"], config["seed"])
    test_rows = build_split(config, raw, "test")
    validation_loaders = per_task_loaders(validation_rows, config["eval_batch_size"], eval_collator)
    test_loaders = per_task_loaders(test_rows, config["eval_batch_size"], eval_collator)
    validation_answer_lengths = answer_lengths(validation_rows, tokenizer)
    test_answer_lengths = answer_lengths(test_rows, tokenizer)

    # -- optimiser: AdamW 3e-4, no weight decay, 2k warmup steps then constant (authors) -----------------------------
    # (torch's AdamW adds epsilon after bias correction, transformers 3.5's before: see docs/index.md#deviations...)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config["learning_rate"],
        weight_decay=config["weight_decay"],
        eps=config["adam_epsilon"],
    )
    scheduler = transformers.get_constant_schedule_with_warmup(optimizer, config["warmup_steps"])
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    validation_loaders = {task: accelerator.prepare(loader) for task, loader in validation_loaders.items()}
    test_loaders = {task: accelerator.prepare(loader) for task, loader in test_loaders.items()}
    check_grad_clipping(accelerator, config["max_grad_norm"])  # DeepSpeed clips itself: same norm, or a warning

    # -- resume: model (with ST-Gumbel's temperature buffer), optimizer, scheduler and every process's RNG states ----
    start_step = 0
    if checkpoint:
        start_step = load_checkpoint(accelerator, checkpoint)
        accelerator.print(f"Resumed from {checkpoint} at step {start_step}.")
    # Mark the folder as this run's (a fresh start first removes the earlier run's own checkpoints, nothing else).
    start_run(output_dir, "glue.py", accelerator.is_main_process, fresh=checkpoint is None)
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    accelerator.wait_for_everyone()
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    accelerator.init_trackers("glue", config=hparams)

    # -- training loop ----------------------------------------------------------------------------------------------
    accelerator.print(
        f"{config['max_steps']} steps of {config['batch_size']} examples ({processes} processes x "
        f"{per_device_batch_size} x {accumulation} accumulation), {steps_per_epoch} steps per epoch"
    )
    model.train()
    batches = train_batches(start_step)
    token_loss, tokens = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    validation = {}
    started = time.perf_counter()
    progress = tqdm(
        range(start_step, config["max_steps"]), initial=start_step, total=config["max_steps"],
        disable=not accelerator.is_main_process,
    )
    for step in progress:
        temperatures = smear.set_training_step(step)  # ST-Gumbel: the authors' annealed temperature (else a no-op)
        for micro_step in range(accumulation):
            batch = next(batches)
            # Average gradients across processes only once, after the last micro-batch.
            last = micro_step == accumulation - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                # T5 builds its decoder inputs from `labels`; routing_tags (tag) and routing_keys (hash) reach the
                # routers. The per-example losses are the label-smoothed token NLL summed over each target, as the
                # authors' loss and REINFORCE's reward.
                outputs = model(**batch)
                example_losses = per_example_seq2seq_loss(outputs.logits, batch["labels"], config["label_smoothing"])
                num_tokens = batch["labels"].ne(-100).sum()
                # Gradients of the micro-batches add up on each process, and DDP averages them over processes.
                if config["loss_reduction"] == "sum":  # authors: the sum over all target tokens of the 128 examples
                    task_loss = example_losses.sum() * processes
                else:  # deviation: the token mean of each micro-batch, averaged over micro-batches and processes
                    task_loss = example_losses.sum() / num_tokens / accumulation
                # REINFORCE's policy, entropy and baseline terms (a mean over the batch; zero for other methods).
                loss = task_loss + reinforce_loss(outputs, example_losses) / accumulation
                accelerator.backward(loss)
            token_loss += example_losses.detach().sum()
            tokens += num_tokens
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if done % config["log_every"] == 0 or done == config["max_steps"]:
            token_loss, tokens = accelerator.reduce(token_loss, "sum"), accelerator.reduce(tokens, "sum")
            logs = {
                "train/loss_per_token": (token_loss / tokens).item(),
                "train/grad_norm": float(grad_norm),
                "train/learning_rate": scheduler.get_last_lr()[0],
            }
            logs.update({f"train/gumbel_temperature/{name}": tau for name, tau in temperatures.items()})
            accelerator.log(logs, step=done)
            progress.set_postfix(loss=f"{logs['train/loss_per_token']:.4f}")
            token_loss.zero_()
            tokens.zero_()

        # The checkpoint comes first: a failing validation must not cost the steps since the last one.
        if done % config["checkpoint_every"] == 0:
            save_checkpoint(accelerator, output_dir, done, config["checkpoints_total_limit"])
        if done % config["eval_every"] == 0 or done == config["max_steps"]:
            validation = evaluate(model, validation_loaders, tokenizer, accelerator, validation_answer_lengths)
            accelerator.log({f"validation/{k}": v for k, v in numbers(validation).items()}, step=done)
            accelerator.print(
                f"\nstep {done}: validation average {validation['average_over_metric_entries']:.2f} "
                f"(over tasks {validation['average_over_tasks']:.2f})"
            )
    train_seconds = time.perf_counter() - started

    # -- test: every example under every template, greedy generation ------------------------------------------------
    # The authors test the weights at the end of training (their best-checkpoint reload is commented out).
    test = evaluate(model, test_loaders, tokenizer, accelerator, test_answer_lengths)
    accelerator.log({f"test/{k}": v for k, v in numbers(test).items()}, step=config["max_steps"])
    accelerator.print(metrics_table(test))

    # Gathered on every process (FSDP / ZeRO-3 shards), written by rank 0, read back: raises on an empty adapter.
    save_adapter(model, output_dir, accelerator=accelerator)
    if accelerator.is_main_process:
        if authors_weights is not None:  # the frozen cross-attention bias, needed to reload the adapter exactly
            save_authors_backbone(authors_weights, output_dir)
        metrics = {
            "step": config["max_steps"],
            "routing": config["routing"] + ("+" if config["tag_plus"] else ""),
            "train_seconds_this_run": train_seconds,
            "test": test,
            "validation": validation,
        }
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        accelerator.print(f"Adapter and metrics.json saved in {output_dir}")
        if config["push_to_hub"]:
            # The folder just saved (gathered on every process, read back), with its SMEAR model card and the frozen
            # cross-attention bias the adapter was trained with; never this process's module, which holds shards.
            push_saved_adapter(
                output_dir, config["hub_model_id"], num_blocks=sum(1 for _ in smear.smear_layers()),
                extra_files=["authors_backbone.safetensors"] if authors_weights is not None else [],
            )
    accelerator.end_training()


if __name__ == "__main__":
    main()
