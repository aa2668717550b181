"""A real transformers CLIPTokenizer over a tiny byte-level vocabulary, written to a folder offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import CLIPTokenizer

MERGES = ("t h", "th e</w>", "i n", "in g</w>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def build_tiny_clip_tokenizer(directory: Path, *, model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json, merges.txt, tokenizer_config.json to ``directory`` and load them offline."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols)]
    tokens += ["".join(merge.split()) for merge in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    config = {
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True)
