"""The README's digits table: float, PTQ and QAT test accuracy and weight bytes per format.

Runs the protocol of :mod:`qjax.demo.digits` (float training, then PTQ and QAT for each
format) with its full step counts and prints a Markdown table. Run it with::

    python benchmarks/digits_table.py [--float-steps 1500] [--qat-steps 300] [--seed 0]

which is the same as ``python -m qjax.demo.digits`` with the same arguments.
"""

from __future__ import annotations

import sys

from qjax.demo import digits

if __name__ == "__main__":
    sys.exit(digits.main())
