"""An offline text multitask benchmark for routing: symbol-sequence tasks with prompts, for a tiny T5.

Vocabulary (one token per symbol, no tokenizer needed)::

    0 <pad> (also T5's decoder start)   1 </s>   2..9 sentinels <extra_id_0..7> (pretraining only)
    10..25 content symbols a..p          26.. prompt words (COPY, REVERSE, MIRROR, SHIFT, SORT, UP, DOWN)

Tasks (``TEXT_TASKS``; a task's position is its routing tag). ``x`` is a sequence of 3-6 content symbols, ``+1``
shifts every symbol to the next one (cyclically, p -> a)::

    tag  name               prompt               target           relation
    0    copy               COPY x               x
    1    reverse            REVERSE x            reversed(x)
    2    mirror             MIRROR x             reversed(x)      = reverse, but low-resource (Tag+ maps it to 1)
    3    shift_up           SHIFT UP x           x + 1            conflicts with 4 (same prefix, inverse output)
    4    shift_down         SHIFT DOWN x         x - 1
    5    sort_up            SORT UP x            sorted(x)        conflicts with 6
    6    sort_down          SORT DOWN x          sorted(x)[::-1]  shares the reversal with 1/2
    7    reverse_shift_up   REVERSE SHIFT UP x   reversed(x) + 1  composes 1 and 3

so some tasks share structure (reverse / mirror / reverse_shift_up / sort_down; shift_up / reverse_shift_up) and some
conflict (a shared prompt prefix asking for inverse outputs). Tag routing gives every task its own expert, which is
wasteful for ``mirror`` (few examples, identical to ``reverse``): the hand-made Tag+ mapping ``mirror -> reverse`` fixes
that, and learned routing can discover it (and other sharing) from the inputs.

Pretraining data for the backbone (`denoising_batch`): structured random sequences (noise, progressions, sorted runs,
palindromes, repeats) with spans replaced by sentinels, reconstructed in full.

Causal-LM form (for a decoder-only model, ``quality.py --benchmarks text_causal``): the same tasks and splits, each
example written as one sequence ``prompt x SEP target EOS`` with labels -100 on ``prompt x SEP`` (`causal_collate`;
``SEP`` is one extra token, 33). Its backbone is pretrained with a language-model objective on the same denoising
pairs written as one document, ``corrupted SEP original EOS`` (`causal_lm_batch`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PAD, EOS = 0, 1
NUM_SENTINELS = 8
SENTINEL0 = 2
NUM_SYMBOLS = 16
SYMBOL0 = SENTINEL0 + NUM_SENTINELS  # 10
WORDS = ("COPY", "REVERSE", "MIRROR", "SHIFT", "SORT", "UP", "DOWN")
WORD0 = SYMBOL0 + NUM_SYMBOLS  # 26
WORD = {w: WORD0 + i for i, w in enumerate(WORDS)}
VOCAB_SIZE = WORD0 + len(WORDS)  # 33

MIN_LEN, MAX_LEN = 3, 6


def _shift(x: list[int], k: int) -> list[int]:
    return [SYMBOL0 + (s - SYMBOL0 + k) % NUM_SYMBOLS for s in x]


@dataclass(frozen=True)
class TextTask:
    name: str
    prompt: tuple[str, ...]
    train_size: int

    def target(self, x: list[int]) -> list[int]:
        return _TARGETS[self.name](x)


_TARGETS = {
    "copy": lambda x: list(x),
    "reverse": lambda x: x[::-1],
    "mirror": lambda x: x[::-1],
    "shift_up": lambda x: _shift(x, 1),
    "shift_down": lambda x: _shift(x, -1),
    "sort_up": lambda x: sorted(x),
    "sort_down": lambda x: sorted(x)[::-1],
    "reverse_shift_up": lambda x: _shift(x[::-1], 1),
}

TEXT_TASKS: tuple[TextTask, ...] = (
    TextTask("copy", ("COPY",), 1000),
    TextTask("reverse", ("REVERSE",), 1000),
    TextTask("mirror", ("MIRROR",), 60),
    TextTask("shift_up", ("SHIFT", "UP"), 1000),
    TextTask("shift_down", ("SHIFT", "DOWN"), 1000),
    TextTask("sort_up", ("SORT", "UP"), 1000),
    TextTask("sort_down", ("SORT", "DOWN"), 1000),
    TextTask("reverse_shift_up", ("REVERSE", "SHIFT", "UP"), 1000),
)
TEXT_TASK_NAMES = tuple(t.name for t in TEXT_TASKS)
#: Tag+ for this benchmark: the low-resource ``mirror`` uses ``reverse``'s expert (on both sides: unlike RTE/MNLI in
#: the paper, the two tasks also produce the same kind of output).
TEXT_TAG_PLUS = {"mirror": "reverse"}


@dataclass
class TextSplit:
    input_ids: list[list[int]]
    labels: list[list[int]]
    tags: list[int]

    def __len__(self) -> int:
        return len(self.tags)


def _random_content(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randrange(SYMBOL0, SYMBOL0 + NUM_SYMBOLS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_text_splits(seed: int = 0, test_size: int = 100, train_scale: float = 1.0) -> dict[str, TextSplit]:
    """Train / test splits of every task; a task's test contents never occur in its training set."""
    rng = random.Random(1000 + seed)
    splits = {"train": TextSplit([], [], []), "test": TextSplit([], [], [])}
    for tag, task in enumerate(TEXT_TASKS):
        seen: set[tuple[int, ...]] = set()
        sizes = {"test": test_size, "train": max(8, round(task.train_size * train_scale))}
        for split in ("test", "train"):
            count = 0
            while count < sizes[split]:
                x = _random_content(rng)
                if x in seen:
                    continue
                seen.add(x)
                prompt = [WORD[w] for w in task.prompt]
                splits[split].input_ids.append(prompt + list(x) + [EOS])
                splits[split].labels.append(task.target(list(x)) + [EOS])
                splits[split].tags.append(tag)
                count += 1
    return splits


