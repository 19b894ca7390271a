"""The embedded default world: fictitious people and facts, a tokenizer, two tiny models.

>>> from excise.world import PRESETS
>>> sorted(PRESETS)
['default', 'tiny']
"""

from excise.world.build import SPLITS, build_world, read_split, world_folder
from excise.world.settings import PRESETS, WorldSettings, default, tiny

__all__ = [
    "PRESETS",
    "SPLITS",
    "WorldSettings",
    "build_world",
    "default",
    "read_split",
    "tiny",
    "world_folder",
]
