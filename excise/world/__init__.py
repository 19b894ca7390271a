"""The embedded default world: fictitious people and facts, a tokenizer, two tiny models
(``large``: a model of GPT-2 small's shape, for a GPU).

>>> from excise.world import PRESETS
>>> sorted(PRESETS)
['default', 'large', 'tiny']
"""

from excise.world.build import SPLITS, build_world, read_split, world_folder, world_is_built
from excise.world.settings import PRESETS, WorldSettings, default, large, tiny

__all__ = [
    "PRESETS",
    "SPLITS",
    "WorldSettings",
    "build_world",
    "default",
    "large",
    "read_split",
    "tiny",
    "world_folder",
    "world_is_built",
]
