"""Suite-wide test settings.

Hypothesis runs derandomized by default so that CI on a clean clone is reproducible; set
``HYPOTHESIS_PROFILE=explore`` to let it search with fresh random examples (and a larger budget).
"""
from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
