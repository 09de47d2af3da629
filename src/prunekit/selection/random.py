"""Random selection: every sample equally likely, seeded. The baseline every other selector must beat."""
from __future__ import annotations

import random

NEEDS_MODEL = False


def order(scores, lengths, options: dict) -> list[int]:
    """A seeded random permutation of the pool's indices (`options["seed"]`)."""
    indices = list(range(len(lengths)))
    random.Random(options.get("seed", 0)).shuffle(indices)
    return indices
