"""The ``qjax`` command: quantize a float checkpoint, plan it, inspect a qjax file,
dequantize it, and ``qjax demo``, the accuracy/size sweep on the bundled digits.

A thin shell over the library: argument parsing, printing and exit codes live here; the
files, rules and formats live in :mod:`qjax.files` (readers, the one atomic writer, the
checkpoint operations), :mod:`qjax.io` (the qjax format) and :class:`qjax.RulePlan`.

``qjax quantize`` streams: it reads one tensor of the input at a time, quantizes it and keeps
only the quantized result (and a report row), so its memory stays near the size of the
output plus a couple of the largest tensor, whatever the size of the input.

Examples:
  >>> from qjax.cli import main
  >>> main(["--version"])
  qjax 0.1.0
  0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors import SafetensorError

import qjax
from qjax import checkpoints, files
from qjax.files import write_safetensors as write_safetensors  # benchmarks import it from here
from qjax.methods import as_method
from qjax.palettize import NF4_BLOCK_SIZE
from qjax.report import Report, format_bytes
from qjax.resolve import LAYOUTS
from qjax.rules import TABLES, parse_leaf_rule
from qjax.spec import FORMULATIONS, PRESETS, SCHEMES

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "main"]

EXIT_ERROR = 2
"""Exit status for usage and input errors (bad flags, missing or damaged files, specs
that do not fit, full disks, permissions): one ``qjax: error: ...`` line on stderr."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT): one ``qjax: interrupted`` line."""

EXIT_INTERNAL = 1
"""Exit status for an unexpected internal error (a bug): one line and a hint to report it."""

PROGRESS_INTERVAL_S = 5.0
"""When stderr is not a terminal (CI logs), a progress line at most this often."""

_DESCRIPTION = "Quantize JAX / Flax / PyTorch checkpoints, inspect qjax files, dequantize them."

_EPILOG = """exit status:
  0    success
  2    usage or input error: bad flags, a missing, unreadable or damaged file, a rule
       or spec that does not fit, an output that cannot be written (full disk, no
       permission, a directory or device at the path); one 'qjax: error:' line on
       stderr naming the path or tensor
  130  interrupted (Ctrl-C); an output file being written is left as it was
  1    unexpected internal error (a bug): one line; please report it
"""

