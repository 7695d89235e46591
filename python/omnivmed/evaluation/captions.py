"""Text-overlap metrics for open answers, reports and captions, computed offline.

BLEU-n: nltk's sentence BLEU with uniform weights over 1..n-grams and Chen & Cherry's
smoothing method 1 (a zero n-gram count becomes epsilon 0.1), so one-word answers do not
collapse to 0. ROUGE-1/ROUGE-L: rouge-score's F-measure on our tokens (so CJK text is
scored too). METEOR: nltk's, with WordNet read from a local folder; without WordNet it is
not computed and the report says why. BERTScore is never downloaded.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

WORDNET_HELP = (
    "WordNet was not found: run `bash scripts/fetch_wordnet.sh` (it unpacks Debian's "
    "wordnet-base into .cache/wordnet and writes the lexnames index nltk needs) and set "
    "OMNIVMED_WORDNET to the folder it prints, or point OMNIVMED_WORDNET at any WordNet 3.0 "
    "dict folder with data.noun, index.noun, ... and lexnames"
)


def bleu(ref: list[str], pred: list[str], n: int, smooth: bool = True) -> float:
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not pred or not ref:
        return 0.0
    weights = tuple([1.0 / n] * n)
    smoothing = SmoothingFunction().method1 if smooth else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsmoothed BLEU warns on zero n-gram counts
        return float(sentence_bleu([ref], pred, weights=weights, smoothing_function=smoothing))


class _Tokens:
    # rouge-score's tokenizer interface, fed tokens we already made
    def tokenize(self, text: str) -> list[str]:
        return text.split()


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=_Tokens())


def rouge(ref: list[str], pred: list[str]) -> dict[str, float]:
    if not pred or not ref:
        return {"rouge1": 0.0, "rouge_l": 0.0}
    s = _rouge().score(" ".join(ref), " ".join(pred))
    return {"rouge1": s["rouge1"].fmeasure, "rouge_l": s["rougeL"].fmeasure}


def _wordnet_roots() -> list[Path]:
    roots = [os.environ.get("OMNIVMED_WORDNET", "")]
    try:
        import nltk

        roots += [str(Path(p) / "corpora" / "wordnet") for p in nltk.data.path]
    except ImportError:
        pass
    roots.append("/usr/share/wordnet")
    return [Path(r) for r in roots if r]


@cache
def wordnet():
    """(WordNet reader, None) or (None, why it is missing)."""
    import warnings

    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNet(WordNetCorpusReader):
        # METEOR needs English synsets only: no mapping to other versions for the
        # multilingual data (which would look for nltk's own download, and index.sense).
        def map_wn(self, version="wordnet"):
            return None

    for root in _wordnet_roots():
        if (root / "data.noun").is_file() and (root / "lexnames").is_file():
            # nltk reads corpora only under its data path: the folder chosen here is added.
            if str(root) not in nltk.data.path:
                nltk.data.path.append(str(root))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions not available"
                return EnglishWordNet(str(root), None), None
    return None, WORDNET_HELP


def meteor(ref: list[str], pred: list[str]) -> float | None:
    from nltk.translate.meteor_score import meteor_score

    wn, _ = wordnet()
    if wn is None:
        return None
    if not pred or not ref:
        return 0.0
    return float(meteor_score([ref], pred, wordnet=wn))


@cache
def _bert_scorer(model_dir: str, num_layers: int | None):
    import logging

    from bert_score import BERTScorer
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"BERTScore model folder {path} holds no config.json (give a local folder saved "
            "with save_pretrained; nothing is downloaded)"
        )
    layers = num_layers or AutoConfig.from_pretrained(path, local_files_only=True).num_hidden_layers
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return BERTScorer(model_type=str(path), num_layers=layers), layers


def bertscore_layer(model_dir: str | Path, num_layers: int | None = None) -> int:
    """The layer whose embeddings BERTScore compares (default: the model's last)."""
    return _bert_scorer(str(model_dir), num_layers)[1]


def bertscore(ref: str, pred: str, model_dir: str | Path, num_layers: int | None = None) -> float:
    """BERTScore F1 of one pair with a local model (no idf weighting, no baseline
    rescaling), embeddings from layer `num_layers` (default: the last)."""
    if not ref.strip() or not pred.strip():
        return 0.0
    scorer, _ = _bert_scorer(str(model_dir), num_layers)
    _, _, f1 = scorer.score([pred], [ref])
    return float(f1[0])
