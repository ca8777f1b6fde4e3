"""Calibrated post-training quantization of one weight: GPTQ, AWQ and SmoothQuant.

Pure functions on ONE weight and the statistics of its inputs (see :mod:`qjax.capture`):
the Hessian ``H = sum x x^T`` and per-input-channel ``mean |x|`` / ``max |x|``. Each
returns a :class:`~qjax.QArray`; stacked (scanned) weights are handled with ``jax.vmap``.
AWQ and SmoothQuant store ``1 / s`` as the QArray's ``channel_scale``.
"""

from qjax.algorithms.awq import AWQResult as AWQResult
from qjax.algorithms.awq import awq as awq
from qjax.algorithms.awq import awq_search as awq_search
from qjax.algorithms.awq import scaled as scaled
from qjax.algorithms.gptq import GPTQRows as GPTQRows
from qjax.algorithms.gptq import gptq as gptq
from qjax.algorithms.gptq import gptq_rows as gptq_rows
from qjax.algorithms.smoothquant import smoothquant as smoothquant
from qjax.algorithms.smoothquant import smoothquant_scale as smoothquant_scale

__all__ = [
    "AWQResult",
    "GPTQRows",
    "awq",
    "awq_search",
    "gptq",
    "gptq_rows",
    "scaled",
    "smoothquant",
    "smoothquant_scale",
]