_RULES_EPILOG = """which tensors get which spec (all go through qjax.RulePlan, as quantize_tree):
  Rules are regexes matched (re.fullmatch) against each tensor's name as it is
  ("encoder.layer.0.output.dense.weight", "Dense_0.kernel") and with "." read as "/".
  1. --drop REGEX: the tensor is left out of the output. --keep REGEX: it is written
     as it is (float). Both repeatable; --drop wins over --keep, both over rules.
  2. --rule REGEX=SPEC, in the order given: the first match wins. SPEC is shorthand
     such as int8:per_channel (a bare int8 is one scale per tensor), int4:per_block:32,
     uint8:asymmetric:per_channel:axis=0, mxfp4,
     int4:per_block:32:mse (a calibration: minmax, absmax, mse, percentile=P),
     int4:per_block:32:stack=1 (the first axis stacks layers or fused MoE experts
     [experts, in, out]: scales per copy, each read in its own layout), a
     lookup table: nf4 (QLoRA NF4, absmax per block of 64 inputs; nf4:per_block:128),
     lut4 (a k-means table per tensor; lut1, lut2, lut3, lut6, lut8; per_tensor or
     per_grouped_channel:16 output channels, scaled for per-channel scales), or
     "keep" to leave the tensor float. A rule that names its tensors ('.*q_proj.*weight')
     quantizes them whatever their size and rank; one that matches any name ('.*') is a
     catch-all, as in 3; one that names a group but not its tensors ('encoder.*')
     leaves 1-D tensors, biases and norm scales (*bias, scale) float.
  3. Otherwise the catch-all rule from --dtype, --granularity, --block-size, --axis,
     --scheme, --formulation and --calibration (int8 per output channel by default;
     --dtype keep turns it off) applies to floating tensors with at least 2 dimensions
     and --min-size elements that are not biases or norm scales (*bias, scale: stacked
     layers store them 2-D); the others (integer tensors such as position_ids too) are
     written as they are.
  A --rule, --keep or --drop that matches no tensor is an error naming it.

calibrated methods (--method gptq, awq or smoothquant; default rtn, round to nearest):
  they run the model to see each layer's inputs. --model FILE.py:FUNCTION (or
  package.module:FUNCTION) names a Python function FUNCTION(tensors, batch) that runs
  the model on the checkpoint's float tensors (a dict by tensor name) and one batch;
  --calibration-data DATA is a .npy file whose first axis indexes the batches, or a
  .npz file with one batch per array (in name order). Every tensor a rule quantizes
  must be read by a matrix product in the model (keep embeddings with --keep). All
  float tensors are then held in memory at once.

axes: without --axis (or axis= in a rule), each tensor's layout decides them
  (--layout auto reads it from the name; flax or torch force one):
  Flax kernel [..., in, out]: per_channel scales the last axis, per_block blocks
    the input axis (-2); Flax embedding [vocab, features]: per row, blocks along
    features.
  PyTorch *.weight [out, in, ...] (Linear, Conv): per_channel on axis 0, blocks
    along axis 1; embeddings (word_embeddings, embed_tokens, wte, lm_head, ...) per
    row, blocks along the features.
  A block size that does not divide a tensor's blocked axis (a conv with 3 or 16
  inputs and blocks of 32): --fallback per_channel (default) quantizes that tensor
  per channel and says so under the table; --fallback none or --strict stop with an
  error naming the tensor.

examples:
  qjax quantize model.safetensors model-int8.safetensors
  qjax quantize model.safetensors model-int4.safetensors --dtype int4 --block-size 32
  qjax quantize model.safetensors model-nf4.safetensors --dtype nf4
  qjax quantize model.safetensors q.safetensors --rule '.*mlp.*=lut4:per_grouped_channel:16'
  qjax quantize model.npz q.safetensors --rule '.*attention.*=int8:per_channel' --keep '.*head.*'
  qjax plan model.safetensors --dtype int4 --block-size 32
  qjax quantize model.safetensors q.safetensors --dtype int4 --block-size 128 \
      --method gptq --model mymodel.py:forward --calibration-data batches.npy
"""


