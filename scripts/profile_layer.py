"""Where the time of one benchmark layer goes: ``torch.profiler`` over a few passes of a layer of the benchmark grid
next to ``nn.Linear`` of the same shape, with the path the layer takes. A diagnosis for cells where a compressed
layer is slower than dense (e.g. TT training on a GPU: which kernels, how many launches, any host-side gap).

    python scripts/profile_layer.py --layer tt-r2 --shape 512x2048 --tokens 4096 --pass train --out runs/profile
    python scripts/profile_layer.py --layer tucker-r2 --device cuda --dtype bfloat16 --out runs/profile-cuda

Writes OUT/<layer>-<pass>-<tokens>.txt (per-op table of the compressed layer and of dense, sorted by self time on
the device, i.e. CUDA when profiled there, else CPU) and OUT/<layer>-<pass>-<tokens>.trace.json (Chrome trace).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from compressed_transformer.bench import (
    BenchConfig,
    _shapes,
    build_layer,
    check_grid,
    layer_path,
    output_folder,
    resolve_device,
)


def one_pass(layer: torch.nn.Module, x: torch.Tensor, train: bool) -> None:
    if train:
        layer(x).float().sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def _shapes_or_none(text: str) -> tuple[tuple[int, int]] | None:
    """``INxOUT`` as a one-shape tuple, or ``None`` if it is not one positive shape."""
    try:
        shapes = _shapes(text)
    except argparse.ArgumentTypeError:
        return None
    ok = len(shapes) == 1 and len(shapes[0]) == 2 and min(shapes[0]) >= 1
    return shapes if ok else None  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="tt-r2", help="a benchmark layer name (see bench.build_layer)")
    parser.add_argument("--shape", default="512x2048", help="INxOUT")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--pass", dest="pass_name", choices=("forward", "train"), default="train")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or float64 (auto: bf16 on CUDA)")
    parser.add_argument("--steps", type=int, default=20, help="profiled passes (after as many warm-up passes)")
    parser.add_argument("--out", default="runs/profile")
    args = parser.parse_args()
    if args.tokens < 1 or args.steps < 1:
        parser.error("--tokens and --steps must be >= 1")
    shapes = _shapes_or_none(args.shape)
    if shapes is None:
        parser.error(f"--shape looks like 512x2048, got {args.shape!r}")
    ((in_features, out_features),) = shapes
    try:
        # the benchmark's own checks: device and dtype (auto: bf16 on CUDA), the layer's name and setting
        config = BenchConfig(
            shapes=((in_features, out_features),),
            layers=tuple(dict.fromkeys(("dense", args.layer))),  # --layer dense: profiled once
            device=args.device,
            dtype=args.dtype,
            compile="off",
            transformer=None,
        )
        device, dtype, _ = resolve_device(config)
        check_grid(config)
        # built before any profiling: a tltorch layer without tensorly-torch fails here
        layers = {n: build_layer(n, in_features, out_features, device=device, dtype=dtype) for n in config.layers}
        out = output_folder(args.out)
    except (ValueError, ImportError, OSError) as error:
        parser.error(str(error))
    cuda = device.type == "cuda"
    train = args.pass_name == "train"
    x = torch.randn(args.tokens, in_features, device=device, dtype=dtype)
    stem = f"{args.layer}-{args.pass_name}-{args.tokens}"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    report = []
    for name, layer in layers.items():
        layer.train(train)
        for _ in range(args.steps):  # warm-up: kernel choices, caches, the layer's plan memo
            one_pass(layer, x, train)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                one_pass(layer, x, train)
            if cuda:
                torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) / args.steps * 1e3
        if name == args.layer:
            prof.export_chrome_trace(str(out / f"{stem}.trace.json"))
        path = layer_path(layer, args.tokens, train)
        report.append(f"## {name} ({path}): {ms:.3f} ms per pass under the profiler\n")
        report.append(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60) + "\n")
    setting = f"{args.layer} {args.shape} {args.pass_name}, {args.tokens} tokens, {device}, {dtype}"
    header = f"# {setting}, torch {torch.__version__}\n"
    text = header + "\n" + "\n".join(report)
    (out / f"{stem}.txt").write_text(text)
    print(text)
    print(f"wrote {out / (stem + '.txt')} and {out / (stem + '.trace.json')}")


if __name__ == "__main__":
    main()
