"""``marginops demo``: the pictures the literature uses to explain the margin family.

A small network embeds scikit-learn's bundled handwritten digits (8×8 images, 10 classes, no
download) into 2 (and 3) dimensions, trained with each head from marginops: Softmax, NormFace,
CosFace, ArcFace and SphereFace. It draws the held-out features — softmax's radial fan against
the compact angular clusters the margins produce — and reports verification on held-out pairs:
best-threshold pair accuracy (threshold chosen on the other half of the pairs) and the true
accept rate at a fixed false accept rate, on cosine similarity — and how compact each class
is: the mean angle between a held-out feature and its class's mean direction.

Reproducible: the same seed gives the same figures on every run on one machine (seeded data
split, initialization and batch order, torch.use_deterministic_algorithms, and --threads 1 by
default, so that no reduction's order depends on the thread count). Other machines, CPU
instruction sets or torch versions may differ in the last digits.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import margins as M
from ..heads import MarginHead
from .common import HelpFormatter, plain

# Margins sized for 10 classes in 2-3 dimensions (36° per class in 2-D): the face-recognition
# defaults (s = 64, m = 0.5) would not leave room for ten angular clusters on a circle.
HEADS: List[Tuple[str, M.Margin]] = [
    ("Softmax", M.Softmax()),
    ("NormFace", M.NormFace(s=10.0)),
    ("CosFace", M.CosFace(s=10.0, m=0.2)),
    ("ArcFace", M.ArcFace(s=10.0, m=0.2)),
    ("SphereFace", M.SphereFace(m=2)),
]


def load_digits(seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y): 70/30 split per class."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(0.7 * len(idx))
        train.append(idx[:cut])
        test.append(idx[cut:])
    tr, te = torch.cat(train), torch.cat(test)
    return x[tr], y[tr], x[te], y[te]


def embedder(dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.BatchNorm1d(256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, dim),
    )


def train_head(margin: M.Margin, dim: int, data, epochs: int, seed: int) -> Tuple[nn.Module, MarginHead]:
    xtr, ytr, _, _ = data
    torch.manual_seed(seed)
    net, head = embedder(dim), MarginHead(dim, 10, margin=margin)
    with torch.no_grad():
        head.weight.normal_()  # unit-scale class vectors: a 2-D head needs no small init
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr), generator=g).split(64):
            opt.zero_grad()
            head(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
        sched.step()
    return net.eval(), head.eval()


def verification(feats: torch.Tensor, labels: torch.Tensor, far: float) -> Dict[str, float]:
    """Pair accuracy (threshold from the other half of the pairs, both ways) and TAR at `far`, on
    the cosine similarity of every held-out pair."""
    f = F.normalize(feats, dim=1)
    i, j = torch.triu_indices(len(f), len(f), offset=1)
    sim = (f[i] * f[j]).sum(1)
    same = labels[i] == labels[j]
    g = torch.Generator().manual_seed(0)
    half = torch.rand(len(sim), generator=g) < 0.5

    def best_threshold(s, t):
        order = s.argsort(descending=True)
        tp = t[order].cumsum(0).double()
        fp = (~t[order]).cumsum(0).double()
        acc = (tp + (~t).sum() - fp) / len(t)  # accept the top k
        k = int(acc.argmax())
        return float(s[order][k])

    accs = []
    for fit, test in ((half, ~half), (~half, half)):
        th = best_threshold(sim[fit], same[fit])
        accs.append(float(((sim[test] >= th) == same[test]).double().mean()))
    impostor = sim[~same].sort().values
    th = float(impostor[min(len(impostor) - 1, int(math.ceil((1 - far) * len(impostor))))])
    tar = float((sim[same] > th).double().mean())
    # Compactness: the mean angle between a feature and its class's mean direction.
    centers = F.normalize(torch.stack([f[labels == c].mean(0) for c in labels.unique()]), dim=1)
    spread = torch.rad2deg(torch.acos((f * centers[labels]).sum(1).clamp(-1, 1))).mean()
    return {"pair_accuracy": sum(accs) / 2, "tar": tar, "intra_angle": float(spread)}


def _scatter_2d(ax, feats, labels, title, cmap):
    ax.scatter(feats[:, 0], feats[:, 1], c=labels, cmap=cmap, s=5, vmin=0, vmax=9)
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    ax.axhline(0, color="0.85", lw=0.5)
    ax.axvline(0, color="0.85", lw=0.5)


def _angles(ax, feats, labels, cmap):
    theta = torch.atan2(feats[:, 1], feats[:, 0])
    bins = torch.linspace(-math.pi, math.pi, 73)
    for c in range(10):
        hist = torch.histc(theta[labels == c], bins=72, min=-math.pi, max=math.pi)
        ax.bar(bins[:-1] + math.pi / 72, hist, width=2 * math.pi / 72, color=cmap(c / 9), alpha=0.8)
    ax.set_yticks([])


def _sphere(ax, feats, labels, title, cmap):
    f = F.normalize(feats, dim=1)
    ax.scatter(f[:, 0], f[:, 1], f[:, 2], c=labels, cmap=cmap, s=4, vmin=0, vmax=9)
    ax.set_title(title)
    ax.set_box_aspect((1, 1, 1))
    for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        set_lim(-1, 1)


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, int(getattr(args, "threads", 1))))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run(args, plt)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _run(args, plt) -> int:
    print(
        f"marginops demo: seed {args.seed}, {torch.get_num_threads()} thread(s), deterministic algorithms "
        "(the same figures on every run on this machine)",
        flush=True,
    )
    data = load_digits(args.seed)
    dims = [int(d) for d in str(args.dims).split(",")]
    os.makedirs(args.out, exist_ok=True)
    cmap = plt.get_cmap("tab10")
    table = []
    written = []
    for dim in dims:
        feats_by_head = {}
        for name, margin in HEADS:
            net, head = train_head(margin, dim, data, args.epochs, args.seed)
            with torch.no_grad():
                feats = net(data[2])
                acc = float((head.logits(feats).argmax(1) == data[3]).double().mean())
            v = verification(feats, data[3], args.far)
            table.append((dim, name, acc, v["pair_accuracy"], v["tar"], v["intra_angle"]))
            feats_by_head[name] = feats
            print(
                f"{dim}-D {name:<11} top-1 {acc:.3f}  pair accuracy {v['pair_accuracy']:.3f}  "
                f"TAR@FAR={args.far:g} {v['tar']:.3f}  intra-class angle {v['intra_angle']:.1f}°",
                flush=True,
            )
        n = len(HEADS)
        if dim == 2:
            fig = plt.figure(figsize=(3.6 * n, 7.2))
            for k, (name, _) in enumerate(HEADS):
                _scatter_2d(fig.add_subplot(2, n, k + 1), feats_by_head[name], data[3], name, cmap)
                _angles(fig.add_subplot(2, n, n + k + 1, projection="polar"), feats_by_head[name], data[3], cmap)
            fig.suptitle("2-D features of held-out digits (top) and their angles (bottom), by head")
        elif dim == 3:
            fig = plt.figure(figsize=(3.6 * n, 3.8))
            for k, (name, _) in enumerate(HEADS):
                _sphere(fig.add_subplot(1, n, k + 1, projection="3d"), feats_by_head[name], data[3], name, cmap)
            fig.suptitle("3-D features of held-out digits, normalized onto the sphere, by head")
        else:
            continue
        fig.tight_layout()
        path = os.path.join(args.out, f"features_{dim}d.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    lines = [
        f"| dims | head | held-out top-1 | pair accuracy | TAR@FAR={args.far:g} | mean intra-class angle |",
        "|---|---|---|---|---|---|",
    ] + [f"| {d} | {n} | {a:.3f} | {p:.3f} | {t:.3f} | {g:.1f}° |" for d, n, a, p, t, g in table]
    md = os.path.join(args.out, "verification.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    written.append(md)
    print("\n" + "\n".join(lines))
    print("\nwrote " + ", ".join(written))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="marginops-demo", help="folder for the PNGs and the table")
    p.add_argument("--dims", default="2,3", help="feature dimensions to train, comma-separated")
    p.add_argument(
        "--epochs",
        type=int,
        default=100,
        help="training epochs per head (the defaults run in about a minute on 2 cores)",
    )
    p.add_argument("--far", type=float, default=1e-2, help="false accept rate of the TAR column")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while training (1: the figures do not depend on the machine's core count)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, the initialization and the batch order")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="marginops demo", description=plain(__doc__), formatter_class=HelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