class CLIError(Exception):
    """A problem with the user's input: printed as one ``qjax: error:`` line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``qjax: error: ...`` line."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``qjax`` command line and returns its exit status.

    Args:
      argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
      0 on success, 2 for usage and input errors (one ``qjax: error: ...`` line on
      stderr naming the path or tensor), 130 when interrupted (Ctrl-C), 1 for an
      unexpected internal error (one line, with a hint to report it). Warnings are
      printed as one ``qjax: warning: ...`` line each.
    """
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as e:  # --help, --version and usage errors
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            return args.run(args)
    except KeyboardInterrupt:
        _print_error("interrupted", prefix="qjax: ")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `qjax inspect f | head`: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except MemoryError:
        _print_error("out of memory; free memory or quantize a smaller checkpoint")
        return EXIT_INTERNAL
    except (CLIError, ValueError, TypeError, OSError, SafetensorError) as e:
        _print_error(_describe(e))
        return EXIT_ERROR
    except Exception as e:  # a bug: one line, not a traceback
        _print_error(
            f"internal error: {type(e).__name__}: {e}; this is a bug in qjax "
            f"{qjax.__version__}: please report it with the command you ran",
        )
        return EXIT_INTERNAL


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qjax`` and its subcommands."""
    parser = _Parser(
        prog="qjax",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qjax {qjax.__version__}")
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    q = commands.add_parser(
        "quantize",
        help="quantize a float .safetensors / .npz checkpoint into a qjax file",
        description="Quantize a float checkpoint tensor by tensor and print a report of\n"
        "sizes and errors. Reads .safetensors or .npz (Flax or PyTorch layout), writes a\n"
        "qjax .safetensors file, holding one tensor of the input in memory at a time.\n"
        "Every tensor not dropped is written, under its own name.",
        epilog=_RULES_EPILOG + "\n" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("input", metavar="IN", help="float checkpoint: .safetensors or .npz")
    q.add_argument("output", metavar="OUT", help="qjax file to write (.safetensors)")
    q.add_argument(
        "--method",
        choices=("rtn", "gptq", "awq", "smoothquant"),
        default="rtn",
        help="rtn (default: round to nearest) or a calibrated method (see below)",
    )
    q.add_argument(
        "--model",
        metavar="FILE.py:FUNCTION",
        help="for --method gptq/awq/smoothquant: FUNCTION(tensors, batch) runs the model",
    )
    q.add_argument(
        "--calibration-data",
        metavar="DATA",
        help="for --method gptq/awq/smoothquant: .npy (first axis: batches) or .npz",
    )
    _add_rule_flags(q)
    _add_output_flags(q, "no progress and no table on stdout")
    q.set_defaults(run=run_quantize)

    p = commands.add_parser(
        "plan",
        help="show which spec each tensor of a float checkpoint would get (reads no data)",
        description="Print what 'qjax quantize' would do to each tensor of a float\n"
        "checkpoint, with the same flags: its layout, spec (with its axes), the rule that\n"
        "matched and why a tensor stays float or falls back. Only the header is read.",
        epilog=_RULES_EPILOG + "\n" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="float checkpoint: .safetensors or .npz")
    _add_rule_flags(p)
    p.set_defaults(run=run_plan)

    i = commands.add_parser(
        "inspect",
        help="print the tensors, specs and sizes of a qjax file",
        description="Print the tensors of a qjax file under their original names: spec\n"
        "(with the axis each was scaled or blocked on) and stored size; float tensors\n"
        "kept as they were are listed too.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("file", metavar="FILE", help="a qjax .safetensors file")
    _add_output_flags(i, "no table on stdout")
    i.set_defaults(run=run_inspect)

    d = commands.add_parser(
        "dequantize",
        help="write the float tensors of a qjax file to .safetensors / .npz",
        description="Dequantize a qjax file into float tensors under their original names\n"
        "(as given to 'qjax quantize'). OUT's suffix picks the format: .safetensors or\n"
        ".npz (which cannot hold bfloat16: those are written as float32). Kept tensors\n"
        "(integers, float64, ...) are written bit for bit.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("input", metavar="IN", help="a qjax .safetensors file")
    d.add_argument("output", metavar="OUT", help="float checkpoint to write: .safetensors or .npz")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress")
    d.set_defaults(run=run_dequantize)
    _add_demo_parser(commands)
    return parser


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="int8",
        choices=[*qjax.TARGET_DTYPES, *PRESETS, *TABLES, "keep"],
        metavar="DTYPE",
        help="target of the catch-all rule: int8 (default), uint8, int4, uint4, int3, "
        "uint3, int2, uint2, float8_e4m3fn, float8_e5m2, float4_e2m1fn, mxfp8, mxfp4, nvfp4, "
        "lookup tables nf4 (with --block-size, default 64), lut1, lut2, lut3, lut4, lut6, "
        "lut8 (a k-means table per tensor), or keep (none)",
    )
    parser.add_argument(
        "--granularity",
        choices=("per_tensor", "per_channel", "per_block"),
        help="default: per_block if --block-size is given, else per_channel",
    )
    parser.add_argument(
        "--block-size",
        type=_positive,
        metavar="N",
        help=f"per_block block length (default 32; {NF4_BLOCK_SIZE} for nf4)",
    )
    parser.add_argument(
        "--axis",
        type=int,
        metavar="N",
        help="channel axis (per_channel) or blocked axis (per_block) for every tensor; "
        "default: from each tensor's layout (see below)",
    )
    parser.add_argument("--scheme", choices=SCHEMES, help="default: symmetric")
    parser.add_argument(
        "--formulation",
        choices=FORMULATIONS,
        help="default: scale where the zero point is 0, else zero_point",
    )
    parser.add_argument(
        "--calibration",
        metavar="METHOD",
        help="how the catch-all rule computes its params: minmax (default), absmax, mse "
        "or percentile=P",
    )
    parser.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="REGEX=SPEC",
        help="spec for tensors whose name matches REGEX; repeatable, first match wins",
    )
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="REGEX",
        help="write matching tensors as they are (float); repeatable",
    )
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave matching tensors out of the output; repeatable",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="how tensors are read: auto (default: from each name), flax or torch",
    )
    parser.add_argument(
        "--fallback",
        choices=("per_channel", "none"),
        default="per_channel",
        help="a block size that does not divide a tensor: quantize it per channel "
        "(default, shown under the table) or stop with an error (none)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="no fallback: a spec that does not fit a tensor as written is an error",
    )
    parser.add_argument(
        "--min-size",
        type=_non_negative,
        default=qjax.DEFAULT_MIN_SIZE,
        metavar="N",
        help="the catch-all rule leaves tensors with fewer elements float "
        f"(default {qjax.DEFAULT_MIN_SIZE})",
    )


def _add_output_flags(parser: argparse.ArgumentParser, quiet_help: str) -> None:
    parser.add_argument(
        "--report", metavar="PATH", help="also write the report rows to PATH: .csv or .json"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)


# qjax demo


_DEMO_EPILOG = """\
dtypes: int8, uint8, int4, uint4, int2, uint2, float8_e4m3fn, float8_e5m2, float4_e2m1fn,
  mxfp8, mxfp4, or all (default: all but uint2 and mxfp8).
