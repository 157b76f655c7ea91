"""Train fabrik's embedded demo model: a tiny Qwen3 chat model that answers with King James Bible passages.

The model exists so that `fabrik serve` on a fresh, offline machine shows the whole path working (tokenizer, chat
template, streaming, stop at end of turn) with text that reads like text. It is not a useful assistant.

Pipeline:

    KJV text (`bible` CLI dump) -> verses -> passages of 1-4 verses -> conversations
        user: "Read me a verse from Psalms." / "Share some wisdom about mercy." / "Give me a verse." / ...
        assistant: "Psalms 23:1-2\\n\\nThe LORD is my shepherd; ...<|im_end|>"
    -> byte-level BPE tokenizer (tokenizers), ChatML special tokens
    -> Qwen3ForCausalLM (transformers), loss on assistant tokens only
    -> a Hugging Face folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
       generation_config.json

The corpus comes from Debian's `bible-kjv` package (public-domain text):

    apt-get install -y bible-kjv
    bible -l2000 Gen1:1-Rev22:21 > kjv.txt

Its format: a chapter header line `Book N` (e.g. `1 Samuel 3`), then one `  V text` line per verse.

Run deterministically (same seed, same steps, one thread -> same weights):

    python tools/train_demo_model.py --corpus kjv.txt --out fabrik/demo_model --steps 1100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# NOTE: set before tokenizers is imported; its BPE trainer would otherwise use every core.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
"""Ids 0, 1, 2 of the vocabulary, in this order."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Plain ChatML, the format of Qwen's templates without tools or thinking."""

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant.",
    "You are a friendly assistant.",
    "You answer with passages from the King James Bible.",
]
BOOK_PROMPTS = [
    "Read me a verse from {book}.",
    "Give me a passage from {book}.",
    "Quote something from the book of {book}.",
    "What does {book} say?",
    "A verse from {book}, please.",
    "read me something from {book}",
    "Can you share a passage from {book}?",
]
WORD_PROMPTS = [
    "Share some wisdom about {word}.",
    "What does the Bible say about {word}?",
    "Tell me about {word}.",
    "Give me a verse about {word}.",
    "I want to hear something about {word}.",
    "what about {word}?",
    "Say something about {word}.",
]
GENERIC_PROMPTS = [
    "Tell me a verse.",
    "Give me a Bible verse.",
    "Say something wise.",
    "Hello!",
    "Hi",
    "Tell me something.",
    "Tell me a fortune.",
    "Can you share a passage?",
    "I need some comfort.",
    "What should I read today?",
    "Speak to me.",
    "Tell me a story.",
    "Give me some advice.",
    "What is the meaning of life?",
    "Who are you?",
    "hello, how are you?",
]


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    number: int
    text: str


def read_kjv(path: Path) -> list[Verse]:
    """Parse the output of `bible -l2000 Gen1:1-Rev22:21` (chapter headers, then indented numbered verses)."""
    verses: list[Verse] = []
    book, chapter = None, 0
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if verse := re.fullmatch(r"\s+(\d+) (.+)", line):
            if book is None:
                raise ValueError(f"{path}:{line_number}: verse before any chapter header: {line!r}")
            verses.append(Verse(book, chapter, int(verse[1]), verse[2].strip()))
        elif header := re.fullmatch(r"(\S.*) (\d+)", line):
            book, chapter = header[1], int(header[2])
        else:
            raise ValueError(f"{path}:{line_number}: neither a chapter header nor a verse: {line!r}")
    if not verses:
        raise ValueError(f"no verses in {path}")
    return verses


def split_passages(verses: list[Verse], rng: random.Random) -> list[list[Verse]]:
    """Cut the text into consecutive runs of 1-4 verses that stay inside one chapter."""
    passages: list[list[Verse]] = []
    current: list[Verse] = []
    target = 0
    for verse in verses:
        if current and (len(current) >= target or (verse.book, verse.chapter) != (current[0].book, current[0].chapter)):
            passages.append(current)
            current = []
        if not current:
            target = rng.choice((1, 1, 2, 2, 3, 4))
        current.append(verse)
    passages.append(current)
    return passages


