"""What every run (a training stage, a benchmark run) keeps in its output folder besides
its results."""

# The run's identity (training: its id, which checkpoints must match) or its settings (a
# benchmark run: resuming with other settings is refused).
RUN_FILE = "run.json"