writes into --out: results.csv, results.json, accuracy_vs_bytes.png,
  sqnr_vs_block_size.png and float_params.npz (the float CNN, for qjax quantize).
"""


def _add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="train a small CNN on the bundled digits and sweep PTQ/QAT configs (no download)",
        description="Train a small CNN on scikit-learn's bundled 8x8 digits, quantize its\n"
        "weights for every dtype x granularity x formulation (PTQ), fine-tune the configs\n"
        "PTQ hurts most (QAT), print a table and write CSV, JSON and plots.",
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--quick", action="store_true", help="fewer configs, short training (well under a minute)"
    )
    demo.add_argument(
        "--dtypes", metavar="LIST", help="comma-separated target dtypes to sweep (see below)"
    )
    demo.add_argument(
        "--out", default="qjax-demo-out", metavar="DIR", help="output folder (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="data split, init and batches")
    demo.add_argument(
        "--steps", type=_positive, metavar="N", help="float training steps (1500; 300 quick)"
    )
    demo.add_argument(
        "--qat-steps", type=_non_negative, metavar="N", help="QAT steps per config (300; 60 quick)"
    )
    demo.add_argument(
        "--qat-top", type=_non_negative, metavar="K", help="configs that get QAT (3; 1 quick)"
    )
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """``qjax demo``: trains the digits CNN, sweeps PTQ and QAT, prints and writes results."""
    try:
        from qjax.demo import sweep  # Flax, Optax, scikit-learn and matplotlib load only here
    except ImportError as e:  # the demo extra is missing: the message says what to install
        raise CLIError(str(e)) from None

    settings = sweep.make_settings(
        quick=args.quick,
        dtypes=args.dtypes,
        steps=args.steps,
        qat_steps=args.qat_steps,
        qat_top=args.qat_top,
    )
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out}: exists and is not a directory")
    os.makedirs(args.out, exist_ok=True)  # fail before training, not after
    result = sweep.run(settings, seed=args.seed)
    paths = sweep.write_outputs(result, args.out)
    console = Console() if sys.stdout.isatty() else Console(width=140)
    console.print(sweep.table(result))
    s = result.meta["seconds"]
    print(
        f"float training {s['train']:.0f} s, PTQ sweep {s['ptq_sweep']:.0f} s, "
        f"QAT {s['qat']:.0f} s; total {s['total']:.0f} s"
    )
    print(f"wrote {', '.join(paths)} to {os.path.abspath(args.out)}")
    return 0


# qjax quantize / plan


def run_quantize(args: argparse.Namespace) -> int:
    """``qjax quantize IN OUT``: plans every tensor, then quantizes them one at a time."""
    _check_report_path(args.report)
    plan = _plan(args)
    if args.method != "rtn":  # before the model and batches are asked for
        checkpoints.refuse_tables(plan, as_method(args.method))
    total = sum(t.nbytes for t in plan.tensors if t.name not in plan.dropped)
    start = time.perf_counter()
    model, batches = _calibration(args)
    with _progress(args.quiet, "quantize", total) as advance:
        rows = checkpoints.quantize_checkpoint(
            plan, args.output, progress=advance, method=args.method, model=model, batches=batches
        )
    elapsed = time.perf_counter() - start
    rep = Report.from_rows(rows)
    title = (
        f"{args.input} -> {args.output}: {format_bytes(rep.totals['bytes_before'])} -> "
        f"{format_bytes(os.path.getsize(args.output))} on disk in {elapsed:.1f} s"
    )
    _emit(rep, title, args)
    if not args.quiet:
        for row in plan.fallbacks:
            print(f"{row.path}: {row.note}")
        if plan.dropped:
            print(f"dropped ({len(plan.dropped)}): {_names(sorted(plan.dropped))}")
    return 0


def _calibration(args: argparse.Namespace) -> tuple[Callable | None, list | None]:
    """The model function and calibration batches of a calibrated --method, checked."""
    given = [
        flag
        for flag, v in (("--model", args.model), ("--calibration-data", args.calibration_data))
        if v is not None
    ]
    if args.method == "rtn":
        if given:
            raise CLIError(
                f"{' and '.join(given)} need a calibrated --method (gptq, awq, smoothquant)"
            )
        return None, None
    missing = [f for f in ("--model", "--calibration-data") if f not in given]
    if missing:
        raise CLIError(f"--method {args.method} needs {' and '.join(missing)}")
    return files.load_function(args.model, "--model"), files.read_batches(
        args.calibration_data, "--calibration-data"
    )


def run_plan(args: argparse.Namespace) -> int:
    """``qjax plan IN``: what ``qjax quantize`` would do to each tensor, from the header."""
    print(_plan(args).table)
    return 0


def catch_all_rule(args: argparse.Namespace) -> str | None:
    """The catch-all rule's shorthand from the flags (None for ``--dtype keep``).

    Without ``--axis`` it is a template: each tensor's layout decides its axes. A lookup
    table (``--dtype nf4``, ``lut4``, ...) takes its own defaults: NF4 blocks of 64
    (``--block-size`` sets them), a k-means table per tensor.

    Examples:
      >>> from qjax.cli import build_parser, catch_all_rule
      >>> argv = ["plan", "m.npz", "--dtype", "int4", "--block-size", "32"]
      >>> catch_all_rule(build_parser().parse_args(argv))
      'int4:per_block:32'
      >>> catch_all_rule(build_parser().parse_args(["plan", "m.npz", "--dtype", "nf4"]))
      'nf4'
      >>> catch_all_rule(build_parser().parse_args(["plan", "m.npz", "--dtype", "lut4"]))
      'lut4'
    """
    flags = (args.granularity, args.block_size, args.axis)
    if args.dtype == "keep":
        if any(f is not None for f in (*flags, args.scheme, args.formulation, args.calibration)):
            raise CLIError("--dtype keep turns the catch-all rule off; drop its other flags")
        return None
    table = args.dtype in TABLES
    default = None if table else "per_channel"  # a table has its own default
    g = args.granularity or ("per_block" if args.block_size is not None else default)
    if args.dtype in PRESETS and any(flag is not None for flag in flags):
        raise CLIError(
            f"--dtype {args.dtype} sets its own blocks ({PRESETS[args.dtype].block_size} along "
            "the contraction axis); drop --granularity / --block-size / --axis"
        )
    if args.block_size is not None and g != "per_block":
        raise CLIError(f"--block-size needs --granularity per_block, not {g}")
    if args.axis is not None and g == "per_tensor":
        raise CLIError("--axis needs --granularity per_channel or per_block, not per_tensor")
    tokens = [args.dtype]
    tokens += [args.scheme] if args.scheme else []
    tokens += [args.formulation] if args.formulation else []
    if args.dtype not in PRESETS:
        block = args.block_size or (NF4_BLOCK_SIZE if table else 32)
        tokens += [] if g is None else [g] + ([str(block)] if g == "per_block" else [])
        tokens += [] if args.axis is None else [f"axis={args.axis}"]
    tokens += [args.calibration] if args.calibration else []
    text = ":".join(tokens)
    try:
        parse_leaf_rule(text)
    except ValueError as e:
        raise CLIError(f"--dtype {args.dtype} with the given flags: {e}") from None
    return text


def _plan(args: argparse.Namespace) -> checkpoints.CheckpointPlan:
    rules: list[Any] = list(args.rule)
    catch_all = catch_all_rule(args)
    try:
        parsed = qjax.parse_rules(rules)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--rule: {e}") from None
    if catch_all is not None:
        parsed.append((".*", catch_all))
    fallback = None if args.strict or args.fallback == "none" else "per_channel"
    return checkpoints.plan_checkpoint(
        args.input,
        parsed,
        layout=args.layout,
        min_size=args.min_size,
        fallback=fallback,
        keep=args.keep,
        drop=args.drop,
    )


# qjax inspect / dequantize


def run_inspect(args: argparse.Namespace) -> int:
    """``qjax inspect FILE``: the table of a qjax file (sizes as float and as stored)."""
    rep = Report.from_rows(checkpoints.inspect_checkpoint(args.file))
    title = f"{args.file}: {format_bytes(os.path.getsize(args.file))} on disk"
    _emit(rep, title, args)
    kept = [r["path"] for r in rep.rows if not r["quantized"]]
    if kept and not args.quiet:
        print(f"kept as they were ({len(kept)}): {_names(kept)}")
    return 0


def run_dequantize(args: argparse.Namespace) -> int:
    """``qjax dequantize IN OUT``: float tensors under their original names."""
    with _progress(args.quiet, "dequantize", 0) as advance:
        checkpoints.dequantize_checkpoint(args.input, args.output, progress=advance)
    return 0


# Shared helpers.


def _check_report_path(path: str | None) -> None:
    """Checks --report before any work: its suffix, and that it may be written."""
    if path is None:
        return
    if os.path.splitext(path)[1].lower() not in (".csv", ".json"):
        raise CLIError(f"--report {path}: name it with .csv or .json")
    files.check_target(path)


def _emit(rep: Report, title: str, args: argparse.Namespace) -> None:
    """Prints the table (unless --quiet) and writes --report (atomically)."""
    if args.report:
        _check_report_path(args.report)
        (rep.to_json if args.report.lower().endswith(".json") else rep.to_csv)(args.report)
    if not args.quiet:
        console = Console() if sys.stdout.isatty() else Console(width=200)
        console.print(rep.to_table(title=title))


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


@contextlib.contextmanager
def _progress(quiet: bool, stage: str, total: int) -> Iterator[Callable[[str, int], None]]:
    """Progress on stderr: a bar on a terminal, else a line at most every few seconds.

    Yields ``advance(name, nbytes)``: shows ``name`` as the current tensor and adds ``nbytes``
    to the bytes done. Where stderr is not a terminal (CI logs), a line
    ``qjax quantize: 12 tensors, 1.2 GiB done, 10 s: <name>`` is printed when at least
    :data:`PROGRESS_INTERVAL_S` passed since the last one, so long runs are never silent
    and short ones print nothing.
    """
    console = Console(stderr=True)
    if quiet:
        yield lambda name, nbytes: None
        return
    if not console.is_terminal:
        start = last = time.monotonic()
        done = {"tensors": 0, "bytes": 0}

        def line(name: str, nbytes: int) -> None:
            nonlocal last
            if nbytes:
                done["tensors"] += 1
                done["bytes"] += nbytes
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S:
                last = now
                of = f" of {format_bytes(total)}" if total else ""
                print(
                    f"qjax {stage}: {done['tensors']} tensors, {format_bytes(done['bytes'])}"
                    f"{of} done, {now - start:.0f} s: {name}",
                    file=sys.stderr,
                    flush=True,
                )

        yield line
        if time.monotonic() - start >= PROGRESS_INTERVAL_S:
            print(f"qjax {stage}: writing done, {time.monotonic() - start:.0f} s", file=sys.stderr)
        return
    columns = (
        TextColumn("{task.description}", style="cyan"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("tensors", total=total or None)

        def advance(name: str, nbytes: int) -> None:
            progress.update(task, advance=nbytes, description=name[-40:])

        yield advance


def _positive(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _print_error(message: str, prefix: str = "qjax: error: ") -> None:
    print(prefix + " ".join(message.split()), file=sys.stderr, flush=True)


def _show_warning(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
    _print_error(f"{category.__name__}: {message}", prefix="qjax: warning: ")


if __name__ == "__main__":  # python -m qjax.cli
    sys.exit(main())
