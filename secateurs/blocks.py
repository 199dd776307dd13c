"""Deprecated alias, kept for one release: depth surgery moved to :mod:`secateurs.depth` and the
PLS-VIP statistics to :mod:`secateurs.pls`."""
from __future__ import annotations

import warnings

from .depth import Block, LayerPlan, find_blocks, remove_blocks, truncate
from .pls import block_features, block_scores, vip, vip_from_pls

__all__ = ["Block", "LayerPlan", "find_blocks", "remove_blocks", "truncate", "vip", "vip_from_pls", "block_features",
           "block_scores"]

warnings.warn("secateurs.blocks is deprecated: import from secateurs.depth (blocks, removal, truncation) and "
              "secateurs.pls (VIP, block features); the alias goes in the next release", DeprecationWarning, stacklevel=2)
