"""What gradient skipping (grad_skip_threshold) saves, and what it costs in accuracy.

Two batches of the same head: "early" (random features: every probability about 1/C) and
"late" (each feature at a set angle from its class weight, as after training). For each
threshold: the median time of the backward, the ratio to the exact backward (threshold 0)
timed in the same run, the fraction of tiles the rule skips (counted from the probabilities,
with the device's dx tile), and the gradients' error against the exact fused ones.

    python3 benchmarks/grad_skip.py [--device cuda] [--out benchmarks/results]
"""

import argparse
import json
import math
import os
import statistics
import time

import torch

import marginops as mo
from marginops import functional, ops

THRESHOLDS = (0.0, 1e-6, 1e-4, 1e-2)
DX_TILE = {"cpu": (256, 256), "cuda": (32, 64)}  # (rows, classes) of a dx tile


def batch(kind, B, D, C, device, dtype, target_angle=0.7):
    g = torch.Generator().manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g)
    if kind == "late":  # x at target_angle radians (40°) from W_y
        noise = torch.nn.functional.normalize(x - (x * W[y]).sum(1, keepdim=True) * W[y], dim=1)
        x = math.cos(target_angle) * W[y] + math.sin(target_angle) * noise
    to = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return to(x), to(W), y.to(device)


def skipped_fraction(x, W, y, margin, threshold, tile):
    """Tiles the rule makes sparse: every non-label probability exp(z − lse) below the threshold
    (lse from the op, with the margin on the target)."""
    if threshold == 0:
        return 0.0
    with torch.no_grad():
        C = W.shape[0]
        lse = ops.head_stats(x, W, y, num_classes=C, cfg=margin.config()).lse
        P = (functional.class_logits(x, W, margin).double() - lse.double()[:, None]).exp()
        P[torch.arange(len(y)), y] = 0.0  # label entries never count
        rows, cols = tile
        P = torch.nn.functional.pad(P, (0, (-C) % cols, 0, (-len(y)) % rows))
        tile_max = P.view(P.shape[0] // rows, rows, P.shape[1] // cols, cols).amax((1, 3))
        return float((tile_max < threshold).double().mean())


def timed_backwards(x, W, y, margin, thresholds, repeat, device):
    """Median backward time per threshold, the thresholds taking turns in every round so that a
    drifting machine affects them alike; and each threshold's gradients."""
    times = {t: [] for t in thresholds}
    grads = {}
    for k in range(repeat + 1):
        for t in thresholds:
            x.grad = W.grad = None
            loss = mo.margin_cross_entropy(x, W, y, margin, grad_skip_threshold=t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k:  # round 0 warms up
                times[t].append(time.perf_counter() - t0)
            grads[t] = (x.grad.clone(), W.grad.clone())
    return {t: statistics.median(v) for t, v in times.items()}, grads


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=50_000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", help="folder for {device}-grad-skip.json and .md")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    margin = mo.ArcFace(s=64.0, m=0.5)
    rows = []
    for kind in ("early", "late"):
        x, W, y = batch(kind, args.batch, args.dim, args.classes, device, dtype)
        times, grads = timed_backwards(x, W, y, margin, THRESHOLDS, args.repeat, device)
        exact = grads[0.0]
        for threshold in THRESHOLDS:
            dx, dW = grads[threshold]
            rows.append(
                {
                    "batch": kind,
                    "threshold": threshold,
                    "backward_s": times[threshold],
                    "time_ratio": times[threshold] / times[0.0],
                    "tiles_skipped": skipped_fraction(x, W, y, margin, threshold, DX_TILE[device.type]),
                    "dx_rel_err": rel(dx, exact[0]),
                    "dW_rel_err": rel(dW, exact[1]),
                }
            )
            print(
                " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                flush=True,
            )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"{device.type}-grad-skip")
        config = {k: getattr(args, k) for k in ("batch", "dim", "classes", "dtype", "repeat")}
        with open(stem + ".json", "w") as f:
            json.dump({"config": config, "margin": repr(margin), "torch": torch.__version__, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(
                f"Gradient skipping, {device.type}: B={args.batch}, D={args.dim}, C={args.classes}, {args.dtype}, "
                f"{margin!r}\n\n"
            )
            f.write(
                "| batch | threshold | backward (s) | x exact | tiles skipped | dx rel. err | dW rel. err "
                "|\n|---|---|---|---|---|---|---|\n"
            )
            for r in rows:
                f.write(
                    f"| {r['batch']} | {r['threshold']:g} | {r['backward_s']:.3f} | {r['time_ratio']:.2f} | "
                    f"{r['tiles_skipped']:.1%} | {r['dx_rel_err']:.1e} | {r['dW_rel_err']:.1e} |\n"
                )


if __name__ == "__main__":
    main()
