"""Numbers for the paper: every number in the text is a LaTeX macro written by the analysis."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .provenance import atomic_write_text

DIGITS = "zero one two three four five six seven eight nine".split()


def macro_name(key: str) -> str:
    """'vendi_L4' -> 'VendiLFour': LaTeX macro names may hold letters only."""
    words = re.split(r"[^A-Za-z0-9]+", key)
    out = []
    for w in words:
        w = re.sub(r"\d", lambda m: DIGITS[int(m.group())].capitalize(), w)
        out.append(w[:1].upper() + w[1:])
    return "".join(out)


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", "{,}")
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** -digits:  # tiny effects keep their size: -4.12 x 10^-4
            mantissa, exp = f"{value:.2e}".split("e")   # rounded once, so 9.999e-7 reads 1.00 x 10^-6
            return f"\\ensuremath{{{mantissa}\\times 10^{{{int(exp)}}}}}"
        return f"{value:.{digits}f}"
    return str(value).replace("_", r"\_")


def write_numbers(numbers: dict, path: str | Path, source: str = "notebooks/05_analyze.ipynb") -> Path:
    lines = [f"% Written by {source} (persona_em.paper); do not edit by hand."]
    for key in sorted(numbers):
        lines.append(f"\\newcommand{{\\{macro_name(key)}}}{{{fmt(numbers[key])}}}")
    return atomic_write_text(path, "\n".join(lines) + "\n")
