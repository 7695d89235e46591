"""Serving: an OpenAI-compatible HTTP API with batched generation (`omnivmed-serve`)."""
