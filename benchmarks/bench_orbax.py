"""Orbax checkpoints of quantized trees: bytes against float, save / restore / convert times,
and the measured inputs of the README's "at internet scale, on paper" arithmetic.

    python benchmarks/bench_orbax.py            # 256 MiB float32 tree (16 x 2048 x 2048)
    python benchmarks/bench_orbax.py --layers 4 # a quicker 64 MiB run
    python benchmarks/bench_orbax.py --streaming 16  # + memory of the conversions of a
                                                     # 16 x 16 MiB int8 file, in subprocesses

Prints one line per configuration and a JSON summary (``--json PATH`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
import qjax.orbax as qo

CONFIGS = {"int4/128": "int4:per_block:128", "int8/channel": "int8:per_channel"}


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        times.append(_timed(fn)[1])
    return min(times)


def checkpoints(layers: int, size: int, root: pathlib.Path) -> dict:
    rng = np.random.default_rng(0)
    params = {
        f"layer{i}": {"kernel": jnp.asarray(rng.normal(size=(size, size)).astype(np.float32))}
        for i in range(layers)
    }
    float_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    rows = {}
    shutil.rmtree(root / "float", ignore_errors=True)
    _, seconds = _timed(qo.save, root / "float", params)
    rows["float32"] = {"bytes": _dir_bytes(root / "float"), "save_s": seconds}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    _, seconds = _timed(qo.restore, root / "float", abstract)
    rows["float32"]["restore_s"] = seconds
    for name, rule in CONFIGS.items():
        rules = {".*": rule}
        quantize = jax.jit(lambda p, rules=rules: qjax.quantize_tree(p, rules))
        qtree, _ = _timed(quantize, params)  # compile
        quantize_s = _best(lambda q=quantize: q(params))
        path = root / name.replace("/", "_")
        shutil.rmtree(path, ignore_errors=True)
        _, save_s = _timed(qo.save, path, qtree)
        target = qo.abstract_quantized(abstract, rules)
        restored, restore_s = _timed(qo.restore, path, target)
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(qtree))
        )
        st = root / f"{path.name}.safetensors"
        _, to_st_s = _timed(qo.orbax_to_safetensors, path, st)
        back = root / f"{path.name}-back"
        shutil.rmtree(back, ignore_errors=True)
        _, from_st_s = _timed(qo.safetensors_to_orbax, st, back)
        meta = sum(
            f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != "manifest.ocdbt"
        )
        rows[name] = {
            "bytes": _dir_bytes(path),
            "held_bytes": sum(qa.nbytes for qa in jax.tree.leaves(qtree, is_leaf=_is_q)),
            "metadata_bytes": meta,
            "quantize_s": quantize_s,
            "save_s": save_s,
            "restore_s": restore_s,
            "bit_exact": same,
            "safetensors_bytes": st.stat().st_size,
            "to_safetensors_s": to_st_s,
            "from_safetensors_s": from_st_s,
        }
    return {"float_bytes": float_bytes, "leaves": layers, "rows": rows}


def _is_q(x) -> bool:
    return isinstance(x, qjax.QArray)


def one_shard() -> dict:
    """Quantizing one tensor-parallel shard of a 70B-class MLP kernel (8192 x 28672 over 8):
    a Flax kernel [in, out] in bfloat16, blocked along its inputs, as quantize_tree does."""
    x = jax.random.normal(jax.random.key(0), (8192, 28672 // 8), jnp.bfloat16)
    spec = qjax.QuantSpec("int4", granularity=qjax.per_block(-2, 128))
    quantize = jax.jit(lambda w: qjax.quantize(w, spec))
    _timed(quantize, x)
    seconds = _best(lambda: quantize(x))
    return {"shape": list(x.shape), "params": int(x.size), "seconds": seconds}


def on_paper(shard: dict, metadata_per_leaf: float) -> dict:
    params, hosts, leaves = 70e9, 64, 80 * 7 + 3  # Llama-2-70B: 7 matrices per layer, + embeds
    per_param = 0.5 + 4 / 128  # int4 values + one float32 scale per 128
    rate = shard["params"] / shard["seconds"]
    return {
        "params": params,
        "hosts": hosts,
        "bf16_bytes_per_host": params * 2 / hosts,
        "int4_128_bytes_per_host": params * per_param / hosts,
        "int4_128_total_bytes": params * per_param,
        "quantize_s_per_host_at_measured_rate": params / hosts / rate,
        "params_per_s_measured": rate,
        "metadata_bytes_estimate": leaves * metadata_per_leaf,
    }


def _peak_memory(fn, *args) -> dict:
    """Runs ``fn(*args)``, sampling this process's anonymous and file-backed RSS (Linux)."""

    def sample() -> dict:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}

    base, peak, done = sample(), sample(), threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            for k, v in sample().items():
                peak[k] = max(peak[k], v)

    thread = threading.Thread(target=watch)
    thread.start()
    start = time.perf_counter()
    try:
        fn(*args)
    finally:
        done.set()
        thread.join()
    return {
        "seconds": time.perf_counter() - start,
        "anon_mib_above_start": peak["RssAnon"] - base["RssAnon"],
        "file_mib_above_start": peak["RssFile"] - base["RssFile"],
    }


