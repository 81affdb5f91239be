"""Query normalisation before embedding and before the content-token guards.

Only changes that cannot alter meaning: Unicode compatibility folding, case, whitespace and
trailing punctuation. Numbers, negations and names are kept verbatim because the guards in
``decision`` compare them.
"""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")
# Trailing punctuation ("?", "!!", "...") changes the embedding slightly but never the answer.
_TRAILING_PUNCT = re.compile(r"[\s?!.,;:]+$")
# Curly quotes and apostrophes would otherwise split "don't" differently from its U+2019 form.
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})


def normalise(text: str) -> str:
    """Fold a user turn to the form that is embedded and cached."""
    folded = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    folded = _SPACE.sub(" ", folded).strip()
    folded = _TRAILING_PUNCT.sub("", folded)
    return folded.lower()
