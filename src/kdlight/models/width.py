"""A width multiplier on channel counts, and its one-line refusal when a layer would have no
channel (``model.width=0.001``): a model that small is not the one asked for."""

import math
from collections.abc import Sequence

from kdlight.errors import KDLightError


class TooNarrow(KDLightError):
    """``width`` leaves a layer without a channel; ``allowed`` says the widths that do not,
    for :func:`kdlight.config.settings.validate_settings` to name the setting."""

    def __init__(self, width: float, allowed: str) -> None:
        self.allowed = allowed
        super().__init__(f"width={width:g} is not allowed: {allowed}")


def scaled_channels(channels: Sequence[int], width: float, model: str) -> list[int]:
    """Each of ``channels`` (a model's counts at width 1) times ``width``, rounded.

    Raises:
        TooNarrow: ``width`` is not a finite number > 0, or it rounds the narrowest layer to
            zero channels. A layer is not silently kept at one channel instead: the model
            would not be the one the width describes.
    """
    narrowest = min(channels)
    limit = 0.5 / narrowest  # round() gives 0 up to 0.5 (round half to even), 1 above
    allowed = (
        f"a number > {limit:g} for {model} (every layer needs >= 1 channel, and its "
        f"narrowest have {narrowest} at width 1)"
    )
    if isinstance(width, bool) or not math.isfinite(width) or not width > limit:
        raise TooNarrow(width, allowed)
    return [round(count * width) for count in channels]
