"""marginops.optim: the head's optimizer in its backward equals torch.optim on the same gradients
(float64), dense and row-sparse under Partial FC, and never sees a [C, D] gradient."""

import json

import pytest
import torch

import marginops as mo
from marginops import distributed as mdist
from marginops import ops, optim

f64 = torch.float64
B, D, C = 12, 6, 50
# 7 classes per chunk of the backward: 50 classes cross eight chunks, the last one partial
SMALL_WORKSPACE = D * 8 * 3 * 7


def twin_heads(make_head):
    """Two heads with the same weights: one trained by marginops.optim, one by torch.optim."""
    torch.manual_seed(0)
    ours, theirs = make_head(), make_head()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def train(head, optimizer, scheduler, batches):
    losses = []
    for x, y in batches:
        x = x.clone().requires_grad_()
        loss = head(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append((loss.detach(), x.grad))
    return losses


def batches(steps=5, classes=C, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, D, generator=g, dtype=f64), torch.randint(0, classes, (B,), generator=g)) for _ in range(steps)
    ]


OPTIMIZERS = {
    "sgd-momentum-wd": (dict(lr=0.1, momentum=0.9, weight_decay=5e-4), "SGD"),
    "sgd-nesterov": (dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), "SGD"),
    "sgd-dampening": (dict(lr=0.05, momentum=0.8, dampening=0.3), "SGD"),
    "sgd-plain": (dict(lr=0.2), "SGD"),
    "adamw": (dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05), "AdamW"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("margin", [mo.ArcFace(s=16.0), mo.SubCenterArcFace(K=3, s=16.0)], ids=["arcface", "subcenter"])
def test_equals_torch_optim_on_the_same_gradients(name, margin):
    kwargs, kind = OPTIMIZERS[name]

    def make():
        return mo.MarginHead(D, C, margin, bias=True, label_smoothing=0.1, workspace_bytes=SMALL_WORKSPACE, dtype=f64)

    ours, theirs = twin_heads(make)
    opt_ours = getattr(optim, kind)(ours, **kwargs)
    opt_theirs = getattr(torch.optim, kind)(theirs.parameters(), **kwargs)
    sched = [torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in (opt_ours, opt_theirs)]
    data = batches()
    for (l1, dx1), (l2, dx2) in zip(train(ours, opt_ours, sched[0], data), train(theirs, opt_theirs, sched[1], data)):
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx1, dx2, rtol=1e-10, atol=1e-13)
    for p, q in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-14)
        assert p.grad is None, "no gradient is kept"
    assert opt_ours.param_groups[0]["lr"] == opt_theirs.param_groups[0]["lr"] == kwargs["lr"] * 0.25
    keys = ("exp_avg", "exp_avg_sq") if kind == "AdamW" else ("momentum_buffer",) if kwargs.get("momentum") else ()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        for key in keys:
            torch.testing.assert_close(opt_ours.state[p][key], opt_theirs.state[q][key], rtol=1e-11, atol=1e-16)


