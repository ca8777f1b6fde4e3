"""qjax: quantization for JAX, numerically interchangeable with torchao and coreai-opt."""

from qjax import algorithms as algorithms
from qjax import capture as capture
from qjax import host_memory as host_memory
from qjax import lsq as lsq
from qjax import methods as methods
from qjax import palettize as palettize
from qjax.calibration import MovingAverage as MovingAverage
from qjax.calibration import calibrate as calibrate
from qjax.calibration import moving_average_init as moving_average_init
from qjax.calibration import moving_average_qparams as moving_average_qparams
from qjax.calibration import moving_average_update as moving_average_update
from qjax.calibration import observe_range as observe_range
from qjax.dtypes import TARGET_DTYPES as TARGET_DTYPES
from qjax.dtypes import TargetDType as TargetDType
from qjax.dtypes import target_dtype as target_dtype
from qjax.granularity import Granularity as Granularity
from qjax.granularity import block_shape as block_shape
from qjax.granularity import per_block as per_block
from qjax.granularity import per_channel as per_channel
from qjax.granularity import per_tensor as per_tensor
from qjax.granularity import per_token as per_token
from qjax.io import load as load
from qjax.io import load_tensors as load_tensors
from qjax.io import save as save
from qjax.methods import AWQ as AWQ
from qjax.methods import GPTQ as GPTQ
from qjax.methods import SmoothQuant as SmoothQuant
from qjax.methods import fold_channel_scales as fold_channel_scales
from qjax.ops import dequantize as dequantize
from qjax.ops import fake_quant as fake_quant
from qjax.ops import quantize as quantize
from qjax.ops import straight_through as straight_through
from qjax.palettize import LUTArray as LUTArray
from qjax.palettize import TableFormat as TableFormat
from qjax.qarray import QArray as QArray
from qjax.qparams import QParams as QParams
from qjax.qparams import compute_qparams as compute_qparams
from qjax.qparams import qparams_from_minmax as qparams_from_minmax
from qjax.report import Report as Report
from qjax.report import report as report
from qjax.resolve import Plan as Plan
from qjax.resolve import QjaxRuleWarning as QjaxRuleWarning
from qjax.resolve import Resolution as Resolution
from qjax.resolve import RulePlan as RulePlan
from qjax.rules import Calibration as Calibration
from qjax.rules import LeafRule as LeafRule
from qjax.rules import default_rules as default_rules
from qjax.rules import parse_rules as parse_rules
from qjax.rules import parse_spec as parse_spec
from qjax.spec import PRESETS as PRESETS
from qjax.spec import QuantSpec as QuantSpec
from qjax.tree import DEFAULT_MIN_SIZE as DEFAULT_MIN_SIZE
from qjax.tree import count_nonfinite as count_nonfinite
from qjax.tree import dequantize_tree as dequantize_tree
from qjax.tree import dequantizing as dequantizing
from qjax.tree import leaf_specs as leaf_specs
from qjax.tree import plan as plan
from qjax.tree import quantize_tree as quantize_tree

__version__ = "0.1.0"

__all__ = [
    "AWQ",
    "DEFAULT_MIN_SIZE",
    "GPTQ",
    "PRESETS",
    "TARGET_DTYPES",
    "Calibration",
    "Granularity",
    "LUTArray",
    "LeafRule",
    "MovingAverage",
    "Plan",
    "QArray",
    "QParams",
    "QjaxRuleWarning",
    "QuantSpec",
    "Report",
    "Resolution",
    "RulePlan",
    "SmoothQuant",
    "TableFormat",
    "TargetDType",
    "algorithms",
    "block_shape",
    "calibrate",
    "capture",
    "compute_qparams",
    "count_nonfinite",
    "default_rules",
    "dequantize",
    "dequantize_tree",
    "dequantizing",
    "fake_quant",
    "fold_channel_scales",
    "host_memory",
    "leaf_specs",
    "load",
    "load_tensors",
    "lsq",
    "methods",
    "moving_average_init",
    "moving_average_qparams",
    "moving_average_update",
    "observe_range",
    "palettize",
    "parse_rules",
    "parse_spec",
    "per_block",
    "per_channel",
    "per_tensor",
    "per_token",
    "plan",
    "qparams_from_minmax",
    "quantize",
    "quantize_tree",
    "report",
    "save",
    "straight_through",
    "target_dtype",
]
