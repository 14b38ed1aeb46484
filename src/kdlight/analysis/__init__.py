"""From finished runs to tables: the runs' records (:mod:`.records`), seed statistics and
comparisons (:mod:`.stats`) and the figures (:mod:`.plots`); ``kdlight-report``
(:mod:`kdlight.cli.report`) puts them together."""
