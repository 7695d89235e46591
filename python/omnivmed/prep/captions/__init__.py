"""Rejection-sampled captions (OmniV-Med Fig. 4): a generator writes K candidate captions
per clip, one or more judges score each on relevance, fluency and accuracy (1-5), and the
best candidate is kept when its mean score clears a threshold. Generator and judges are
backends: any OpenAI-compatible HTTP endpoint (`http.py`) or a local omnivmed model
folder (`local.py`). `pipeline.py` runs clips concurrently, resumably, with an audit log.
"""
