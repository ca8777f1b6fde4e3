"""Calibrated PTQ (GPTQ, AWQ, SmoothQuant) on real models, qjax beside Google's Qwix.

One command, one run, markdown tables::

    python benchmarks/bench_calibrated.py            # about 15 minutes on 2 cores
    python benchmarks/bench_calibrated.py --tiny     # the same on tiny models (a minute)

1. **Weight-only PTQ of a language model** (:mod:`lm_example`: a byte-level transformer
   trained on the Python standard library, cached after its first run): held-out byte
   perplexity for int4 per block of 128, int4 per block of 32, int2 per block of 32 and
   mxfp4 (the ``query|key|value|out|up|down`` kernels; embeddings, norms and the head stay
   float), for round to nearest, GPTQ and AWQ, with the fraction of round to nearest's
   loss each method recovers, ``(RTN - method) / (RTN - float)``. The same model,
   parameters, calibration batches (16 x 8 x context bytes of training text) and formats
   through Qwix 0.1.8 (:mod:`qwix_calibrated`). Every calibrated run is its own subprocess:
   its wall time and peak resident memory (``ru_maxrss``; in brackets, the process's peak
   before calibration started) cover calibration and quantization, compilation included.
2. **W8A8** (int8 weights per output channel, int8 activations per token, dynamic): plain
   against SmoothQuant (alpha 0.5), qjax (:func:`qjax.flax.serve.served`) and Qwix.
3. **A third-party model**: all-MiniLM-L6-v2 (transformers' ``FlaxBertModel``, the
   checkpoint of :mod:`bert_example`), its encoder's kernels int4 per block of 32 and 128
   by round to nearest, GPTQ and AWQ; sentence-embedding cosine against float (mean and
   worst of 32 sentences). Calibration: the 32 training sentences of ``bert_example`` and
   96 snippets of the LM's training text (Python source).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_example as lm
import qjax
import qwix_calibrated as qw
from qjax.flax import linen as qlinen
from qjax.flax import serve

LM_KERNELS = r".*block_\d+/(query|key|value|out|up|down)/kernel"
FORMATS = {  # the names of qwix_calibrated.FORMATS, as qjax shorthand
    "int4/128": "int4:per_block:128",
    "int4/32": "int4:per_block:32",
    "int2/32": "int2:per_block:32",
    "mxfp4": "mxfp4",
    "int8/ch": "int8:per_channel",
}
WEIGHT_FORMATS = ("int4/128", "int4/32", "int2/32", "mxfp4")
W8A8_RULES = {
    LM_KERNELS: qlinen.LayerQuant(
        weight=qjax.parse_spec("int8:per_channel"),
        act=qlinen.ActQuant(qjax.QuantSpec("int8", granularity=qjax.per_token())),
    )
}
BERT_KERNELS = r"encoder/.*/kernel"


# qjax, one (method, format) -----------------------------------------------------------------


def qjax_quantized(method: str, fmt: str, fn, variables: Any, batches: Sequence[Any]) -> Any:
    """The quantized tree: round to nearest, or capture statistics then ``method``."""
    rules = {LM_KERNELS: FORMATS[fmt]}
    if method in ("rtn", "w8a8"):
        return qjax.quantize_tree(variables, rules)
    stats = qjax.capture.accumulate(fn, variables, batches)
    return qjax.quantize_tree(variables, rules, method=method, statistics=stats)


def qjax_apply(method: str, config: lm.LMConfig):
    """How the quantized tree is evaluated: weight-only dequantized, or served W8A8."""
    if method in ("w8a8", "smoothquant"):
        return serve.served(lm.apply(config), W8A8_RULES)
    return qjax.dequantizing(lm.apply(config))


def run_here(method: str, fmt: str, config: lm.LMConfig, cache: Path | str) -> qw.Result:
    """One qjax (method, format) in this process; errors become the result's ``error``."""
    variables = lm.load_or_train(config, cache)
    batches = [jnp.asarray(b) for b in lm.calibration_batches(qw.N_CALIB, config.context)]
    windows = lm.eval_windows(config.context)
    base = qw._maxrss_mib()
    start = time.perf_counter()
    try:
        qtree = qjax_quantized(method, fmt, lm.apply(config), variables, batches)
        jax.block_until_ready(qtree)
    except Exception as e:
        return qw.Result(method, fmt, None, None, None, base, f"{type(e).__name__}: {e}"[:300])
    seconds, peak = time.perf_counter() - start, qw._maxrss_mib()
    return qw.Result(
        method, fmt, lm.perplexity(qjax_apply(method, config), qtree, windows), seconds, peak, base
    )


