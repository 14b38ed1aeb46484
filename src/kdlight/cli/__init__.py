"""The console commands: ``kdlight-report`` (:mod:`.report`), ``kdlight-study``
(:mod:`.study`), ``kdlight-cache-teacher`` (:mod:`.cache_teacher`), ``python -m
kdlight.cli.slurm`` (:mod:`.slurm`) and ``make bench`` (:mod:`.bench`); ``kdlight-train`` is
:mod:`kdlight.train`. :mod:`.startup` answers signals while a command's imports load, so
this package's import stays light (nothing is imported here)."""
