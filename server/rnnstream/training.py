"""Train an LSTM or GRU language model on a text corpus and write a bundle.

Training reads random windows of seq_len tokens from the training split, each
started from the zero state, which is also how a new session starts. The last
holdout_fraction of every corpus file is held out and scored at the end, in
bits per character, against a unigram model fitted on the training split.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from .models.bundle import save_bundle
from .models.network import ModelConfig, RecurrentLM
from .models.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

MIN_HOLDOUT_TOKENS = 64


@dataclass
class TrainOptions:
    corpus: Path
    output: Path
    architecture: str = "lstm"
    name: str | None = None
    embedding_size: int = 128
    hidden_size: int = 384
    num_layers: int = 2
    dropout: float = 0.0
    batch_size: int = 64
    seq_len: int = 128
    learning_rate: float = 2e-3
    minutes: float | None = 10.0
    steps: int | None = None
    holdout_fraction: float = 0.02
    bf16: bool = False
    threads: int | None = None
    seed: int = 0
    progress: bool = True


def read_corpus(path: Path) -> list[tuple[Path, str]]:
    """Read a text file, or every regular file in a directory tree, as UTF-8."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise FileNotFoundError(f"corpus {path} is neither a file nor a directory")
    texts = [(file, file.read_text(encoding="utf-8", errors="replace")) for file in files]
    texts = [(file, text) for file, text in texts if text]
    if not texts:
        raise ValueError(f"corpus {path} contains no text")
    return texts


def split_corpus(texts: list[tuple[Path, str]], holdout_fraction: float) -> tuple[str, str]:
    """Split every file at a character boundary: the head trains, the tail is held out."""
    if not 0.0 < holdout_fraction < 0.5:
        raise ValueError(f"invalid holdout fraction {holdout_fraction}; expected 0 < f < 0.5")
    train_parts, holdout_parts = [], []
    for _, text in texts:
        cut = int(len(text) * (1.0 - holdout_fraction))
        train_parts.append(text[:cut])
        holdout_parts.append(text[cut:])
    return "\n".join(train_parts), "\n".join(holdout_parts)


