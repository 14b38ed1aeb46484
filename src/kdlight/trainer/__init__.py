"""What the Lightning Trainer runs with: kdlight's callbacks (:mod:`.callbacks`), atomic
checkpoint IO and the reading of checkpoints (:mod:`.checkpointing`), the experiment
trackers (:mod:`.loggers`) and what the machine computes fast (:mod:`.hardware`)."""