def streaming(leaves: int, root: pathlib.Path) -> dict:
    """Peak memory of each conversion of a ``leaves`` x 16 MiB int8 qjax file, each run in a
    fresh process (this script with ``--convert``)."""
    tree = {}
    for i in range(leaves):  # one float leaf at a time
        w = jax.random.normal(jax.random.key(i), (4096, 4096))
        tree[f"layer{i}"] = {"kernel": qjax.quantize(w, "int8:per_channel")}
    qjax.save(root / "model.safetensors", tree)
    del tree
    out = {"file_mib": (root / "model.safetensors").stat().st_size / 2**20}
    for direction, src, dst in (
        ("safetensors_to_orbax", root / "model.safetensors", root / "ckpt"),
        ("orbax_to_safetensors", root / "ckpt", root / "back.safetensors"),
    ):
        command = [sys.executable, __file__, "--convert", direction, str(src), str(dst)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        out[direction] = json.loads(done.stdout.splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--streaming", type=int, default=0, metavar="LEAVES")
    parser.add_argument("--convert", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert:
        direction, src, dst = args.convert
        print(json.dumps(_peak_memory(getattr(qo, direction), src, dst)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = checkpoints(args.layers, args.size, pathlib.Path(tmp))
        if args.streaming:
            result["streaming"] = streaming(args.streaming, pathlib.Path(tmp))
    shard = one_shard()
    meta = result["rows"]["int4/128"]["metadata_bytes"] / args.layers
    result |= {"one_shard": shard, "on_paper": on_paper(shard, meta)}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mib = 2**20
    print(f"float tree: {result['float_bytes'] / mib:.0f} MiB in {args.layers} leaves")
    for name, row in result["rows"].items():
        line = f"{name:13s} {row['bytes'] / mib:8.1f} MiB on disk"
        line += f" ({result['float_bytes'] / row['bytes']:.1f}x smaller than float32 in memory)"
        line += f"  save {row['save_s']:.2f} s  restore {row['restore_s']:.2f} s"
        if "quantize_s" in row:
            line += f"  quantize {row['quantize_s']:.2f} s  exact {row['bit_exact']}"
            line += f"  ->safetensors {row['to_safetensors_s']:.2f} s"
            line += f"  <-safetensors {row['from_safetensors_s']:.2f} s"
        print(line)
    print(f"one shard {shard['shape']} bf16 -> int4/128: {shard['seconds'] * 1e3:.0f} ms")
    if "streaming" in result:
        print(json.dumps(result["streaming"], indent=1))
    print(json.dumps(result["on_paper"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
