"""What a run is and how it stays whole: its settings, id and directory (:mod:`.identity`),
when it counts as finished (:mod:`.completion`), its lock and signal handling
(:mod:`.guard`) and files written whole or not at all (:mod:`.files`); a run's identity is
public here (``kdlight.runs.settings(cfg)``, ``kdlight.runs.identify(cfg)``...)."""

from kdlight.runs.identity import (
    RunIdentity,
    cell_name,
    group_key,
    identify,
    is_debug,
    is_distillation,
    is_grid,
    run_folder,
    settings,
)

__all__ = [
    "RunIdentity",
    "cell_name",
    "group_key",
    "identify",
    "is_debug",
    "is_distillation",
    "is_grid",
    "run_folder",
    "settings",
]
