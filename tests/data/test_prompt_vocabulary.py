"""Which words of the study's prompts the tiny foundation model's text tower never saw in
pretraining (docs/STUDY.md "Where jaxmed departs from the study" cites this list)."""

from __future__ import annotations

import os

import pytest

from jaxmed.data import corpus
from jaxmed.data.captions import NORMAL_CAPTION, caption_from_labels
from jaxmed.data.labels import CONDITIONS, LABELS
from tests.helpers import ROOT

# The words of the study's six prompts (and the normal caption) none of whose BPE tokens
# any pretraining caption contains: all but "with" (and the hyphen of "X-ray", seen in
# "close-up"). The medical words split into sub-word pieces the tower never saw either.
UNSEEN_WORDS = {"chest", "x", "ray", "showing", "cardiomegaly", "lung", "opacity", "edema",
                "no", "finding", "pneumothorax", "pleural", "effusion", "normal",
                "significant", "findings"}


def study_prompts() -> list[str]:
    prompts = [caption_from_labels([1.0 if c == k else 0.0 for c in LABELS]) for k in CONDITIONS]
    return prompts + [NORMAL_CAPTION]


def test_prompt_tokens_the_text_tower_never_saw():
    tokenizers = pytest.importorskip("tokenizers")  # transformers' fast backend, quick to load
    bpe = tokenizers.Tokenizer.from_file(
        os.path.join(ROOT, "jaxmed", "assets", "tiny-sd", "tokenizer", "tokenizer.json"))
    bpe.no_padding()

    def tokens(text):
        return set(bpe.encode(text, add_special_tokens=False).tokens)

    seen = set().union(*(tokens(c) for c in corpus.possible_captions()))
    words = {w for p in study_prompts() for w in p.lower().replace("-", " - ").split()}
    unseen = {w for w in words if not tokens(w) & seen}
    assert unseen == UNSEEN_WORDS
    assert words - unseen == {"with", "-"}


def test_possible_captions_cover_a_rendered_corpus(tmp_path):
    pytest.importorskip("skimage")
    import csv

    corpus.make_corpus(str(tmp_path), 40, 32, seed=5, progress=False)
    with open(tmp_path / "captions.csv") as f:
        caps = {r["caption"] for r in csv.DictReader(f)}
    assert caps <= corpus.possible_captions()
