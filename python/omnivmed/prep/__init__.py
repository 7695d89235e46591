"""Dataset preparation, used by `omnivmed-data` only: public-dataset converters
(`converters/`), video clips (`clips.py`), rejection-sampled captions (`captions/`),
mixing several record files into one (`mix.py`), visual-token statistics
(`token_stats.py`) and record validation (`validate.py`).

These tools write the record files that `omnivmed.data` reads. Nothing that runs at
training, inference, evaluation or serving time imports this package, so it may depend on
`omnivmed.data` and never the other way round.
"""
