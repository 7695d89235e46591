"""Answering questions about images, volumes and videos."""

from .answer import Answer, answer_question

__all__ = ["Answer", "answer_question"]