def pad_batch(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate(split: TextSplit, indices) -> dict[str, torch.Tensor]:
    input_ids = pad_batch([split.input_ids[i] for i in indices], PAD)
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(PAD).long(),
        "labels": pad_batch([split.labels[i] for i in indices], -100),
        "routing_tags": torch.tensor([split.tags[i] for i in indices], dtype=torch.long),
    }


def _pretraining_sequence(rng: random.Random, min_len: int, max_len: int) -> list[int]:
    """A random sequence with some structure, the way text has structure: uniform noise, an arithmetic progression
    (cyclic over the symbols), a sorted run, a palindrome, or a repeated half. Words are sprinkled in."""
    n = rng.randint(min_len, max_len)
    kind = rng.randrange(5)
    if kind == 0:
        seq = [rng.randrange(NUM_SYMBOLS) for _ in range(n)]
    elif kind == 1:
        first, step = rng.randrange(NUM_SYMBOLS), rng.choice((1, -1, 2, -2, 3))
        seq = [(first + i * step) % NUM_SYMBOLS for i in range(n)]
    elif kind == 2:
        seq = sorted(rng.randrange(NUM_SYMBOLS) for _ in range(n))
        seq = seq if rng.random() < 0.5 else seq[::-1]
    elif kind == 3:
        half = [rng.randrange(NUM_SYMBOLS) for _ in range((n + 1) // 2)]
        seq = half + half[::-1][n % 2:]
    else:
        half = [rng.randrange(NUM_SYMBOLS) for _ in range((n + 1) // 2)]
        seq = (half + half)[:n]
    seq = [SYMBOL0 + s for s in seq]
    if rng.random() < 0.5:  # a word or two before the sequence, as prompts will have
        seq = [WORD0 + rng.randrange(len(WORDS)) for _ in range(rng.randint(1, 2))] + seq
    return seq


def _denoising_pair(rng: random.Random, min_len: int, max_len: int, noise: float) -> tuple[list[int], list[int]]:
    """One pretraining example: a structured sequence with spans replaced by sentinels, and the whole original."""
    seq = _pretraining_sequence(rng, min_len, max_len)
    masked = [False] * len(seq)
    budget = max(1, round(noise * len(seq)))
    while sum(masked) < budget:
        start = rng.randrange(len(seq))
        for i in range(start, min(len(seq), start + rng.randint(1, 3))):
            masked[i] = True
    source, sentinel, i = [], SENTINEL0, 0
    while i < len(seq):
        if masked[i] and sentinel < SENTINEL0 + NUM_SENTINELS:
            source.append(sentinel)
            sentinel += 1
            while i < len(seq) and masked[i]:
                i += 1
        else:
            source.append(seq[i])
            i += 1
    return source, seq


def denoising_batch(rng: random.Random, batch_size: int, min_len: int = 4, max_len: int = 12,
                    noise: float = 0.25) -> dict[str, torch.Tensor]:
    """Denoising pretraining (BART-style reconstruction): spans of the input are replaced by sentinels, and the target
    is the whole original sequence, so the backbone learns to copy and to infer missing symbols from structure."""
    inputs, targets = [], []
    for _ in range(batch_size):
        source, seq = _denoising_pair(rng, min_len, max_len, noise)
        inputs.append(source + [EOS])
        targets.append(seq + [EOS])
    input_ids = pad_batch(inputs, PAD)
    return {"input_ids": input_ids, "attention_mask": input_ids.ne(PAD).long(), "labels": pad_batch(targets, -100)}


# ---------------------------------------------------------------------------------------------------------------------
# Causal-LM form (a decoder-only model: prompt -> answer in one sequence)
# ---------------------------------------------------------------------------------------------------------------------
#: Separator between a causal example's prompt and its answer (a token the T5 form does not use).
SEP = VOCAB_SIZE  # 33
CAUSAL_VOCAB_SIZE = VOCAB_SIZE + 1  # 34


def causal_example(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """A T5-form example as one causal sequence ``prompt x SEP target EOS`` with labels -100 on ``prompt x SEP``
    (the T5 input's final EOS becomes the separator)."""
    prompt = input_ids[:-1] + [SEP]
    return prompt + labels, [-100] * len(prompt) + labels


def causal_collate(split: TextSplit, indices) -> dict[str, torch.Tensor]:
    """Right-padded causal batch: labels are aligned with ``input_ids`` and -100 on the prompt and on padding, so a
    SMEAR causal LM routes each example on its prompt."""
    pairs = [causal_example(split.input_ids[i], split.labels[i]) for i in indices]
    input_ids = pad_batch([p[0] for p in pairs], PAD)
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(PAD).long(),
        "labels": pad_batch([p[1] for p in pairs], -100),
        "routing_tags": torch.tensor([split.tags[i] for i in indices], dtype=torch.long),
    }


def causal_lm_batch(rng: random.Random, batch_size: int, min_len: int = 4, max_len: int = 12,
                    noise: float = 0.25) -> dict[str, torch.Tensor]:
    """Language-model pretraining, the causal mirror of `denoising_batch`: every document is the denoising pair
    written as one sequence, ``corrupted SEP original EOS``, and the loss is next-token prediction on every real
    token (the corrupted half is plain structured text with sentinels; the half after ``SEP`` teaches the model to
    reproduce and complete what came before the separator, as the T5 decoder learns from denoising)."""
    documents = []
    for _ in range(batch_size):
        source, seq = _denoising_pair(rng, min_len, max_len, noise)
        documents.append(source + [SEP] + seq + [EOS])
    input_ids = pad_batch(documents, PAD)
    return {"input_ids": input_ids, "attention_mask": input_ids.ne(PAD).long(), "labels": pad_batch(documents, -100)}
