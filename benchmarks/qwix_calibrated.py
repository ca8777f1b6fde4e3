"""Google's Qwix (0.1.8) GPTQ, AWQ and SmoothQuant on the byte-level LM of ``lm_example``.

The reference rows of ``bench_calibrated``: the same model, trained parameters,
calibration batches, held-out windows and weight formats as qjax's rows, through Qwix's
own API for a Linen model:

1. calibration: ``qwix.quantize_model(model, <Method>CalibrationProvider([<Method>Rule(
   module_path=..., weight_qtype=..., tile_size=...)]))``, then ``apply`` over the
   batches with ``mutable="quant_stats"`` (the statistics accumulate in that collection);
2. quantization: ``qwix.contrib.<method>.quantize_params(params, abstract, quant_stats)``,
   where ``abstract = jax.eval_shape(ptq_model.init, ...)["params"]`` comes from the same
   model under a ``qwix.PtqProvider`` (it says how each weight is to be quantized);
3. evaluation: ``ptq_model.apply`` (GPTQ, round to nearest) or the same model under
   ``AwqInferenceProvider`` / ``SqInferenceProvider`` (AWQ, SmoothQuant).

The rules name the Dense modules (``block_i/(query|key|value|out|up|down)``); the
embeddings and the head stay float. Each (method, format) runs in its own subprocess so
that its peak resident memory (``ru_maxrss``) is its own; the time and the peak cover
calibration and quantization (compilation included), not the evaluation. Qwix is an
optional dependency: ``pip install qwix==0.1.8``. Script::

    python benchmarks/qwix_calibrated.py [--tiny]   # every method and format, a table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_example as lm

MODULES = r"block_\d+/(query|key|value|out|up|down)"

# format name -> (Qwix qtype, tile size along the contraction axis; None: per channel)
FORMATS: dict[str, tuple[Any, int | None]] = {
    "int4/128": (jnp.int4, 128),
    "int4/32": (jnp.int4, 32),
    "int2/32": (jnp.int2, 32),
    "mxfp4": ("mxfp4", 32),
    "int8/ch": (jnp.int8, None),  # W8A8 rows: weights int8 per output channel
}
WEIGHT_METHODS = ("rtn", "gptq", "awq")
W8A8_METHODS = ("w8a8", "smoothquant")
N_CALIB = 16  # calibration batches of lm_example.calibration_batches (8 x context bytes)


@dataclasses.dataclass
class Result:
    method: str
    fmt: str
    ppl: float | None
    seconds: float | None  # calibration + quantization, compilation included
    peak_mib: float | None  # ru_maxrss of the process at the end of quantization
    base_mib: float | None  # ru_maxrss once the model and data were loaded
    error: str | None = None


def _rules(cls: type, fmt: str, **extra: Any) -> list[Any]:
    qtype, tile = FORMATS[fmt]
    return [cls(module_path=MODULES, weight_qtype=qtype, tile_size=tile, **extra)]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _calibrate(model: Any, params: Any, batches: Sequence[Any]) -> Any:
    """``quant_stats`` accumulated over the batches by a calibration-provider model."""

    def step(stats, batch):
        variables = {"params": params, **({"quant_stats": stats} if stats else {})}
        _, updated = model.apply(variables, batch, mutable="quant_stats")
        return updated["quant_stats"]

    first, rest = jax.jit(lambda b: step(None, b)), jax.jit(step)
    stats = first(batches[0])
    for batch in batches[1:]:
        stats = rest(stats, batch)
    return stats


def quantized_model(method: str, fmt: str, config: lm.LMConfig, params: Any, batches) -> tuple:
    """``(apply_fn, qparams)`` of Qwix's ``method`` on ``params`` (the ``"params"`` dict)."""
    import qwix
    from qwix.contrib import awq, gptq, smooth_quant

    model = lm.make_model(config)
    tokens = jnp.zeros((1, config.context), jnp.int32)
    act = {"act_qtype": jnp.int8} if method in W8A8_METHODS else {}
    ptq_model = qwix.quantize_model(
        model, qwix.PtqProvider(_rules(qwix.QuantizationRule, fmt, **act))
    )
    abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), tokens)["params"]
    if method in ("rtn", "w8a8"):
        return ptq_model.apply, qwix.quantize_params(params, abstract)
    if method == "gptq":
        calib = qwix.quantize_model(model, gptq.GptqCalibrationProvider(_rules(gptq.GptqRule, fmt)))
        stats = _calibrate(calib, params, batches)
        return ptq_model.apply, gptq.quantize_params(params, abstract, stats, gptq_block_size=128)
    if method == "awq":
        calib = qwix.quantize_model(model, awq.AwqCalibrationProvider(_rules(awq.AwqRule, fmt)))
        stats = _calibrate(calib, params, batches)
        serve = qwix.quantize_model(
            model, awq.AwqInferenceProvider(_rules(qwix.QuantizationRule, fmt))
        )
        return serve.apply, awq.quantize_params(params, abstract, stats, n_grid=20)
    if method == "smoothquant":
        rules = _rules(smooth_quant.SqRule, fmt, act_qtype=jnp.int8, alpha=0.5)
        calib = qwix.quantize_model(model, smooth_quant.SqCalibrationProvider(rules))
        stats = _calibrate(calib, params, batches)
        serve = qwix.quantize_model(
            model, smooth_quant.SqInferenceProvider(_rules(qwix.QuantizationRule, fmt, **act))
        )
        return serve.apply, smooth_quant.quantize_params(params, abstract, stats)
    raise ValueError(f"unknown method {method!r}: one of {WEIGHT_METHODS + W8A8_METHODS}")