def run_qjax(method: str, fmt: str, *, tiny: bool, cache: Path | str) -> qw.Result:
    return qw.run_in_subprocess(__file__, method, fmt, tiny=tiny, cache=cache)


def qjax_scan_probe() -> str:
    """qjax's GPTQ on :class:`qwix_calibrated.ScanStack` (scan-stacked layers): one line."""
    model, x = qw.ScanStack(), jax.random.normal(jax.random.key(1), (256, 64))
    variables = model.init(jax.random.key(0), x)
    rules = {".*kernel": "int4:per_block:32"}
    what = "qjax GPTQ on nn.scan-stacked Dense layers (kernel (3, 64, 64))"
    try:
        stats = qjax.capture.accumulate(model.apply, variables, [x])
        q_gptq = qjax.quantize_tree(variables, rules, method="gptq", statistics=stats)
    except Exception as e:
        return f"{what} fails: {type(e).__name__}: {e}"[:300]
    q_rtn = qjax.quantize_tree(variables, rules)

    def out_err(q):
        return float(
            jnp.mean((model.apply(qjax.dequantize_tree(q), x) - model.apply(variables, x)) ** 2)
        )

    return (
        f"{what}: output MSE {out_err(q_gptq):.3g} (RTN {out_err(q_rtn):.3g}), "
        f"Hessian {stats['params/layers/dense/kernel'].hessian.shape}"
    )


# The third-party BERT -----------------------------------------------------------------------


@dataclasses.dataclass
class BertRow:
    fmt: str
    method: str
    mean_cos: float | None
    worst_cos: float | None
    seconds: float | None
    error: str | None = None


def bert_rows(tiny: bool, cache: Path | str, formats=("int4/32", "int4/128")) -> tuple[str, list]:
    """Embedding cosines of MiniLM (``--tiny``: a random 2-layer BERT) against float."""
    import bert_example as be

    with tempfile.TemporaryDirectory() as tmp:
        setup = be.make_setup(argparse.Namespace(tiny=tiny, random=False, cache=cache), Path(tmp))
        import safetensors.numpy

        params = be.flax_params(safetensors.numpy.load_file(str(setup.checkpoint)))
    vocab = setup.config.vocab_size

    def embed(params, ids, mask):
        return be.mean_pool(setup.model(ids, mask, params=params).last_hidden_state, mask)

    eval_ids, eval_mask = be.tokenize(setup.model_dir, be.EVAL_SENTENCES, vocab, seed=1)
    snippets = [s for batch in lm.calibration_batches(12, 256) for s in batch.astype(np.uint8)]
    texts = list(be.TRAIN_SENTENCES) + [bytes(s).decode("utf-8", "replace") for s in snippets]
    ids, mask = be.tokenize(setup.model_dir, texts, vocab, seed=2)  # one padded length
    calib = [
        (jnp.asarray(ids[i : i + 16]), jnp.asarray(mask[i : i + 16]))
        for i in range(0, len(texts), 16)
    ]
    run = jax.jit(qjax.dequantizing(embed))
    ref = run(params, eval_ids, eval_mask)
    start = time.perf_counter()
    stats = qjax.capture.accumulate(embed, params, calib)
    jax.block_until_ready(stats)
    capture_s = time.perf_counter() - start
    rows = []
    for fmt in formats:
        rules = {BERT_KERNELS: FORMATS[fmt]}
        for method in ("rtn", "gptq", "awq"):
            start = time.perf_counter()
            try:
                kw = {} if method == "rtn" else {"method": method, "statistics": stats}
                qtree = qjax.quantize_tree(params, rules, **kw)
                jax.block_until_ready(qtree)
            except Exception as e:
                rows.append(
                    BertRow(fmt, method, None, None, None, f"{type(e).__name__}: {e}"[:200])
                )
                continue
            seconds = time.perf_counter() - start
            c = be.cosines(run(qtree, eval_ids, eval_mask), ref)
            rows.append(BertRow(fmt, method, float(c.mean()), float(c.min()), seconds))
    n_rows = sum(int(np.asarray(m).sum()) for _, m in calib)
    label = f"{setup.label}; calibration {n_rows:,} tokens, capture {capture_s:.1f} s"
    return label, rows