def test_the_backward_never_holds_more_than_a_chunk_of_dW(monkeypatch):
    """Every ∂L/∂W the backward sees is one chunk of classes; the weight's .grad stays None."""
    seen = []
    real = ops._ops.margin_ce_backward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[1].shape[0])
        return out

    monkeypatch.setattr(ops._ops, "margin_ce_backward", spy)
    head = mo.MarginHead(D, C, mo.CosFace(), workspace_bytes=SMALL_WORKSPACE, dtype=f64)
    optim.SGD(head, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    head(x, y).backward()
    assert seen == [7] * 7 + [1], seen
    assert head.weight.grad is None


def sampled_heads(**kwargs):
    def make():
        return mdist.ShardedMarginHead(
            D, C, mo.ArcFace(s=16.0), sample_rate=0.3, seed=3, workspace_bytes=SMALL_WORKSPACE, dtype=f64, **kwargs
        )  # 15 sampled classes: three chunks in the backward

    return twin_heads(make)


@pytest.mark.parametrize("history", [optim.HISTORY_STEPS, 2], ids=["history", "flushed"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_exact_row_sparse_sgd_equals_dense_sgd(one_rank, nesterov, history, monkeypatch):
    """Partial FC with sparse="exact": only sampled rows are read and written each step, yet the
    weights equal torch.optim.SGD's on the dense gradient (zero on unsampled rows). With a history
    of 2 steps, every row is caught up whenever 3 are pending and the history starts anew."""
    monkeypatch.setattr(optim, "HISTORY_STEPS", history)
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    ours, theirs = sampled_heads(bias=True)
    opt_ours = optim.SGD(ours, sparse="exact", **kwargs)
    opt_theirs = torch.optim.SGD(theirs.parameters(), **kwargs)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (opt_ours, opt_theirs)]
    data = batches(6)
    stale = 0
    for x, y in data:
        train(ours, opt_ours, sched[0], [(x, y)])
        train(theirs, opt_theirs, sched[1], [(x, y)])
        assert torch.equal(ours.last_sample, theirs.last_sample)
        sample = ours.last_sample
        torch.testing.assert_close(ours.weight[sample], theirs.weight[sample], rtol=1e-11, atol=1e-14)
        stale += int((ours.weight != theirs.weight).any(dim=1).sum())
    assert stale > 0, "unsampled rows are not touched until they are read"
    ours.eval()  # an evaluation forward reads every row: each is caught up first
    with torch.no_grad():
        ours(data[0][0], data[0][1])
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(ours.bias, theirs.bias, rtol=1e-11, atol=1e-14)
    buf = opt_theirs.state[theirs.weight]["momentum_buffer"]
    torch.testing.assert_close(opt_ours.state[ours.weight]["momentum_buffer"], buf, rtol=1e-11, atol=1e-14)


def test_exact_sgd_on_a_dense_head_keeps_no_history():
    """sparse="exact" on a head that reads every row each step: every row is up to date before
    each forward, so the history of hyperparameters starts anew each step instead of growing."""
    head = mo.MarginHead(D, C, mo.CosFace(s=16.0), dtype=f64)
    opt = optim.SGD(head, lr=0.1, momentum=0.9, sparse="exact")
    train(head, opt, None, batches(5))
    assert len(opt.state[head.weight]["history"]) == 1 and opt.state[head.weight]["history_start"] == 4


def test_lazy_row_sparse_sgd_touches_only_sampled_rows(one_rank):
    """sparse="lazy" (Partial FC v1's sub-weight optimizer): a sampled row gets torch's SGD step
    on its gradient and its own momentum; the other rows and their momentum do not change."""
    lr, mu, wd = 0.1, 0.9, 0.01
    ours, dense = sampled_heads()
    opt = optim.SGD(ours, lr=lr, momentum=mu, weight_decay=wd)  # lazy is the default
    w, buf = dense.weight.detach().clone(), torch.zeros(C, D, dtype=f64)
    for step, (x, y) in enumerate(batches(5), start=1):
        train(ours, opt, None, [(x, y)])
        dense.weight.data.copy_(w)  # the gradient at the formula's weights, from the plain head
        dense.zero_grad()
        dense(x, y).backward()
        rows = dense.last_sample
        assert torch.equal(rows, ours.last_sample)
        g = dense.weight.grad[rows] + wd * w[rows]
        buf[rows] = g if step == 1 else mu * buf[rows] + g
        w[rows] -= lr * buf[rows]
        torch.testing.assert_close(ours.weight, w, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(opt.state[ours.weight]["momentum_buffer"], buf, rtol=1e-11, atol=1e-14)


def test_bfloat16_state_stays_close_to_float32_state():
    def make():
        return mo.MarginHead(D, C, mo.ArcFace(s=16.0), workspace_bytes=SMALL_WORKSPACE)

    torch.manual_seed(0)
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    opt_a = optim.SGD(a, lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    opt_b = optim.SGD(b, lr=0.1, momentum=0.9)
    data = [(x.float(), y) for x, y in batches(4)]
    train(a, opt_a, None, data)
    train(b, opt_b, None, data)
    assert opt_a.state[a.weight]["momentum_buffer"].dtype == torch.bfloat16
    assert a.weight.dtype == torch.float32
    change = (b.weight - make().weight).norm()
    assert (a.weight - b.weight).norm() <= 2e-2 * change
    momentum = opt_b.state[b.weight]["momentum_buffer"]
    rel = (opt_a.state[a.weight]["momentum_buffer"].float() - momentum).norm() / momentum.norm()
    assert rel <= 1e-2, rel


def test_state_dict_round_trip_continues_the_same_steps():
    def make():
        return mo.MarginHead(D, C, mo.CosFace(), dtype=f64)

    data = batches(6)
    one, two = twin_heads(make)
    opt_one = optim.AdamW(one, lr=1e-2)
    train(one, opt_one, None, data)
    opt_two = optim.AdamW(two, lr=1e-2)
    train(two, opt_two, None, data[:3])
    saved_head, saved_opt = two.state_dict(), opt_two.state_dict()
    three = make()
    three.load_state_dict(saved_head)
    opt_three = optim.AdamW(three, lr=1e-2)
    opt_three.load_state_dict(saved_opt)
    train(three, opt_three, None, data[3:])
    torch.testing.assert_close(three.weight, one.weight, rtol=0, atol=0)


def test_combinations_that_cannot_work_are_refused():
    head = mo.MarginHead(D, C, mo.CosFace(), dtype=f64)
    opt = optim.SGD(head, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    head(x, y).backward()
    with pytest.raises(RuntimeError, match="a second backward through the head before optimizer.step"):
        head(x, y).backward()
    opt.step()
    head(x, y).backward()  # fine after step()
    with pytest.raises(RuntimeError, match="SGD was given a head's weight that marginops.optim.SGD updates"):
        torch.optim.SGD(head.parameters(), lr=0.1).step()
    with pytest.raises(ValueError, match="already has an optimizer"):
        optim.AdamW(head)
    with pytest.raises(ValueError, match='sparse="exact" is SGD'):
        optim.AdamW(mo.MarginHead(D, C), sparse="exact")
    with pytest.raises(ValueError, match="sparse must be one of"):
        optim.SGD(mo.MarginHead(D, C), sparse="dense")
    with pytest.raises(ValueError, match="WeightedMarginHead cannot run an optimizer in its backward"):
        optim.SGD(mo.WeightedMarginHead(D, C, [(mo.CosFace(), 1.0)]))
    with pytest.raises(ValueError, match="master weights"):
        optim.SGD(mo.MarginHead(D, C, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        optim.SGD(mo.MarginHead(D, C), nesterov=True)
    for make, name, value in (
        (optim.SGD, "lr", float("nan")),
        (optim.SGD, "momentum", -0.9),
        (optim.AdamW, "eps", "1e-8"),
        (optim.AdamW, "weight_decay", True),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a non-negative number, got {value!r}"):
            make(mo.MarginHead(D, C), **{name: value})
    accumulating = mo.MarginHead(D, C, mo.CosFace(), dtype=f64)
    optim.SGD(accumulating, lr=0.1, accumulate=True)
    accumulating(x, y).backward()
    accumulating(x, y).backward()  # each backward is its own step


def test_a_backward_with_create_graph_is_refused_before_the_step():
    """create_graph=True through a head whose backward runs its optimizer: refused at once with the
    first-order message, the weights and the optimizer state untouched (it used to update them and
    return gradients whose own backward failed with torch's missing-autograd error)."""
    head = mo.MarginHead(D, C, mo.ArcFace(s=16.0), bias=True, dtype=f64)
    opt = optim.SGD(head, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    x = x.clone().requires_grad_()
    before = head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="first-order gradients only: .*, so a backward with create_graph=True"):
        torch.autograd.grad(head(x, y), x, create_graph=True)
    assert torch.equal(head.weight, before) and int(opt.state[head.weight]["step"]) == 0
    head(x, y).backward()  # a plain backward still steps
    assert not torch.equal(head.weight, before)


# -- checkpoints: the optimizer state sharded like the weight, resumed at another world size ----------

RESUME_B = 8  # the global batch of each step, split evenly over the ranks


def _step_data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(RESUME_B, D, generator=g, dtype=f64), torch.randint(0, C, (RESUME_B,), generator=g)


def _make_optimizer(kind, head):
    if kind == "SGD":
        return optim.SGD(head, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    return optim.AdamW(head, lr=1e-2, weight_decay=0.05)


def _train_and_save(rank, world, kind, load_from, steps, save_to, backend=None):
    if backend is not None:  # an emulated CUDA backend runs the chunks (1 chunked, 2 tiles)
        from helpers import Emulated, load_emulation

        optim._op = EmulatedOps(Emulated(load_emulation()), backend)
    head = mdist.ShardedMarginHead(D, C, mo.ArcFace(s=16.0), bias=True, dtype=f64)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        head.weight.copy_(mdist.split(torch.randn(C, D, generator=g, dtype=f64), world)[rank])
    opt = _make_optimizer(kind, head)
    if load_from is not None:
        mdist.load_sharded(head, load_from)
        assert int(opt.state[head.weight]["step"]) == steps[0]
    per = RESUME_B // world
    for step in steps:
        x, y = _step_data(step)
        head(x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]).backward()
        opt.step()
    mdist.save_sharded(head, save_to)


@pytest.mark.parametrize(
    "kind, backend",
    [("SGD", None), ("AdamW", None), ("SGD", 1), ("AdamW", 2)],
    ids=["sgd", "adamw", "sgd-chunked-emulated", "adamw-tiles-emulated"],
)
def test_resume_on_another_world_size_continues_the_run(tmp_path, kind, backend, emu):
    """2 ranks -> 1 and 1 -> 2, two steps before and two after: the weights and the optimizer
    state equal a run on one rank that did not stop (float64; the ranks' partial sums round
    differently, hence 1e-12 rather than bit-equality), on the CPU op and on the emulated CUDA
    backends (the uninterrupted run on the CPU op)."""
    from helpers import spawn

    spawn(_train_and_save, 1, kind, None, [0, 1, 2, 3], str(tmp_path / "straight"))
    for first, second in ((2, 1), (1, 2)):
        half, done = tmp_path / f"{first}-half", tmp_path / f"{first}-to-{second}"
        spawn(_train_and_save, first, kind, None, [0, 1], str(half), backend)
        spawn(_train_and_save, second, kind, str(half), [2, 3], str(done), backend)
        want, got = mdist.consolidate(tmp_path / "straight"), mdist.consolidate(done)
        assert got["optimizer"]["step"] == want["optimizer"]["step"] == 4
        for part in ("weight", "bias"):
            torch.testing.assert_close(got[part], want[part], rtol=1e-12, atol=1e-15)
            for name, value in want["optimizer"][part].items():
                torch.testing.assert_close(got["optimizer"][part][name], value, rtol=1e-12, atol=1e-15)


def test_load_restores_the_saved_optimizer_rows_exactly(tmp_path, one_rank):
    head = mdist.ShardedMarginHead(D, C, mo.CosFace(), bias=True, dtype=f64)
    opt = optim.SGD(head, lr=0.1, momentum=0.9, sparse="exact")
    train(head, opt, None, batches(2))
    mdist.save_sharded(head, tmp_path / "ckpt")
    saved = mdist.consolidate(tmp_path / "ckpt")["optimizer"]
    twin = mdist.ShardedMarginHead(D, C, mo.CosFace(), bias=True, dtype=f64)
    twin_opt = optim.SGD(twin, lr=0.5, momentum=0.9, sparse="exact")
    mdist.load_sharded(twin, tmp_path / "ckpt")
    assert twin_opt.param_groups[0]["lr"] == 0.1 and int(twin_opt.state[twin.weight]["step"]) == 2
    for name, value in saved["weight"].items():
        assert torch.equal(twin_opt.state[twin.weight][name], value), name
    assert twin_opt.state[twin.weight]["history"] == opt.state[head.weight]["history"]
    with pytest.raises(ValueError, match="holds \\[\\('SGD', 'exact'\\)\\] optimizer state, but the head's is"):
        other = mdist.ShardedMarginHead(D, C, mo.CosFace(), bias=True, dtype=f64)
        optim.AdamW(other)
        mdist.load_sharded(other, tmp_path / "ckpt")
    plain = mdist.ShardedMarginHead(D, C, mo.CosFace(), bias=True, dtype=f64)
    mdist.load_sharded(plain, tmp_path / "ckpt")  # a head without an optimizer takes the weights alone
    assert torch.equal(plain.weight, head.weight)


def test_damaged_optimizer_rows_in_a_shard_are_refused(tmp_path, one_rank):
    """A shard whose optimizer state lacks the bias's rows, or names other state for them, is a
    ValueError naming the file, from load_sharded and consolidate, and the head is unchanged."""
    head = mdist.ShardedMarginHead(D, C, mo.CosFace(), bias=True, dtype=f64)
    train(head, optim.SGD(head, lr=0.1, momentum=0.9), None, batches(1))
    mdist.save_sharded(head, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    del meta["shards"]  # no checksums: the shard's contents are what is checked
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    path = tmp_path / "ckpt" / "shard-00000-of-00001.pt"
    good = torch.load(path, weights_only=True)
    for damage in ({"bias": None}, {"bias": {"exp_avg": good["optimizer"]["bias"]["momentum_buffer"]}}):
        torch.save({**good, "optimizer": {**good["optimizer"], **damage}}, path)
        twin = mdist.ShardedMarginHead(D, C, mo.CosFace(), bias=True, dtype=f64)
        optim.SGD(twin, lr=0.1, momentum=0.9)
        before = twin.weight.detach().clone()
        for load in (mdist.load_sharded, lambda _, directory: mdist.consolidate(directory)):
            with pytest.warns(UserWarning, match="records no checksums"):
                with pytest.raises(ValueError, match=f"{path.name} does not match meta.json: optimizer state"):
                    load(twin, tmp_path / "ckpt")
        assert torch.equal(twin.weight, before)


def test_a_compiled_head_runs_its_optimizer():
    """torch.compile (without fullgraph) of a head with an optimizer in its backward equals eager."""

    def make():
        return mo.MarginHead(D, C, mo.ArcFace(s=16.0), dtype=f64)

    compiled, eager = twin_heads(make)
    opts = [optim.SGD(h, lr=0.1, momentum=0.9) for h in (compiled, eager)]
    step = torch.compile(lambda x, y: compiled(x, y))
    for x, y in batches(3):
        losses = []
        for fn, opt in ((step, opts[0]), (eager, opts[1])):
            loss = fn(x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled.weight, eager.weight, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("kind", ["sgd-momentum", "sgd-exact", "adamw"])
def test_a_fullgraph_compiled_head_runs_its_optimizer_without_recompiling(kind, backend):
    """torch.compile(fullgraph=True) of a head with an optimizer in its backward equals eager over
    three steps whose LR a scheduler changes (the LR is read when the backward runs), in one graph
    without a recompile; also with aot_eager, whose ops are given copies of the weights."""
    kwargs, name = {
        "sgd-momentum": (dict(lr=0.1, momentum=0.9, weight_decay=5e-4), "SGD"),
        "sgd-exact": (dict(lr=0.1, momentum=0.9, sparse="exact"), "SGD"),
        "adamw": (dict(lr=1e-2, weight_decay=0.05), "AdamW"),
    }[kind]

    def make():
        return mo.MarginHead(D, C, mo.ArcFace(s=16.0), bias=True, workspace_bytes=SMALL_WORKSPACE, dtype=f64)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, eager = twin_heads(make)
    opts = [getattr(optim, name)(h, **kwargs) for h in (compiled, eager)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in opts]
    step = torch.compile(lambda x, y: compiled(x, y), fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        results = [train(fn, opt, sched, batches(3)) for fn, opt, sched in zip((step, eager), opts, scheds)]
    for (l1, dx1), (l2, dx2) in zip(*results):
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
        torch.testing.assert_close(dx1, dx2, rtol=1e-12, atol=1e-15)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
        for key, value in opts[1].state[q].items():  # momentum or moments, step (and "exact"'s history)
            if torch.is_tensor(value):
                torch.testing.assert_close(opts[0].state[p][key], value, rtol=1e-12, atol=1e-15)
            else:
                assert opts[0].state[p][key] == value, key
    assert opts[0].param_groups[0]["lr"] == kwargs["lr"] / 8
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(opts[0].state) == 2, "no state left under a copy of the weights"


def test_a_compiled_sampled_head_catches_up_its_rows(one_rank):
    """A sharded head under Partial FC with sparse="exact", compiled (it has graph breaks of its
    own: the header's checks), equals eager over steps whose LR changes: the catch-up before the
    forward runs when the forward runs, with the history of that moment."""
    compiled, eager = sampled_heads(bias=True)
    opts = [optim.SGD(h, lr=0.1, momentum=0.9, weight_decay=0.01, sparse="exact") for h in (compiled, eager)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in opts]
    step = torch.compile(lambda x, y: compiled(x, y))
    for (l1, dx1), (l2, dx2) in zip(*[train(f, o, s, batches(4)) for f, o, s in zip((step, eager), opts, scheds)]):
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
        torch.testing.assert_close(dx1, dx2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(compiled.weight, eager.weight, rtol=1e-12, atol=1e-15)


class EmulatedOps:
    """The CUDA entry points built for the CPU emulation (tests/cuda_emu) behind the registered
    ops' keyword interface, with one backend (1 chunked, 2 tiles)."""

    def __init__(self, emu, backend):
        self.emu, self.backend = emu, backend

    def margin_ce_forward(self, *args, **kwargs):
        bound = ops._bind(ops._ops.margin_ce_forward, args, kwargs)
        return self.emu.forward_any(*{**bound, "backend": self.backend}.values())

    def margin_ce_backward(self, *args, **kwargs):
        bound = ops._bind(ops._ops.margin_ce_backward, args, kwargs)
        return self.emu.backward_any(*{**bound, "backend": self.backend}.values())

    def __getattr__(self, name):  # the optimizers' row kernels (sgd_step_, ...): one launch per call
        kernel = getattr(self.emu.ext, name)

        def launch(*args):
            before = self.emu.ext.launches()
            kernel(*args)
            assert self.emu.ext.launches() - before == 1, f"{name} took more than one kernel"

        return launch


@pytest.mark.parametrize("backend", [1, 2], ids=["chunked", "tiles"])
def test_the_emulated_cuda_backends_run_the_optimizer(emu, backend, monkeypatch, one_rank):
    """The chunk loop on both CUDA backends' code (CPU emulation: each chunk's dW, then the step
    kernel): dense SGD (Nesterov, weight decay) and AdamW, and SGD under Partial FC (exact); the
    weights and the optimizer state equal torch.optim's over the CPU op's dense gradients
    (float64)."""
    sgd, adamw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True), dict(lr=0.01, weight_decay=0.05)
    dense = lambda: mo.MarginHead(D, C, mo.ArcFace(s=16.0), bias=True, workspace_bytes=SMALL_WORKSPACE, dtype=f64)  # noqa: E731
    sampled = lambda: mdist.ShardedMarginHead(  # noqa: E731
        D, C, mo.CosFace(s=16.0), sample_rate=0.3, seed=3, workspace_bytes=SMALL_WORKSPACE, dtype=f64
    )
    for make, kind, kwargs, sparse in (
        (dense, "SGD", sgd, "exact"),
        (dense, "AdamW", adamw, "lazy"),
        (sampled, "SGD", sgd, "exact"),
    ):
        ours, theirs = twin_heads(make)
        opt_ours = getattr(optim, kind)(ours, sparse=sparse, **kwargs)
        opt_theirs = getattr(torch.optim, kind)(theirs.parameters(), **kwargs)
        data = batches(3)
        launches = emu.launches()
        with monkeypatch.context() as m:
            m.setattr(optim, "_op", EmulatedOps(emu, backend))
            train(ours, opt_ours, None, data)
            ours.eval()
            with torch.no_grad():
                ours(*data[0])  # catches every row up
        assert emu.launches() > launches, "the emulated kernels ran"
        train(theirs, opt_theirs, None, data)
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-10, atol=1e-13)
        for name in ("exp_avg", "exp_avg_sq") if kind == "AdamW" else ("momentum_buffer",):
            got, want = opt_ours.state[ours.weight][name], opt_theirs.state[theirs.weight][name]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_stochastic_rounding_is_unbiased_and_trains_bfloat16_weights():
    """A bfloat16 weight of 1 that an SGD step moves a quarter of a spacing up ends at 1 + 2^-7 a
    quarter of the time (round-to-nearest would always give 1: an update that small would be
    lost), whatever the chunking; a head with bfloat16 weights and stochastic rounding follows
    the float32 head's losses."""
    step = torch.ops.marginops.sgd_step_
    w = torch.ones(2000, 100, dtype=torch.bfloat16)
    w[0, :2] = torch.tensor([float("inf"), -1.5])
    grad = torch.full((2000, 100), -0.25 * 2**-7)
    grad[0, :2] = 0.0
    step(w, None, grad, None, 0, 1.0, 0.0, 0.0, 0.0, False, True, 12345)
    rounded = w.float()[1:]
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(rounded.mean()) - (1.0 + 0.25 * 2**-7)) < 3e-5  # 5 standard errors of the mean
    assert w[0, 0] == float("inf") and w[0, 1] == -1.5
    halves = torch.ones(2000, 100, dtype=torch.bfloat16)
    for first in (0, 1000):  # the noise is a function of the seed and the element: chunks do not matter
        step(halves, None, grad[first : first + 1000], None, first, 1.0, 0.0, 0.0, 0.0, False, True, 12345)
    assert torch.equal(halves[1:], w[1:])

    def make(dtype):
        torch.manual_seed(0)
        return mo.MarginHead(D, C, mo.CosFace(s=16.0), dtype=dtype)

    full, low = make(torch.float32), make(torch.bfloat16)
    with torch.no_grad():
        low.weight.copy_(full.weight)
    opts = [optim.SGD(full, lr=0.5, momentum=0.9), optim.SGD(low, lr=0.5, momentum=0.9, stochastic_rounding=True)]
    data = batches(8)
    curves = [
        torch.stack([l for l, _ in train(h, o, None, [(x.to(h.weight.dtype), y) for x, y in data])]).float()
        for h, o in zip((full, low), opts)
    ]
    assert low.weight.dtype == torch.bfloat16 and curves[1][-1] < curves[1][0]
    assert (curves[1] - curves[0]).abs().max() <= 0.05 * curves[0].abs().max(), curves


ROW_HYPER = {
    "sgd": dict(lr=0.3, momentum=0.9, dampening=0.1, weight_decay=0.05),
    "nesterov": dict(lr=0.3, momentum=0.9, weight_decay=0.05, nesterov=True),
    "adamw": dict(lr=0.3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
}


@pytest.mark.parametrize("where", ["cpu", "emulated-cuda"])
@pytest.mark.parametrize(
    "dtype, state_dtype",
    [(f64, f64), (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (f64, torch.float32)],
    ids=["f64", "f32", "f32-bf16-state", "f64-f32-state"],
)
@pytest.mark.parametrize("kind", list(ROW_HYPER))
def test_the_row_kernels_equal_torch_optim(request, where, dtype, state_dtype, kind):
    """Three steps of a row kernel on gathered rows [7, 2, 5] and on the slice [3, 6) of a [9, 33]
    weight and a [9] bias equal torch.optim's steps on those rows alone, its state rounded to the
    kernel's state dtype after each step (the kernel updates with the unrounded state, as torch
    does within a step); the other rows are untouched. 33 columns cross a block of threads."""
    row_ops = torch.ops.marginops if where == "cpu" else request.getfixturevalue("emu").ext
    hyper = ROW_HYPER[kind]
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == f64 else dict(rtol=2e-6, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    for shape in ((9, 33), (9,)):
        for rows in (torch.tensor([7, 2, 5]), slice(3, 6)):
            param = torch.randn(shape, generator=g, dtype=f64).to(dtype)
            states = [torch.randn(shape, generator=g).abs().to(state_dtype) for _ in range(2 if kind == "adamw" else 1)]
            before = param.clone()
            ref = param[rows].clone().requires_grad_(True)
            opt = (torch.optim.AdamW if kind == "adamw" else torch.optim.SGD)([ref], **hyper)
            for step in (1, 2, 3):
                grad = torch.randn((3,) + shape[1:], generator=g, dtype=f64).to(dtype)
                index, first = (rows, 0) if isinstance(rows, torch.Tensor) else (None, rows.start)
                if kind == "adamw":
                    if step == 1:  # torch's moments start at zero
                        for s in states:
                            s[rows] = 0
                    args = (hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"], step, 0)
                    row_ops.adamw_step_(param, states[0], states[1], grad, index, first, *args)
                else:
                    args = [hyper.get(k, 0.0) for k in ("lr", "momentum", "dampening", "weight_decay")]
                    nesterov = hyper.get("nesterov", False)
                    row_ops.sgd_step_(param, states[0], grad, index, first, *args, nesterov, step == 1, 0)
                ref.grad = grad.clone()
                opt.step()
                for name in ("exp_avg", "exp_avg_sq") if kind == "adamw" else ("momentum_buffer",):
                    opt.state[ref][name].copy_(opt.state[ref][name].to(state_dtype))
                torch.testing.assert_close(param[rows], ref.detach(), **tol)
                names = ("exp_avg", "exp_avg_sq") if kind == "adamw" else ("momentum_buffer",)
                for s, name in zip(states, names):
                    torch.testing.assert_close(s[rows].to(dtype), opt.state[ref][name], **tol)
            untouched = torch.ones(shape[0], dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(param[untouched], before[untouched])


def test_the_row_kernels_check_their_arguments():
    w, buf, g = torch.zeros(5, 3, dtype=f64), torch.zeros(5, 3, dtype=f64), torch.zeros(2, 3, dtype=f64)
    step = torch.ops.marginops.sgd_step_
    hyper = (0.1, 0.9, 0.0, 0.0, False, False, 0)
    with pytest.raises(ValueError, match=r"rows\[1\] = 5 is not a row of param \(5 rows\)"):
        step(w, buf, g, torch.tensor([0, 5]), 0, *hyper)
    with pytest.raises(ValueError, match=r"rows \[4, 6\) are not rows of param \(5 rows\)"):
        step(w, buf, g, None, 4, *hyper)
    with pytest.raises(ValueError, match="the optimizer state must be a contiguous tensor like param"):
        step(w, buf[:, :2], g, None, 0, *hyper)
    with pytest.raises(
        ValueError, match="must be stored in param's dtype, float32 or bfloat16, got Double for a Float"
    ):
        step(w.float(), buf, g.float(), None, 0, *hyper)
    with pytest.raises(ValueError, match=r"grad must be a contiguous \[n, D\] tensor of Double"):
        step(w, buf, g.float(), None, 0, *hyper)
    with pytest.raises(ValueError, match="coef must be a contiguous float64"):
        torch.ops.marginops.sgd_catch_up_(w, buf, torch.tensor([0, 1]), torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="step must count from 1, got 0"):
        torch.ops.marginops.adamw_step_(w, buf, buf.clone(), g, None, 0, 0.1, 0.9, 0.999, 1e-8, 0.0, 0, 0)
    step(w, buf, g + 1.0, torch.tensor([1, 3]), 0, 0.5, 0.9, 0.0, 0.0, False, True, 0)  # first step: buf = g
    want = torch.zeros(5, 3, dtype=f64)
    want[[1, 3]] = -0.5
    assert torch.equal(w, want) and torch.equal(buf, -2 * want)


def test_a_head_with_an_optimizer_pickles_and_copies_without_it(tmp_path):
    import copy

    head = mo.MarginHead(D, C, mo.CosFace(), dtype=f64)
    optim.SGD(head, lr=0.1, momentum=0.9)
    torch.save(head, tmp_path / "head.pt")
    loaded = torch.load(tmp_path / "head.pt", weights_only=False)
    twin = copy.deepcopy(head)
    for other in (loaded, twin):
        assert other.optimizer is None and torch.equal(other.weight, head.weight)
        torch.optim.SGD(other.parameters(), lr=0.1).step()  # a torch optimizer may take the copy's weights
    assert head.optimizer is not None