def run_here(method: str, fmt: str, config: lm.LMConfig, cache: Path | str) -> Result:
    """One (method, format) in this process; errors become the result's ``error``."""
    params = lm.load_or_train(config, cache)["params"]
    batches = [jnp.asarray(b) for b in lm.calibration_batches(N_CALIB, config.context)]
    windows = lm.eval_windows(config.context)
    base = _maxrss_mib()
    start = time.perf_counter()
    try:
        apply_fn, qparams = quantized_model(method, fmt, config, params, batches)
        jax.block_until_ready(qparams)
    except Exception as e:
        return Result(method, fmt, None, None, None, base, f"{type(e).__name__}: {e}"[:300])
    seconds, peak = time.perf_counter() - start, _maxrss_mib()
    ppl = lm.perplexity(lambda p, x: apply_fn({"params": p}, x), qparams, windows)
    return Result(method, fmt, ppl, seconds, peak, base)


def run_in_subprocess(
    script: str, method: str, fmt: str, *, tiny: bool, cache: Path | str
) -> Result:
    """``script --one METHOD FORMAT`` in a fresh process (so its peak memory is its own)."""
    argv = [sys.executable, script, "--one", method, fmt, "--cache", str(cache)]
    proc = subprocess.run([*argv, *(["--tiny"] if tiny else [])], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return Result(method, fmt, None, None, None, None, f"exit {proc.returncode}: {tail[0]}")
    return Result(**json.loads(lines[-1]))


def run(
    method: str, fmt: str, *, tiny: bool = False, cache: Path | str = lm.DEFAULT_CACHE
) -> Result:
    """One Qwix (method, format) in a fresh subprocess."""
    return run_in_subprocess(__file__, method, fmt, tiny=tiny, cache=cache)


def all_runs(
    *, tiny: bool = False, cache: Path | str = lm.DEFAULT_CACHE, log=print
) -> list[Result]:
    jobs = [(m, f) for f in FORMATS if f != "int8/ch" for m in WEIGHT_METHODS]
    jobs += [(m, "int8/ch") for m in W8A8_METHODS]
    results = []
    for method, fmt in jobs:
        results.append(run(method, fmt, tiny=tiny, cache=cache))
        r = results[-1]
        log(
            f"  qwix {method} {fmt}: "
            + (r.error or f"ppl {r.ppl:.3f}, {r.seconds:.1f} s, peak {r.peak_mib:.0f} MiB")
        )
    return results


class _ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1], name="dense")(x), None


class ScanStack(nn.Module):
    """Three residual Dense layers under ``nn.scan``: one ``kernel [3, in, out]`` leaf."""

    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(
            _ScanLayer,
            variable_axes={"params": 0, "quant_stats": 0},
            split_rngs={"params": True},
            length=3,
        )
        return scanned(name="layers")(x, None)[0]


def scan_probe() -> str:
    """What Qwix's GPTQ does with a scan-stacked (``nn.scan``) Linen model: one line."""
    import numpy as np
    import qwix
    from qwix.contrib import gptq

    model, x = ScanStack(), jax.random.normal(jax.random.key(1), (256, 64))
    params = model.init(jax.random.key(0), x)["params"]
    rule = {"module_path": ".*", "weight_qtype": jnp.int4, "tile_size": 32}
    what = "Qwix GPTQ on nn.scan-stacked Dense layers (kernel (3, 64, 64))"
    stage = "calibration"
    try:
        calib = qwix.quantize_model(model, gptq.GptqCalibrationProvider([gptq.GptqRule(**rule)]))
        stats = _calibrate(calib, params, [x])
        stage = "abstract PTQ init"
        ptq_model = qwix.quantize_model(model, qwix.PtqProvider([qwix.QuantizationRule(**rule)]))
        abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), x)["params"]
        stage = "gptq.quantize_params"
        q_gptq = gptq.quantize_params(params, abstract, stats)
        stage = "qwix.quantize_params (RTN)"
        q_rtn = qwix.quantize_params(params, abstract)
    except Exception as e:
        return f"{what} fails in {stage}: {type(e).__name__}: {e}"[:300]
    same = all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(q_gptq), jax.tree.leaves(q_rtn))
    )
    return f"{what}: " + ("identical to its RTN (GPTQ skipped)" if same else "differs from RTN")


def table(results: Sequence[Result]) -> str:
    lines = [
        "| Qwix method | format | ppl | calib + quantize s | peak RSS MiB (base) | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.method} | {r.fmt} | | | | fails: {r.error} |")
        else:
            lines.append(
                f"| {r.method} | {r.fmt} | {r.ppl:.3f} | {r.seconds:.1f} "
                f"| {r.peak_mib:.0f} ({r.base_mib:.0f}) | |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cache", default=str(lm.DEFAULT_CACHE))
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "FORMAT"), help="one run, JSON out")
    args = parser.parse_args(argv)
    config = lm.TINY if args.tiny else lm.DEFAULT
    if args.one:
        result = run_here(*args.one, config, args.cache)
        print(json.dumps(dataclasses.asdict(result)))
        return 0
    lm.load_or_train(config, args.cache)  # train once, before the subprocesses
    print(table(all_runs(tiny=args.tiny, cache=args.cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