# Tables -------------------------------------------------------------------------------------


def _ppl(r: qw.Result | None) -> str:
    if r is None:
        return ""
    return f"{r.ppl:.3f}" if r.error is None else "fails"


def _recovered(rtn: qw.Result | None, r: qw.Result | None, float_ppl: float) -> str:
    if rtn is None or r is None or rtn.error or r.error or rtn.ppl - float_ppl <= 0:
        return ""
    return f"{(rtn.ppl - r.ppl) / (rtn.ppl - float_ppl):+.0%}"


def _cost(r: qw.Result | None) -> str:
    if r is None or r.error:
        return ""
    return f"{r.seconds:.1f} s, {r.peak_mib:.0f} ({r.base_mib:.0f}) MiB"


def lm_table(float_ppl: float, q: dict, w: dict, formats: Sequence[str]) -> str:
    lines = [
        "| format | float | RTN | GPTQ | AWQ | GPTQ recovers | AWQ recovers "
        "| Qwix RTN | Qwix GPTQ | Qwix AWQ | Qwix GPTQ recovers | Qwix AWQ recovers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in formats:
        rtn, g, a = q.get(("rtn", f)), q.get(("gptq", f)), q.get(("awq", f))
        wr, wg, wa = w.get(("rtn", f)), w.get(("gptq", f)), w.get(("awq", f))
        lines.append(
            f"| {f} | {float_ppl:.3f} | {_ppl(rtn)} | {_ppl(g)} | {_ppl(a)} "
            f"| {_recovered(rtn, g, float_ppl)} | {_recovered(rtn, a, float_ppl)} "
            f"| {_ppl(wr)} | {_ppl(wg)} | {_ppl(wa)} "
            f"| {_recovered(wr, wg, float_ppl)} | {_recovered(wr, wa, float_ppl)} |"
        )
    return "\n".join(lines)


def cost_table(q: dict, w: dict, keys: Sequence[tuple[str, str]]) -> str:
    lines = [
        "| method | format | qjax: calibrate + quantize, peak RSS (before) "
        "| Qwix: calibrate + quantize, peak RSS (before) |",
        "|---|---|---:|---:|",
    ]
    for m, f in keys:
        lines.append(f"| {m} | {f} | {_cost(q.get((m, f)))} | {_cost(w.get((m, f)))} |")
    return "\n".join(lines)


def failures(results: dict, who: str) -> list[str]:
    return [f"- {who} {m} {f}: {r.error}" for (m, f), r in results.items() if r.error]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny LM and BERT (about a minute)")
    parser.add_argument("--cache", default=str(lm.DEFAULT_CACHE))
    parser.add_argument("--formats", default=",".join(WEIGHT_FORMATS))
    parser.add_argument("--no-qwix", action="store_true", help="qjax rows only")
    parser.add_argument("--no-bert", action="store_true", help="skip the BERT table")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = lm.TINY if args.tiny else lm.DEFAULT
    if args.one:
        print(json.dumps(dataclasses.asdict(run_here(*args.one, config, args.cache))))
        return 0
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    known = set(FORMATS) - {"int8/ch"} if args.no_qwix else set(WEIGHT_FORMATS)
    unknown = sorted(set(formats) - known)
    if unknown:
        parser.error(f"unknown --formats {unknown}: choose from {', '.join(sorted(known))}")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    variables = lm.load_or_train(config, args.cache, log=log)
    info = lm.training_info(config, args.cache)
    windows = lm.eval_windows(config.context)
    float_ppl = lm.perplexity(lm.apply(config), variables, windows)
    log(f"float perplexity {float_ppl:.3f}")

    q: dict[tuple[str, str], qw.Result] = {}
    w: dict[tuple[str, str], qw.Result] = {}
    weight_jobs = [(m, f) for f in formats for m in ("rtn", "gptq", "awq")]
    w8a8_jobs = [("w8a8", "int8/ch"), ("smoothquant", "int8/ch")]
    for m, f in weight_jobs + w8a8_jobs:
        q[m, f] = run_qjax(m, f, tiny=args.tiny, cache=args.cache)
        log(f"qjax {m} {f}: {q[m, f].error or f'ppl {q[m, f].ppl:.3f}'}")
        if not args.no_qwix:
            w[m, f] = qw.run(m, f, tiny=args.tiny, cache=args.cache)
            log(f"qwix {m} {f}: {w[m, f].error or f'ppl {w[m, f].ppl:.3f}'}")

    n = sum(x.size for x in jax.tree.leaves(variables))
    out = [
        f"## Byte-level LM ({config.n_layers} layers, width {config.d_model}, context "
        f"{config.context}; {n:,} parameters; trained {config.steps} steps in "
        f"{info.get('train_seconds', math.nan):.0f} s), held-out byte perplexity over "
        f"{len(windows)} x {config.context} bytes",
        "",
        lm_table(float_ppl, q, w, formats),
        "",
        "Recovers: (RTN - method) / (RTN - float); Qwix's against Qwix's own round to nearest "
        "(its grids differ from qjax's). Embeddings, norms and the head stay float.",
        "",
        "### Cost of calibration + quantization (one subprocess each; compilation included)",
        "",
        cost_table(q, w, [k for k in weight_jobs if k[0] != "rtn"] + w8a8_jobs[1:]),
        "",
        "## W8A8 (int8 weights per output channel, int8 activations per token, dynamic)",
        "",
        "| | qjax ppl | Qwix ppl |",
        "|---|---:|---:|",
        f"| float | {float_ppl:.3f} | {float_ppl:.3f} |",
        *(f"| {m} | {_ppl(q.get((m, f)))} | {_ppl(w.get((m, f)))} |" for m, f in w8a8_jobs),
    ]
    fails = failures(q, "qjax") + failures(w, "Qwix")
    if fails:
        out += ["", "Failures:", *fails]
    out += ["", "Scan-stacked layers:", f"- {qjax_scan_probe()}"]
    if not args.no_qwix:
        out.append(f"- {qw.scan_probe()}")
    if not args.no_bert:
        label, rows = bert_rows(args.tiny, args.cache)
        log("BERT done")
        out += [
            "",
            f"## {label}: sentence-embedding cosine against float, encoder kernels only",
            "",
            "| format | method | mean cos | worst cos | quantize s |",
            "|---|---|---:|---:|---:|",
        ]
        for r in rows:
            if r.error:
                out.append(f"| {r.fmt} | {r.method} | fails: {r.error} | | |")
            else:
                out.append(
                    f"| {r.fmt} | {r.method} | {r.mean_cos:.5f} | {r.worst_cos:.5f} "
                    f"| {r.seconds:.1f} |"
                )
    out += ["", f"Total {time.perf_counter() - start:.0f} s."]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
