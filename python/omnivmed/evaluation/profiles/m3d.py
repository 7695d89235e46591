"""`m3d` (version 1): M3D-Bench's rules. Closed (multiple-choice) questions: correct when
the answer's letter followed by a period ("B.") occurs anywhere in the output (M3D's
substring rule). Open answers and captions: per-sample BLEU-1, ROUGE-1, METEOR (when
WordNet is present) and BERTScore (only from a local model folder, else not computed).
"""

from __future__ import annotations

from typing import Any

from .. import captions
from . import PROFILES, Profile, ScoringError


@PROFILES.register("m3d")
class M3DProfile(Profile):
    version = "1"
    metrics = ("closed_accuracy", "bleu1", "rouge1", "meteor", "bertscore")
    required_fields = ("answer", "answer_type")

    def check_reference(self, ref: dict, where: str) -> None:
        super().check_reference(ref, where)
        if ref["answer_type"] == "closed" and not ref.get("answer_choice"):
            raise ScoringError(
                f"{where}: field 'answer_choice' is missing; profile 'm3d' needs it for closed questions"
            )

    def score(self, ref: dict, prediction: str) -> tuple[dict[str, Any], dict[str, float]]:
        out = str(prediction).strip()
        if ref["answer_type"] == "closed":
            letter = str(ref["answer_choice"]).strip().strip("().").upper()
            return {"rule": "letter + '.' in output", "expected": letter}, {
                "closed_accuracy": float(letter + "." in out)
            }
        # M3D scores the raw text split on whitespace (lower-cased here, as its metrics do).
        ref_tokens, pred_tokens = str(ref["answer"]).lower().split(), out.lower().split()
        scores = {"bleu1": captions.bleu(ref_tokens, pred_tokens, 1, smooth=False)}
        scores["rouge1"] = captions.rouge(ref_tokens, pred_tokens)["rouge1"]
        self.add_meteor(scores, ref_tokens, pred_tokens)
        model = self.options.get("bertscore_model")
        if model:
            layers = self.options.get("bertscore_layers")
            scores["bertscore"] = captions.bertscore(str(ref["answer"]), out, model, layers)
            self.note(f"BERTScore: F1 with {model}, layer {captions.bertscore_layer(model, layers)}, "
                      "no idf, no rescaling")  # fmt: skip
        else:
            self.note(
                "BERTScore not computed: it needs a local model folder (--bertscore-model; never downloaded)"
            )
        return {"rule": "open"}, scores