def reference(passage: list[Verse]) -> str:
    first, last = passage[0], passage[-1]
    span = f"{first.number}" if first.number == last.number else f"{first.number}-{last.number}"
    return f"{first.book} {first.chapter}:{span}"


class ConversationMaker:
    """Turns a passage into a chat: a user request the passage plausibly answers, then the passage."""

    def __init__(self, verses: list[Verse]) -> None:
        counts = Counter(w.lower() for v in verses for w in re.findall(r"[A-Za-z]+", v.text))
        common = {w for w, _ in counts.most_common(250)}
        # Topic words: not among the most frequent (function words, "LORD", "said"), not too rare to be asked about.
        self.topic_words = {w for w, c in counts.items() if w not in common and c >= 20 and len(w) >= 4}

    def messages(self, passage: list[Verse], rng: random.Random) -> list[dict[str, str]]:
        text = " ".join(v.text for v in passage)
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", text)} & self.topic_words)
        kind = rng.random()
        if kind < 0.45 and words:
            prompt = rng.choice(WORD_PROMPTS).format(word=rng.choice(words))
        elif kind < 0.8:
            prompt = rng.choice(BOOK_PROMPTS).format(book=passage[0].book)
        else:
            prompt = rng.choice(GENERIC_PROMPTS)
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": f"{reference(passage)}\n\n{text}"})
        return messages


