"""The CLIP tokenizer: transformers' CLIPTokenizer reading a checkpoint's ``tokenizer/``.

SD pipelines tokenise to 77 tokens, padded to max length and truncated. SD 1.x pads with
``<|endoftext|>`` (id 49407), SD 2.x with ``!`` (id 0): whatever the folder's
tokenizer_config says is used. `build_clip_bpe_tokenizer` rebuilds CLIP's real
vocabulary from the ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships, for machines
that cannot download a tokenizer.

transformers is imported inside the functions that build a tokenizer: it is a heavy
import, and importing jaxmed (or a model) should not pay for it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Sequence

import numpy as np

MAX_LENGTH = 77


def load_tokenizer(folder: str):
    """CLIPTokenizer from ``folder`` (a ``tokenizer/`` dir, or a model folder holding one)."""
    from transformers import CLIPTokenizer

    if os.path.isdir(os.path.join(folder, "tokenizer")):
        folder = os.path.join(folder, "tokenizer")
    files = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if not ({"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files):
        raise FileNotFoundError(
            f"{folder}: no CLIP tokenizer here (need vocab.json + merges.txt, or "
            f"tokenizer.json); found {sorted(files)}"
        )
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """(B, max_length) int32 ids, padded to max length and truncated, as SD pipelines do."""
    if isinstance(texts, str):
        texts = [texts]
    max_length = max_length or min(getattr(tokenizer, "model_max_length", MAX_LENGTH), 10_000)
    ids = tokenizer(
        list(texts), padding="max_length", max_length=max_length, truncation=True,
        return_tensors="np",
    ).input_ids
    return ids.astype(np.int32)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP's reversible byte -> printable unicode map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_bpe_tokenizer(bpe_gz: str, out_dir: str, pad_token: str = "<|endoftext|>"):
    """Write CLIP's vocab.json + merges.txt (49,408 tokens, 48,894 merges) from open_clip's
    ``bpe_simple_vocab_16e6.txt.gz`` and return the CLIPTokenizer loaded from ``out_dir``."""
    from transformers import CLIPTokenizer

    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # what CLIP's SimpleTokenizer keeps
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    tok = CLIPTokenizer(
        vocab=os.path.join(out_dir, "vocab.json"), merges=os.path.join(out_dir, "merges.txt"),
        pad_token=pad_token, model_max_length=MAX_LENGTH,
    )
    tok.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def open_clip_bpe_path() -> str:
    """Path of the BPE vocabulary that the open-clip-torch wheel ships."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open_clip is not installed; `pip install --no-deps open-clip-torch` provides "
            "bpe_simple_vocab_16e6.txt.gz (CLIP's BPE vocabulary)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found in the installed open_clip package")
    return path
