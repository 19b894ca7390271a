"""attribution: which training data and which parameters are responsible for a behaviour.

Per-example gradients, curvature (identity, diagonal, K-FAC, EK-FAC), factors on disk and
influence scores. This release holds the data encoding shared by every layer
(:mod:`attribution.data`); the rest arrives with the attribution issues.
"""

from attribution.data import IGNORE_INDEX, collate, encode_record, pad_token_id

__all__ = ["IGNORE_INDEX", "collate", "encode_record", "pad_token_id"]
