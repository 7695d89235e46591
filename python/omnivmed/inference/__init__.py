"""Answering questions about images, volumes and videos: loading a saved model with its
processor, and the one generation path that omnivmed-infer, -eval and -serve share."""

from .answer import Answer, answer_question, answer_questions
from .generate import Generated, Prompt, Sampling, build_prompt, generate, prepare_batch
from .loading import load_for_inference

__all__ = ["Answer", "Generated", "Prompt", "Sampling", "answer_question", "answer_questions",
           "build_prompt", "generate", "load_for_inference", "prepare_batch"]  # fmt: skip
