"""Builds the embedded default model: a small random-init Llama/Qwen2/Qwen3 and a BPE tokenizer.

No model hub is reachable where Tink is developed and tested, so the default model is made
locally, deterministically, and saved with `save_pretrained` like any hub checkpoint: every
loader in Tink then reads it exactly as it reads a real model folder.

    >>> from src.tiny_model import ensure_tiny_model
    >>> path = ensure_tiny_model("/tmp/tiny-llama")          # ~1 s the first time
    >>> AutoModelForCausalLM.from_pretrained(path)           # a real HF model folder

The shape (head_dim 64, 2 layers) is the smallest that vLLM's CPU attention accepts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

_WORDS = (
    "the a an one two three red blue green big small happy sad cat dog bird fish tree house "
    "river sun moon star yes no maybe hello world good bad fast slow up down left right open "
    "close run walk jump sing read write play work sleep eat drink think see hear say ask "
    "answer question word number apple banana orange water fire earth wind light dark day "
    "night morning evening friend family city road car train boat plane book story song"
).split()


def _corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English sentences: enough for BPE to learn word-level merges."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 12)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
        out.append(sentence.capitalize() + rng.choice([".", "?", "!"]))
    out.extend(str(i) for i in range(200))
    return out


def build_tokenizer(vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def build_model(tokenizer, family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 128,
                tied: bool = False):
    """A random-init causal LM whose vocabulary matches `tokenizer` (fp32).

    `tied=True` shares lm_head with the input embeddings, as Qwen2.5-0.5B and Qwen3-0.6B do.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
        torch_dtype="float32",
    )
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family == "qwen3":
        config = Qwen3Config(**common)
    else:
        raise ValueError(f"unknown tiny model family {family!r}: use 'llama', 'qwen2' or 'qwen3'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # A wider init than the default 0.02 makes the random model's next-token distribution
    # less flat, so greedy decoding is well defined and HF/vLLM comparisons are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model


def ensure_tiny_model(path: str | os.PathLike, family: str = "llama", seed: int = 0, tied: bool = False) -> Path:
    """Build the tiny model into `path` unless a complete one is already there; return the path.

    The folder appears atomically (built in a sibling temp folder, then renamed), so a
    concurrent or interrupted build never leaves a half-written model behind.
    """
    path = Path(path).expanduser().resolve()
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, family=family, seed=seed, tied=tied)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, path)
        except OSError:
            if not (path / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build Tink's tiny local model folder.")
    parser.add_argument("path")
    parser.add_argument("--family", default="llama", choices=["llama", "qwen2", "qwen3"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tied", action="store_true", help="share lm_head with the input embeddings")
    args = parser.parse_args()
    print(ensure_tiny_model(args.path, args.family, args.seed, args.tied))


if __name__ == "__main__":
    main()
