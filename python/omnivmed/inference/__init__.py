"""Answering questions about images, volumes and videos."""

from .answer import Answer, answer_question, answer_questions, load_for_inference

__all__ = ["Answer", "answer_question", "answer_questions", "load_for_inference"]
