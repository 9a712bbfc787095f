"""insightface's arcface_torch training loop (train_v2.py) with marginops's head, on synthetic data.

The one changed line against train_v2.py is the import of PartialFC_V2 and CombinedMarginLoss.
Everything else is insightface's structure: a backbone under DDP, the head sharded over the ranks,
SGD over both with insightface's polynomial learning rate and linear warm-up, per-rank
checkpoints ``checkpoint_gpu_{rank}.pt`` holding backbone, softmax-fc shard, optimizer and
scheduler. Unlike insightface, resuming also works at another world size: the head's shards and
their SGD momentum are gathered (``marginops.distributed.import_insightface(..., momentum=True)``)
and re-split.

``--head-optimizer exact|lazy``: the head's SGD runs in its backward (marginops.optim.SGD: no
[C, D] gradient; under Partial FC only the sampled rows are touched, "exact" catching up the
others' momentum and weight decay so that the run equals the dense one), the backbone keeps
torch's SGD, and the head is checkpointed with marginops.distributed.save_sharded under
``head/``: its momentum is resharded with it at another world size.

CPU, two processes (gloo)::

    torchrun --standalone --nproc_per_node=2 examples/insightface_train.py --steps 20 --output /tmp/run
    torchrun --standalone --nproc_per_node=1 examples/insightface_train.py --steps 30 --output /tmp/run --resume
    torchrun --standalone --nproc_per_node=2 examples/insightface_train.py --head-optimizer exact ...
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from marginops import distributed as mdist
from marginops import optim
from marginops.insightface import CombinedMarginLoss, PartialFC_V2  # the one changed line


class PolynomialLRWarmup(torch.optim.lr_scheduler.LambdaLR):
    """insightface's PolyScheduler: linear warm-up to the base rate over warmup_steps, then
    base · (1 − (step − warmup) / (total − warmup))²."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, power: float = 2.0, last_epoch: int = -1):
        def factor(step: int) -> float:
            if step < warmup_steps:
                return step / max(1, warmup_steps)
            return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)) ** power

        super().__init__(optimizer, factor, last_epoch=last_epoch)


def backbone(input_size: int, embedding_size: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(input_size, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.PReLU(64),
        torch.nn.Linear(64, embedding_size),
    )


def synthetic_batch(step: int, rank: int, batch: int, input_size: int, num_classes: int, centers: torch.Tensor):
    """Samples around fixed class centers: a learnable identity problem."""
    g = torch.Generator().manual_seed(step * 1009 + rank)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    images = centers[labels] + 0.5 * torch.randn(batch, input_size, generator=g)
    return images, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="total steps (a resumed run continues up to it)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--embedding-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=48)
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--output", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--head-optimizer",
        choices=("exact", "lazy"),
        default=None,
        help="the head's SGD in its backward (marginops.optim.SGD, sparse=...); default: torch's SGD over both",
    )
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(args.output, exist_ok=True)

    net = DistributedDataParallel(backbone(args.input_size, args.embedding_size))
    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)  # insightface's ArcFace config
    module_partial_fc = PartialFC_V2(margin_loss, args.embedding_size, args.num_classes, args.sample_rate, False)
    module_partial_fc.train()
    sgd = dict(lr=args.lr, momentum=0.9, weight_decay=5e-4)
    head_opt = None
    if args.head_optimizer is None:
        opt = torch.optim.SGD(params=[{"params": net.parameters()}, {"params": module_partial_fc.parameters()}], **sgd)
    else:
        opt = torch.optim.SGD(net.parameters(), **sgd)
        head_opt = optim.SGD(module_partial_fc, sparse=args.head_optimizer, **sgd)
        if rank == 0:
            print(f"head optimizer: marginops.optim.SGD in the backward, sparse={args.head_optimizer!r}", flush=True)
    lr_scheduler = PolynomialLRWarmup(opt, args.warmup, args.steps)
    head_scheduler = None if head_opt is None else PolynomialLRWarmup(head_opt, args.warmup, args.steps)

    start_step = 0
    if args.resume:
        path = os.path.join(args.output, f"checkpoint_gpu_{rank}.pt")
        saved_world = len([f for f in os.listdir(args.output) if f.startswith("checkpoint_gpu_")])
        ckpt = torch.load(
            os.path.join(args.output, "checkpoint_gpu_0.pt" if not os.path.exists(path) else path), weights_only=False
        )
        start_step = ckpt["global_step"]
        net.module.load_state_dict(ckpt["state_dict_backbone"])
        if head_opt is not None:  # the head and its momentum, resharded to this world size
            mdist.load_sharded(module_partial_fc, os.path.join(args.output, "head"))
            opt.load_state_dict(ckpt["state_optimizer"])
            head_scheduler.load_state_dict(ckpt["state_lr_scheduler"])
        elif saved_world == world:  # insightface's resume: every rank its own file
            module_partial_fc.load_state_dict(ckpt["state_dict_softmax_fc"])
            opt.load_state_dict(ckpt["state_optimizer"])
        else:  # another world size: gather the head's shards and re-split them
            whole, momentum = mdist.import_insightface(args.output, momentum=True)
            module_partial_fc.load_state_dict({"weight": mdist.split(whole, world)[rank].clone()})
            state = opt.state_dict()
            head_index = len(list(net.parameters()))  # the head's weight follows the backbone's parameters
            for i, saved in ckpt["state_optimizer"]["state"].items():  # momentum of the backbone's parameters
                if i < head_index:
                    state["state"][i] = saved
            state["state"][head_index] = {"momentum_buffer": mdist.split(momentum, world)[rank].clone()}
            opt.load_state_dict(state)
        lr_scheduler.load_state_dict(ckpt["state_lr_scheduler"])
        if rank == 0:
            print(f"resumed at step {start_step} from a world size of {saved_world} on {world}", flush=True)
        dist.barrier()  # every rank has read the files before any overwrites them

    centers = torch.randn(args.num_classes, args.input_size, generator=torch.Generator().manual_seed(1)) * 2
    for global_step in range(start_step, args.steps):
        img, local_labels = synthetic_batch(global_step, rank, args.batch, args.input_size, args.num_classes, centers)
        local_embeddings = net(img)
        loss = module_partial_fc(local_embeddings, local_labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5)
        opt.step()
        lr_scheduler.step()
        if head_opt is not None:
            head_opt.step()
            head_scheduler.step()
        if rank == 0:
            print(f"step {global_step + 1} loss {loss.item():.4f} lr {lr_scheduler.get_last_lr()[0]:.4f}", flush=True)
        if (global_step + 1) % args.save_every == 0 or global_step + 1 == args.steps:
            dist.barrier()
            if rank == 0:  # a checkpoint of another world size must not linger
                for f in os.listdir(args.output):
                    if f.startswith("checkpoint_gpu_") and int(f.split("_")[-1].split(".")[0]) >= world:
                        os.remove(os.path.join(args.output, f))
            checkpoint = {
                "global_step": global_step + 1,
                "state_dict_backbone": net.module.state_dict(),
                "state_dict_softmax_fc": module_partial_fc.state_dict(),
                "state_optimizer": opt.state_dict(),
                "state_lr_scheduler": lr_scheduler.state_dict(),
            }
            torch.save(checkpoint, os.path.join(args.output, f"checkpoint_gpu_{rank}.pt"))
            if head_opt is not None:
                mdist.save_sharded(module_partial_fc, os.path.join(args.output, "head"))
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
