"""What happens before work: every setting checked against its declared type and range
(:mod:`.settings`) and the command line read before Hydra composes it (:mod:`.preflight`)."""