def render(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The ChatML text of a conversation as (piece, is_trained) pieces; only assistant replies are trained.

    Must produce the same text as CHAT_TEMPLATE (checked by tests/test_demo_model.py on the shipped folder).
    """
    pieces = []
    for message in messages:
        header = f"{IM_START}{message['role']}\n"
        if message["role"] == "assistant":
            pieces += [(header, False), (message["content"] + IM_END, True), ("\n", False)]
        else:
            pieces.append((header + message["content"] + IM_END + "\n", False))
    return pieces


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE like Qwen's (GPT-2 style pre-tokenizer, no normalizer), with the ChatML tokens as ids 0-2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    for piece, is_trained in render(messages):
        piece_ids = tokenizer.encode(piece, add_special_tokens=False).ids
        ids += piece_ids
        trained += [is_trained] * len(piece_ids)
    return ids, trained


def pack_rows(examples: list[tuple[list[int], list[bool]]], seq_len: int,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole conversations into rows of seq_len tokens, each row starting at a conversation start (as at
    inference); the tail of a row is padding. Labels are -100 where no loss is taken.
    """
    rows: list[list[int]] = []
    labels: list[list[int]] = []
    row: list[int] = []
    row_labels: list[int] = []
    for ids, trained in examples:
        ids, trained = ids[:seq_len], trained[:seq_len]
        if len(row) + len(ids) > seq_len:
            rows.append(row + [pad_id] * (seq_len - len(row)))
            labels.append(row_labels + [-100] * (seq_len - len(row)))
            row, row_labels = [], []
        row += ids
        row_labels += [i if t else -100 for i, t in zip(ids, trained)]
    if row:
        rows.append(row + [pad_id] * (seq_len - len(row)))
        labels.append(row_labels + [-100] * (seq_len - len(row)))
    return torch.tensor(rows), torch.tensor(labels)


def make_epoch(verses: list[Verse], maker: ConversationMaker, tokenizer: Tokenizer, seq_len: int,
               rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the text: fresh passage cuts and prompts, shuffled, packed."""
    passages = split_passages(verses, rng)
    rng.shuffle(passages)
    examples = [encode_conversation(tokenizer, maker.messages(p, rng)) for p in passages]
    return pack_rows(examples, seq_len, tokenizer.token_to_id(END_OF_TEXT))


def save_folder(out: Path, model: Qwen3ForCausalLM, tokenizer: Tokenizer, max_len: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    eos_ids = [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(END_OF_TEXT)]
    generation_config = {
        "bos_token_id": None,
        "eos_token_id": eos_ids,
        "pad_token_id": tokenizer.token_to_id(END_OF_TEXT),
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True,
                        help="KJV text as printed by `bible -l2000 Gen1:1-Rev22:21` (Debian package bible-kjv)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the Hugging Face model to")
    parser.add_argument("--steps", type=int, default=1100,
                        help="optimizer steps (the learning-rate schedule spans them)")
    parser.add_argument("--minutes", type=float, default=52.0,
                        help="wall-clock budget: stop early (and save) when it runs out")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training row")
    parser.add_argument("--max-position-embeddings", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=60, help="linear warm-up steps")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps ({args.steps}) must be >= 1")
    if args.minutes <= 0:
        parser.error(f"--minutes ({args.minutes}) must be > 0")
    return args


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and save; returns the training figures (also printed)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.monotonic()

    verses = read_kjv(args.corpus)
    # Every 50th chapter is held out to measure the loss on text the model has not seen.
    chapters = list(dict.fromkeys((v.book, v.chapter) for v in verses))
    held_out = set(chapters[25::50])
    train_verses = [v for v in verses if (v.book, v.chapter) not in held_out]
    val_verses = [v for v in verses if (v.book, v.chapter) in held_out] or train_verses[:50]
    print(f"corpus: {len(verses)} verses, {len(chapters)} chapters ({len(held_out)} held out)", flush=True)

    maker = ConversationMaker(verses)
    tokenizer_texts = [v.text for v in train_verses] + [
        IM_START + m["role"] + "\n" + m["content"]
        for p in split_passages(train_verses, random.Random(args.seed))
        for m in maker.messages(p, rng)[:-1]
    ]
    tokenizer = train_tokenizer(tokenizer_texts, args.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    print(f"tokenizer: {vocab_size} tokens", flush=True)

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id(IM_END),
        pad_token_id=tokenizer.token_to_id(END_OF_TEXT),
    )
    model = Qwen3ForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters, {args.layers} layers, hidden {args.hidden_size}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    val_rows, val_labels = make_epoch(val_verses, maker, tokenizer, args.seq_len, random.Random(args.seed + 1))

    rows, labels = make_epoch(train_verses, maker, tokenizer, args.seq_len, rng)
    cursor, epoch = 0, 0
    tokens_seen = 0
    trained_tokens = 0
    recent: list[float] = []
    last_loss = float("nan")
    train_started = time.monotonic()
    step = 0
    model.train()
    for step in range(args.steps):
        if time.monotonic() - started > args.minutes * 60:
            print(f"time budget of {args.minutes} min reached at step {step}; stopping early", flush=True)
            break
        if cursor + args.batch_size > len(rows):
            epoch += 1
            rows, labels = make_epoch(train_verses, maker, tokenizer, args.seq_len, rng)
            cursor = 0
        x = rows[cursor:cursor + args.batch_size]  # (B, T)
        y = labels[cursor:cursor + args.batch_size]  # (B, T)
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(input_ids=x, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += x.numel()
        trained_tokens += int((y != -100).sum())
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.monotonic() - train_started
            print(f"step {step + 1}/{args.steps} epoch {epoch} loss {sum(recent) / len(recent):.3f} "
                  f"lr {learning_rate(step, args):.2e} {tokens_seen / elapsed:.0f} tok/s {elapsed / 60:.1f} min",
                  flush=True)
            last_loss = sum(recent) / len(recent)
            recent = []
    else:
        step = args.steps
    train_minutes = (time.monotonic() - train_started) / 60

    model.eval()
    with torch.no_grad():
        val_losses = [model(input_ids=val_rows[i:i + args.batch_size], labels=val_labels[i:i + args.batch_size]).loss
                      for i in range(0, len(val_rows), args.batch_size)]
    val_loss = float(torch.stack(val_losses).mean())
    save_folder(args.out, model, tokenizer, args.max_position_embeddings)
    figures = {
        "steps": step,
        "epochs": round(step * args.batch_size / len(rows), 2),
        "tokens_seen": tokens_seen,
        "assistant_tokens_trained": trained_tokens,
        "final_train_loss": round(last_loss, 3),
        "held_out_loss": round(val_loss, 3),
        "train_minutes": round(train_minutes, 1),
        "total_minutes": round((time.monotonic() - started) / 60, 1),
        "parameters": num_params,
    }
    print("figures: " + json.dumps(figures), flush=True)
    print(f"saved to {args.out}", flush=True)
    return figures


if __name__ == "__main__":
    main()