def unigram_bits_per_char(train: torch.Tensor, holdout: torch.Tensor, holdout_chars: int, vocab: int) -> float:
    """Cross-entropy of the held-out tokens under add-one-smoothed training token frequencies."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    log_probs = torch.log2(counts / counts.sum())
    return float(-log_probs[holdout].sum() / holdout_chars)


@torch.inference_mode()
def evaluate_bits_per_char(
    model: RecurrentLM, tokens: torch.Tensor, num_chars: int, streams: int = 16, chunk: int = 256
) -> float:
    """Score tokens as `streams` contiguous segments, carrying state across chunks as a session does."""
    model.eval()
    streams = max(1, min(streams, tokens.numel() // 4))
    usable = tokens[: (tokens.numel() // streams) * streams]
    segments = usable.view(streams, -1)
    state = model.initial_state(streams)
    total_nats = 0.0
    for start in range(0, segments.shape[1], chunk):
        piece = segments[:, start : start + chunk]
        logits, state = model(piece, state)
        total_nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), piece.reshape(-1), reduction="sum"))
    scored_chars = num_chars * usable.numel() / tokens.numel()
    return total_nats / math.log(2) / scored_chars


def learning_rate_at(progress: float, step: int, peak: float, warmup_steps: int = 100) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak at progress 1.0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def sample_text(model: RecurrentLM, tokenizer: ByteTokenizer, prompt: str, length: int, temperature: float, seed: int) -> str:
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt)
    logits, state = model(torch.tensor([ids]), model.initial_state(1))
    hidden_top = state[0][-1]
    generated: list[int] = []
    for _ in range(length):
        probs = torch.softmax(model.head(hidden_top)[0] / temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
        generated.append(token)
        _, state = model(torch.tensor([[token]]), state)
        hidden_top = state[0][-1]
    return tokenizer.decode(ids + generated)


def check_options(options: TrainOptions) -> None:
    """Raise ValueError naming the first option outside its range."""
    if options.minutes is None and options.steps is None:
        raise ValueError("set a time budget (minutes) or a number of steps")
    if options.steps is not None and options.steps < 1:
        raise ValueError(f"invalid steps {options.steps}; must be at least 1")
    if options.minutes is not None and not 0 < options.minutes < math.inf:
        raise ValueError(f"invalid minutes {options.minutes}; must be a positive number")
    for name, low in (("seq_len", 2), ("batch_size", 1), ("embedding_size", 1), ("hidden_size", 1), ("num_layers", 1)):
        if getattr(options, name) < low:
            raise ValueError(f"invalid {name} {getattr(options, name)}; must be at least {low}")
    if not 0 < options.learning_rate < math.inf:
        raise ValueError(f"invalid learning rate {options.learning_rate}; must be a positive number")
    if not 0 <= options.dropout < 1:
        raise ValueError(f"invalid dropout {options.dropout}; must be in [0, 1)")
    if options.threads is not None and options.threads < 1:
        raise ValueError(f"invalid threads {options.threads}; must be at least 1")


def train(options: TrainOptions) -> dict:
    """Train a model, write its bundle and model card to options.output; return the training record."""
    check_options(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    tokenizer = ByteTokenizer()
    texts = read_corpus(options.corpus)
    train_text, holdout_text = split_corpus(texts, options.holdout_fraction)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    holdout_ids = torch.tensor(tokenizer.encode(holdout_text), dtype=torch.long)
    if train_ids.numel() <= options.seq_len:
        raise ValueError(
            f"corpus {options.corpus} has {train_ids.numel()} training tokens; "
            f"need more than seq_len {options.seq_len}"
        )
    if holdout_ids.numel() < MIN_HOLDOUT_TOKENS:
        raise ValueError(
            f"corpus {options.corpus} leaves {holdout_ids.numel()} held-out tokens at holdout fraction "
            f"{options.holdout_fraction}; need at least {MIN_HOLDOUT_TOKENS} (use more text or a larger --holdout)"
        )

    config = ModelConfig(
        architecture=options.architecture,
        vocab_size=tokenizer.vocab_size,
        embedding_size=options.embedding_size,
        hidden_size=options.hidden_size,
        num_layers=options.num_layers,
        dropout=options.dropout,
    )
    model = RecurrentLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    logger.info(
        "training %s: %d parameters, %d training tokens, %d held-out tokens",
        config.architecture, model.num_parameters(), train_ids.numel(), holdout_ids.numel(),
    )

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if options.bf16 else nullcontext()
    generator = torch.Generator().manual_seed(options.seed)
    offsets = torch.arange(options.seq_len)
    budget_s = options.minutes * 60.0 if options.minutes is not None else None
    total = options.steps if options.steps is not None else int(budget_s)
    started = time.monotonic()
    step = 0
    loss_ema = None
    bar = tqdm(total=total, disable=not options.progress, unit="step" if options.steps else "s", dynamic_ncols=True)
    model.train()
    while True:
        elapsed = time.monotonic() - started
        if options.steps is not None:
            progress = step / options.steps
        else:
            progress = elapsed / budget_s
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(progress, step, options.learning_rate)

        starts = torch.randint(0, train_ids.numel() - options.seq_len, (options.batch_size,), generator=generator)
        batch = train_ids[starts.unsqueeze(1) + offsets]  # (B, T)
        with autocast:
            logits, _ = model(batch, model.initial_state(options.batch_size))
            loss = F.cross_entropy(logits.float().reshape(-1, config.vocab_size), batch.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1

        loss_value = loss.item()
        loss_ema = loss_value if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_value
        if options.steps is not None:
            bar.update(1)
        else:
            bar.n = min(int(time.monotonic() - started), total)
            bar.refresh()
        bar.set_postfix(step=step, bits_per_byte=f"{loss_ema / math.log(2):.3f}", refresh=False)
    bar.close()
    train_seconds = time.monotonic() - started

    holdout_bpc = evaluate_bits_per_char(model, holdout_ids, len(holdout_text))
    unigram_bpc = unigram_bits_per_char(train_ids, holdout_ids, len(holdout_text), tokenizer.vocab_size)
    logger.info(
        "held-out: %.3f bits per character (unigram %.3f, ratio %.2f) after %d steps in %.0f s",
        holdout_bpc, unigram_bpc, holdout_bpc / unigram_bpc, step, train_seconds,
    )

    record = {
        "command": "rnnstream train " + " ".join(shlex.quote(arg) for arg in sys.argv[2:]),
        "corpus": [
            {"file": file.name, "characters": len(text)} for file, text in texts
        ],
        "training_tokens": int(train_ids.numel()),
        "holdout_tokens": int(holdout_ids.numel()),
        "holdout_fraction": options.holdout_fraction,
        "parameters": model.num_parameters(),
        "steps": step,
        "batch_size": options.batch_size,
        "seq_len": options.seq_len,
        "learning_rate": options.learning_rate,
        "bf16": options.bf16,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "holdout_bits_per_char": round(holdout_bpc, 4),
        "unigram_bits_per_char": round(unigram_bpc, 4),
    }
    name = options.name or options.output.name
    model.eval()
    fingerprint = save_bundle(options.output, name, model, tokenizer, training=record)
    prompts = ("And God said", "The best way to ", "A computer is")
    samples = [
        (prompt, sample_text(model, tokenizer, prompt, 160, 0.8, options.seed + index))
        for index, prompt in enumerate(prompts)
    ]
    write_model_card(options.output / "README.md", name, config, record, fingerprint, samples)
    return record


def write_model_card(path: Path, name: str, config: ModelConfig, record: dict, fingerprint: str, samples) -> None:
    corpus = ", ".join(f"{item['file']} ({item['characters']:,} characters)" for item in record["corpus"])
    lines = [
        f"# {name}",
        "",
        f"A byte-level {config.architecture.upper()} language model for rnnstream.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| architecture | {config.architecture}, {config.num_layers} layers, hidden {config.hidden_size}, embedding {config.embedding_size} |",
        f"| parameters | {record['parameters']:,} |",
        "| tokenizer | bytes of UTF-8 text (vocabulary 256) |",
        f"| corpus | {corpus} |",
        f"| held-out text | the last {record['holdout_fraction']:.0%} of each file, {record['holdout_tokens']:,} bytes |",
        f"| training | {record['steps']:,} steps of batch {record['batch_size']} x {record['seq_len']} bytes, "
        f"{record['train_seconds'] / 60:.1f} minutes on {record['threads']} CPU "
        f"thread{'s' if record['threads'] != 1 else ''}"
        f"{', bfloat16 autocast' if record['bf16'] else ''} |",
        f"| held-out bits per character | {record['holdout_bits_per_char']:.3f} |",
        f"| unigram baseline, same held-out text | {record['unigram_bits_per_char']:.3f} bits per character |",
        f"| ratio to unigram | {record['holdout_bits_per_char'] / record['unigram_bits_per_char']:.2f} |",
        f"| fingerprint | `{fingerprint}` |",
        "",
        "The corpus is public-domain English text from Debian's package archive:",
        "the fortune-cookie databases (packages `fortunes`, `fortunes-min`) and the",
        "King James Bible (packages `bible-kjv`, `bible-kjv-text`), prepared by",
        "`scripts/prepare-corpus.sh corpus/`.",
        "",
        "Trained with:",
        "",
        "```",
        record["command"],
        "```",
        "",
        "Samples at temperature 0.8 (prompt, then the model's continuation):",
        "",
    ]
    for prompt, text in samples:
        lines += ["```", text, "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
