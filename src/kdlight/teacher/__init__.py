"""The teacher's side of distillation: the exact cache of its outputs (:mod:`.cache`)."""
