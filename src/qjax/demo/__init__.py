"""End-to-end examples of qjax on real data: quantization-aware training of small models.

They need the ``demo`` extra (``pip install "qjax[demo]"``: Optax to train, scikit-learn
for the bundled digits, matplotlib for the plots), which the library itself does not.
Importing this package without it raises a one-line ImportError that says so, before any
work starts (so a missing plotting library is not found after minutes of training).

Examples:
  >>> from qjax.demo import missing_extra
  >>> missing_extra()  # the test environment has the extra
  []
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA", "missing_extra"]

EXTRA: tuple[tuple[str, str], ...] = (
    ("optax", "optax"),
    ("sklearn", "scikit-learn"),
    ("matplotlib", "matplotlib"),
)
"""``(module, distribution)`` of each package of the ``demo`` extra."""


def missing_extra() -> list[str]:
    """The distributions of the ``demo`` extra that are not installed (nothing imported)."""
    return [dist for module, dist in EXTRA if importlib.util.find_spec(module) is None]


if missing_extra():
    raise ImportError(
        f"qjax demo needs {', '.join(missing_extra())} (the demo extra, which the library "
        'does not need): pip install "qjax[demo]"'
    )
