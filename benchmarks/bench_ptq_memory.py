"""Peak memory and time of ``qjax quantize`` on a transformer-sized float32 checkpoint.

Writes a ``.safetensors`` checkpoint of about ``--size-gib`` GiB (an embedding, ``L``
layers of attention and MLP kernels with their biases and norm scales, an output head;
deterministic random normal values), then runs::

    /usr/bin/time -v qjax quantize IN OUT --dtype int4 --granularity per_block --block-size 32

in a subprocess and prints the input and output sizes, the largest tensor, the wall time,
the peak RSS, and whether the peak stays within the budget ``input + output + 2 x largest
tensor``. The checkpoint is streamed to disk one tensor at a time, so making it takes about
one tensor of memory.

Usage::

    python benchmarks/bench_ptq_memory.py [--size-gib 1.0] [--workdir DIR]

``/usr/bin/time`` comes from the ``time`` package (``apt-get install -y time``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from qjax.cli import write_safetensors

D_MODEL = 1024
D_MLP = 4 * D_MODEL
LAYERS_PER_GIB = 16
VOCAB_PER_GIB = 32768


def checkpoint_shapes(size_gib: float) -> dict[str, tuple[int, ...]]:
    """Tensor names (dotted, as PyTorch/Flax exports write them) and shapes, ~size_gib GiB.

    At 1 GiB: 16 layers of d_model 1024 (q, k, v, o: 1024x1024; MLP 1024x4096 and
    4096x1024) plus a 32768x1024 embedding and a 1024x32768 head (128 MiB each, the largest).
    """
    layers = max(1, round(LAYERS_PER_GIB * size_gib))
    vocab = max(1024, round(VOCAB_PER_GIB * size_gib / 1024) * 1024)
    shapes = {"embed.embedding": (vocab, D_MODEL)}
    for i in range(layers):
        p = f"layers.{i}"
        for name in ("query", "key", "value", "out"):
            shapes[f"{p}.attention.{name}.kernel"] = (D_MODEL, D_MODEL)
        shapes[f"{p}.attention_norm.scale"] = (D_MODEL,)
        shapes[f"{p}.mlp.up.kernel"] = (D_MODEL, D_MLP)
        shapes[f"{p}.mlp.up.bias"] = (D_MLP,)
        shapes[f"{p}.mlp.down.kernel"] = (D_MLP, D_MODEL)
        shapes[f"{p}.mlp.down.bias"] = (D_MODEL,)
        shapes[f"{p}.mlp_norm.scale"] = (D_MODEL,)
    shapes["final_norm.scale"] = (D_MODEL,)
    shapes["head.kernel"] = (D_MODEL, vocab)
    return shapes


def write_checkpoint(path: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Streams deterministic N(0, 1/fan_in) float32 tensors into ``path``, one at a time."""
    index = {name: i for i, name in enumerate(shapes)}
    items = [(name, shape, np.dtype(np.float32)) for name, shape in shapes.items()]

    def produce(name: str, dtype: np.dtype) -> np.ndarray:
        shape = shapes[name]
        rng = np.random.default_rng(index[name])
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(1 / np.sqrt(shape[0]))
        return x

    write_safetensors(path, items, produce)


def time_command() -> str:
    """The path of GNU time, installing it with apt-get where it is missing."""
    if not os.path.exists("/usr/bin/time"):
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "time"], check=True, capture_output=True)
    return "/usr/bin/time"


def qjax_command() -> list[str]:
    """The ``qjax`` console script next to this Python, or ``python -c`` on qjax.cli.main."""
    script = os.path.join(os.path.dirname(sys.executable), "qjax")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from qjax.cli import main; sys.exit(main())"]


def parse_time_v(stderr: str) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes from ``/usr/bin/time -v`` output."""
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1)) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds, rss


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(size_gib: float, workdir: str) -> bool:
    """Makes the checkpoint, quantizes it under GNU time and prints the numbers."""
    shapes = checkpoint_shapes(size_gib)
    src = os.path.join(workdir, "model.safetensors")
    dst = os.path.join(workdir, "model-int4.safetensors")
    start = time.perf_counter()
    write_checkpoint(src, shapes)
    print(f"wrote {src} ({len(shapes)} tensors) in {time.perf_counter() - start:.1f} s")

    flags = ["--dtype", "int4", "--granularity", "per_block", "--block-size", "32", "--quiet"]
    command = [time_command(), "-v", *qjax_command(), "quantize", src, dst, *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
        raise SystemExit(f"qjax quantize failed with exit status {done.returncode}")
    wall, rss = parse_time_v(done.stderr)

    input_bytes, output_bytes = os.path.getsize(src), os.path.getsize(dst)
    largest = max(4 * int(np.prod(s)) for s in shapes.values())
    budget = input_bytes + output_bytes + 2 * largest
    print(f"input size       {mib(input_bytes)}")
    print(f"output size      {mib(output_bytes)} ({input_bytes / output_bytes:.2f}x smaller)")
    print(f"largest tensor   {mib(largest)}")
    print(f"wall time        {wall:.1f} s")
    print(f"peak RSS         {mib(rss)}")
    within = rss <= budget
    print(
        f"budget           {mib(budget)} = input + output + 2 x largest tensor: "
        f"{'within' if within else 'OVER'} ({rss / budget:.0%} of it)"
    )
    return within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size (1.0)")
    parser.add_argument("--workdir", help="where to write the files (default: a temp dir)")
    args = parser.parse_args()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        ok = run(args.size_gib, args.workdir)
    else:
        workdir = tempfile.mkdtemp(prefix="qjax-bench-")
        try:
            ok = run(args.size_gib, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
