"""Optimizers that a head's backward runs: ``SGD`` and ``AdamW`` update the class weights chunk
by chunk as the backward produces ∂L/∂W, so the [C, D] gradient is never allocated. They are
torch.optim.Optimizers over the head's weight (and bias) with torch's semantics and defaults
(docs/design.md, "Training state")."""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import List, Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import ops
from .ops import HeadStats

SPARSE = ("lazy", "exact")
# sparse="exact" keeps each step's hyperparameters until every row has caught up past them; past
# this many, the next forward catches up every row (one dense pass) and the history starts anew.
HISTORY_STEPS = 1024
STATE_DTYPES = (None, torch.float32, torch.bfloat16)


class _HeadOptimizer(torch.optim.Optimizer):
    """An optimizer of a head's class weights that the head's backward runs. Subclasses name the
    per-row state (``state_names``) and define the row kernel that updates a chunk of rows (``_step_rows``)."""

    state_names: tuple = ()  # per-row state tensors like the parameter, zero at the start

    def __init__(
        self, head, defaults: dict, *, sparse="lazy", state_dtype=None, accumulate=False, stochastic_rounding=False
    ):
        if not isinstance(head, torch.nn.Module) or not hasattr(head, "weight") or not hasattr(head, "options"):
            raise ValueError(f"head must be a marginops head (MarginHead, ShardedMarginHead, ...), got {head!r}")
        if sparse not in SPARSE:
            raise ValueError(f"sparse must be one of {SPARSE}, got {sparse!r}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"state_dtype must be None (the weight's), torch.float32 or torch.bfloat16, got {state_dtype!r}"
            )
        weight_dtypes = (torch.float32, torch.float64) + ((torch.bfloat16,) if stochastic_rounding else ())
        if head.weight.dtype not in weight_dtypes:
            raise ValueError(
                f"the head's weight must be float32 or float64 (master weights), or bfloat16 with "
                f"stochastic_rounding=True (rounding to nearest would drop small updates), got {head.weight.dtype}"
            )
        if getattr(head, "optimizer", None) is not None:
            raise ValueError("the head already has an optimizer in its backward: one per head")
        if getattr(head, "_loss_fn", None) is not None or hasattr(head, "terms"):
            raise ValueError(
                f"{type(head).__name__} cannot run an optimizer in its backward (one fused pass per step is "
                "needed): use MarginHead or ShardedMarginHead, or a torch optimizer on head.parameters()"
            )
        params = [head.weight] + ([head.bias] if head.bias is not None else [])
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("a head optimizer takes one parameter group")
        self.sparse, self.state_dtype, self.accumulate = sparse, state_dtype, bool(accumulate)
        self.stochastic_rounding = bool(stochastic_rounding)
        self._head = weakref.ref(head)
        self._updated = False  # a backward updated the weights since the last step()/zero_grad()
        self._handle = next(_HANDLES)  # how the backward's op (an int argument) finds this optimizer
        _BY_HANDLE[self._handle] = self
        head.optimizer = self
        for p in params:
            self.state[p].update(self._init_state(p))
            _OWNERS[id(p)] = (weakref.ref(p), weakref.ref(self))
        for key in [key for key, (p, _) in _OWNERS.items() if p() is None]:  # parameters gone since
            del _OWNERS[key]

    # -- torch.optim.Optimizer's interface -------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """The backward has applied the update; this finishes the step (or does nothing)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._updated = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._updated = False
        super().zero_grad(set_to_none)

    # -- checkpoints: the rows of a shard -----------------------------------------------------------

    def row_state_names(self) -> tuple:
        """The per-row state tensors, each aligned with its parameter's rows."""
        return tuple(self.state_names) + (("last_step",) if self.sparse == "exact" else ())

    def shard_state(self) -> dict:
        """What a checkpoint shard holds of this optimizer: its kind, hyperparameters, step (and
        sparse="exact"'s history) and, per parameter, the per-row state on the CPU."""
        group, head = self.param_groups[0], self._head()
        state = self.state[head.weight]
        rows = lambda p: {name: self.state[p][name].detach().cpu() for name in self.row_state_names()}  # noqa: E731
        return {
            "kind": type(self).__name__,
            "sparse": self.sparse,
            "hyper": {k: v for k, v in group.items() if k != "params"},
            "step": int(state["step"]),
            "history": list(state.get("history", [])),
            "history_start": int(state.get("history_start", 0)),
            "weight": rows(head.weight),
            "bias": None if head.bias is None else rows(head.bias),
        }

    @torch.no_grad()
    def load_shard_state(self, entry: dict, weight_rows: dict, bias_rows: Optional[dict]) -> None:
        """Restores what shard_state() saved, with each parameter's rows gathered for this head
        (any world size): hyperparameters, step, history and the per-row state."""
        group = self.param_groups[0]
        group.update(entry["hyper"])
        for p, rows in zip(group["params"], (weight_rows, bias_rows)):  # the weight, and the bias if any
            state = self.state[p]
            state["step"] = torch.tensor(float(entry["step"]))
            if "history" in state:
                state["history"] = [tuple(h) for h in entry["history"]]
                state["history_start"] = int(entry.get("history_start", 0))
            for name, value in rows.items():
                state[name][: value.shape[0]].copy_(value)

    # -- what the head's backward calls -----------------------------------------------------------

    def _begin(self) -> dict:
        """One backward's update: refuses a second backward before step() (gradient accumulation
        would need the gradients of both), counts the step, returns the hyperparameters."""
        if self._updated and not self.accumulate:
            raise RuntimeError(
                "a second backward through the head before optimizer.step(): the head's optimizer updates "
                "the weights in each backward, so gradient accumulation over several backward calls would "
                "apply one update per call. Call step() (or zero_grad()) between backward calls, or pass "
                "accumulate=True to apply every backward's gradient as its own step"
            )
        self._updated = True
        group = self.param_groups[0]
        for p in group["params"]:
            self.state[p]["step"] = self.state[p]["step"] + 1
        return group

    def before_forward(self, class_index: Optional[torch.Tensor], subcenters: int) -> None:
        """Before a forward reads the head's rows (all, or those of class_index's classes): brings
        them up to date (sparse="exact"), in one call of the op head_prepare_, which declares the
        weight and bias it updates (torch.compile traces the call, not the catch-up's bookkeeping)."""
        if self.sparse != "exact":  # lazy: nothing to do
            return
        head = self._head()
        with torch.no_grad():
            torch.ops.marginops.head_prepare_(head.weight, head.bias, class_index, subcenters, self._handle)

    def _prepare(self, param: torch.Tensor, rows) -> None:
        """Before the forward reads param[rows] (a slice or an index tensor): bring them up to date."""

    def _apply(self, param: torch.Tensor, rows, grad: torch.Tensor, group: dict) -> None:
        """Updates param[rows] (a slice or an index tensor of rows) and their state from their
        gradient: one pass of the row kernel (csrc/row_step.h), arithmetic in float64 for a
        float64 param, else float32."""
        index, first = (None, rows.start or 0) if isinstance(rows, slice) else (rows, 0)
        arith = torch.float64 if param.dtype == torch.float64 else torch.float32
        self._step_rows(param, index, first, grad.to(arith).contiguous(), group, _seed(param))
        if self.sparse == "exact":  # these rows are up to date
            self.state[param]["last_step"][rows] = int(self.state[param]["step"])

    def _init_state(self, p: torch.Tensor) -> dict:
        state = {"step": torch.zeros((), dtype=torch.float32)}
        for name in self.state_names:
            state[name] = torch.zeros_like(p, dtype=self.state_dtype or p.dtype, memory_format=torch.contiguous_format)
        return state

    def _step_rows(self, param, index, first: int, grad, group: dict, seed: int) -> None:
        raise NotImplementedError


def _check_non_negative(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _seed(param: torch.Tensor) -> int:
    """The stochastic rounding's seed of one kernel call: drawn from torch's CPU generator for a
    bfloat16 param (reproducible under torch.manual_seed), else 0 (unused)."""
    return int(torch.randint(1 << 62, ())) if param.dtype == torch.bfloat16 else 0


class SGD(_HeadOptimizer):
    """SGD with momentum, dampening, Nesterov and weight decay, as torch.optim.SGD, applied to the
    head's weight (and bias) in its backward. Under Partial FC ``sparse="lazy"`` leaves unsampled
    rows and their state alone; ``sparse="exact"`` catches them up in closed form before they are
    read again (the weights equal dense SGD's). ``state_dtype=torch.bfloat16`` keeps the momentum
    in bfloat16; ``stochastic_rounding=True`` allows a bfloat16 weight (float32 arithmetic)."""

    _HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov")  # a history entry, in _step_matrix's order

    @property
    def state_names(self):
        return ("momentum_buffer",) if self.param_groups[0]["momentum"] != 0 else ()

    def __init__(
        self,
        head,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        sparse: str = "lazy",
        state_dtype=None,
        accumulate: bool = False,
        stochastic_rounding: bool = False,
    ):
        _check_non_negative(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(
            head, defaults, sparse=sparse, state_dtype=state_dtype, accumulate=accumulate,
            stochastic_rounding=stochastic_rounding,
        )  # fmt: skip

    def _init_state(self, p):
        state = super()._init_state(p)
        if self.sparse == "exact":  # the step each row is up to date with, and every step's hyperparameters
            state["last_step"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
            state["history"], state["history_start"] = [], 0  # history[i]: step history_start + i + 1
        return state

    def _begin(self) -> dict:
        group = super()._begin()
        if self.sparse == "exact":
            hyper = tuple(group[k] for k in self._HYPER)
            for p in group["params"]:
                self.state[p]["history"].append(hyper)
        return group

    def _step_rows(self, param, index, first, grad, group, seed) -> None:
        state = self.state[param]
        hyper = (group[k] for k in self._HYPER)
        _op.sgd_step_(param, state.get("momentum_buffer"), grad, index, first, *hyper, int(state["step"]) == 1, seed)

    @torch.no_grad()
    def _prepare(self, param, rows) -> None:
        """sparse="exact": rows not updated since step s get steps s+1 … now with a zero gradient
        (weight decay and momentum only), in closed form: (w, buf) is linear in itself."""
        if self.sparse != "exact":
            return
        state = self.state[param]
        now = int(state["step"])
        if len(state["history"]) > HISTORY_STEPS:  # every row up to date, and the history starts anew
            rows = slice(None)
        index = torch.arange(param.shape[0], device=param.device)[rows] if isinstance(rows, slice) else rows
        last = state["last_step"].index_select(0, index)
        stale = last < now
        if bool(stale.any()):
            index, last = index[stale], last[stale]
            starts, inverse = torch.unique(last, return_inverse=True)
            coef = _catch_up_matrices(state["history"], state["history_start"], now, starts.tolist())
            q = torch.tensor(coef, dtype=torch.float64, device=param.device)[inverse]  # [n, 2, 2]
            _op.sgd_catch_up_(param, state.get("momentum_buffer"), index, q.contiguous(), _seed(param))
            state["last_step"].index_copy_(0, index, torch.full_like(index, now))
        if isinstance(rows, slice) and rows == slice(None):  # every row is up to date: the history starts anew
            state["history"], state["history_start"] = [], now


def _step_matrix(t: int, lr: float, mu: float, damp: float, wd: float, nesterov: bool):
    """torch.optim.SGD's step t on one row with a zero gradient, as a matrix on (w, momentum)."""
    if t == 1:  # the buffer starts as the gradient, wd·w
        return ((1.0 - lr * wd * ((1.0 + mu) if nesterov else 1.0), 0.0), (wd, 0.0))
    if nesterov:
        return ((1.0 - lr * wd * (1.0 + mu * (1.0 - damp)), -lr * mu * mu), ((1.0 - damp) * wd, mu))
    return ((1.0 - lr * (1.0 - damp) * wd, -lr * mu), ((1.0 - damp) * wd, mu))


def _catch_up_matrices(history: list, start: int, now: int, starts: List[int]) -> list:
    """For each s in starts (ascending): the product of steps s+1 … now's matrices (history[i]
    holds step start + i + 1's hyperparameters)."""
    out, q, t = {}, ((1.0, 0.0), (0.0, 1.0)), now
    for s in reversed(starts):
        while t > s:
            a = _step_matrix(t, *history[t - 1 - start])
            q = tuple(tuple(q[i][0] * a[0][j] + q[i][1] * a[1][j] for j in range(2)) for i in range(2))
            t -= 1
        out[s] = q
    return [out[s] for s in starts]


class AdamW(_HeadOptimizer):
    """AdamW (decoupled weight decay), as torch.optim.AdamW, applied to the head's weight (and
    bias) in its backward; the bias corrections count the head's steps. ``state_dtype=
    torch.bfloat16`` keeps both moments in bfloat16 (arithmetic in the weight's dtype);
    ``stochastic_rounding=True`` allows a bfloat16 weight (float32 arithmetic, stochastic rounding)."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        head,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        sparse: str = "lazy",
        state_dtype=None,
        accumulate: bool = False,
        stochastic_rounding: bool = False,
    ):
        _check_non_negative(lr=lr, eps=eps, weight_decay=weight_decay)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if sparse == "exact":
            raise ValueError(
                "sparse=\"exact\" is SGD's: AdamW's skipped steps have no closed form (their update divides "
                'by the decayed second moment); use sparse="lazy"'
            )
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(
            head, defaults, sparse=sparse, state_dtype=state_dtype, accumulate=accumulate,
            stochastic_rounding=stochastic_rounding,
        )  # fmt: skip

    def _step_rows(self, param, index, first, grad, group, seed) -> None:
        state = self.state[param]
        (b1, b2), step = group["betas"], int(state["step"])
        hyper = (group["lr"], b1, b2, group["eps"], group["weight_decay"], step, seed)
        _op.adamw_step_(param, state["exp_avg"], state["exp_avg_sq"], grad, index, first, *hyper)


# optimizer._handle -> the optimizer (weakly): the op that runs it in the backward takes the handle.
_HANDLES = itertools.count(1)
_BY_HANDLE: "weakref.WeakValueDictionary[int, _HeadOptimizer]" = weakref.WeakValueDictionary()

# id(parameter) -> (the parameter, its head optimizer), both weakly: no attribute on the parameter,
# so a head and its parameters pickle and copy like any module and its parameters.
_OWNERS: dict = {}


def _refuse_a_second_optimizer(optimizer, args, kwargs) -> None:
    """A torch optimizer's step over a weight that a head optimizer updates in the backward would
    see no gradient and skip it without a word: say so."""
    if isinstance(optimizer, _HeadOptimizer):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            param, owner = _OWNERS.get(id(p), (lambda: None, lambda: None))
            if param() is p and owner() is not None:
                raise RuntimeError(
                    f"{type(optimizer).__name__} was given a head's weight that "
                    f"marginops.optim.{type(owner()).__name__} updates in the head's backward (it has no .grad): "
                    "give the torch optimizer the backbone's parameters only"
                )


register_optimizer_step_pre_hook(_refuse_a_second_optimizer)


# -- the head's backward ------------------------------------------------------------------------


# The ops the backward calls per chunk (the tests put the emulated CUDA backends here).
_op = ops._ops


def chunk_rows(dim: int, workspace_bytes: int) -> int:
    """Classes per chunk of the backward: a chunk's ∂L/∂W (and its temporaries) within the budget."""
    return max(1, workspace_bytes // (dim * 8 * 3))


class _StatsThenStep(torch.autograd.Function):
    """The op's per-row statistics, whose backward computes ∂L/∂W chunk by chunk and hands each
    chunk to the head's optimizer instead of returning it: one call of the op head_step_backward_
    (which torch.compile(fullgraph=True) traces; docs/design.md, "Training state")."""

    @staticmethod
    def forward(ctx, x, weight, bias, row_margins, curricular, labels, class_index, args, handle):
        out = _op.margin_ce_forward(
            x,
            weight,
            labels,
            bias=bias,
            row_margins=row_margins,
            curricular=curricular,
            class_index=class_index,
            **args,
        )
        ctx.save_for_backward(x, weight, bias, row_margins, curricular, labels, class_index, out[0])
        ctx.args, ctx.handle = args, handle
        ctx.mark_non_differentiable(out[3], out[4])
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_lse, grad_target, grad_sum, _grad_best, _grad_class):
        x, weight, bias, row_margins, curricular, labels, class_index, lse = ctx.saved_tensors
        ops.refuse_create_graph(grad_lse, grad_target, grad_sum, x, weight, bias, row_margins, curricular)
        need_x, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[3] and row_margins is not None
        dx, dm = torch.ops.marginops.head_step_backward_(
            grad_lse=grad_lse, grad_target_logit=grad_target, grad_logit_sum=grad_sum, lse=lse, x=x, weight=weight,
            labels=labels, bias=bias, row_margins=row_margins, curricular=curricular, class_index=class_index,
            need_x=need_x, need_m=need_m, optimizer=ctx.handle, **ctx.args,
        )  # fmt: skip
        return (dx if need_x else None), None, None, (dm if need_m else None), None, None, None, None, None


def _step_schema() -> str:
    """margin_ce_backward's schema with the weight and bias updated in place (Tensor(a!)), the
    output mask replaced by need_x/need_m and the optimizer's handle, and (grad_x,
    grad_row_margins) returned: empty where not asked for."""
    schema = str(_op.margin_ce_backward.default._schema)
    arguments = schema[schema.index("(") + 1 : schema.index(") ->")]
    for old, new in (
        ("Tensor weight,", "Tensor(a!) weight,"),
        ("Tensor? bias,", "Tensor(b!)? bias,"),
        ("bool[4] output_mask,", "bool need_x, bool need_m, int optimizer,"),
    ):
        assert arguments.count(old) == 1, f"margin_ce_backward's schema has no {old!r}"
        arguments = arguments.replace(old, new)
    return f"({arguments}) -> (Tensor grad_x, Tensor grad_row_margins)"


def _step_backward(*args, **kwargs):
    """head_step_backward_: the backward with the head's optimizer."""
    a = ops._bind(torch.ops.marginops.head_step_backward_, args, kwargs)
    opt = _BY_HANDLE[a.pop("optimizer")]
    with _state_under(opt, a["weight"], a["bias"]):
        return _backward_with_step(opt, **a)


def _backward_with_step(
    opt, grad_lse, grad_target_logit, grad_logit_sum, lse, x, weight, labels, bias, row_margins, curricular,
    class_index, need_x, need_m, **args,
):  # fmt: skip
    """∂L/∂W chunk by chunk, each chunk applied to the weight (and bias) at once by opt; returns
    ∂L/∂x and ∂L/∂row_margins (empty where not asked for)."""
    group = opt._begin()
    K = args["subcenters"]
    local = weight.shape[0] // K
    offset, num_classes = args.pop("class_offset"), args.pop("num_classes")
    step = chunk_rows(weight.shape[1], args.get("workspace_bytes") or (64 << 20))
    dx = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32)) if need_x else None
    dm = torch.zeros_like(row_margins) if need_m else None
    grads = dict(grad_lse=grad_lse, grad_target_logit=grad_target_logit, grad_logit_sum=grad_logit_sum, lse=lse)
    for classes in _chunks(local, class_index, step):
        if isinstance(classes, slice):
            rows = slice(classes.start * K, classes.stop * K)
            w, b, y = weight[rows], None if bias is None else bias[classes], labels
            where = dict(num_classes=num_classes, class_offset=offset + classes.start)
        else:  # sampled classes, gathered: labels renumbered to their positions (absent: past the end)
            rows = _rows_of(classes, K)
            w, b = weight.index_select(0, rows), None if bias is None else bias.index_select(0, classes)
            y = _renumber(labels, classes + offset, args["ignore_index"])
            where = dict(num_classes=classes.numel() + 1, class_offset=0)
        gx, gw, gb, gm = _op.margin_ce_backward(
            **grads, x=x, weight=w, labels=y, bias=b, row_margins=row_margins, curricular=curricular,
            class_index=None, output_mask=[need_x, True, b is not None, need_m], **where, **args,
        )  # fmt: skip
        with torch.no_grad():
            opt._apply(weight, rows, gw, group)
            if b is not None:
                opt._apply(bias, classes, gb, group)
        if need_x:
            dx += gx
        if need_m:
            dm += gm
    return (x.new_empty((0,)) if dx is None else dx.to(x.dtype)), (x.new_empty((0,)) if dm is None else dm)


def _step_backward_fake(*args, **kwargs):
    a = ops._bind(torch.ops.marginops.head_step_backward_, args, kwargs)
    x, row_margins = a["x"], a["row_margins"]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if a["need_x"] else x.new_empty((0,)),
        torch.empty_like(row_margins) if a["need_m"] else x.new_empty((0,)),
    )


def _prepare(weight, bias, class_index, subcenters: int, optimizer: int) -> None:
    """head_prepare_: the rows a forward reads (all, or class_index's classes') brought up to date."""
    opt = _BY_HANDLE[optimizer]
    classes = slice(None) if class_index is None else class_index
    with _state_under(opt, weight, bias):
        opt._prepare(weight, classes if class_index is None else _rows_of(class_index, subcenters))
        if bias is not None:
            opt._prepare(bias, classes)


@contextlib.contextmanager
def _state_under(opt: _HeadOptimizer, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """opt's state of the head's weight and bias, found under the tensors an op was given for them
    (under torch.compile they may be copies, which the op updates and the graph copies back)."""
    given = [(t, p) for t, p in zip((weight, bias), opt.param_groups[0]["params"]) if t is not p]
    for t, p in given:
        opt.state[t] = opt.state[p]
    try:
        yield
    finally:
        for t, _ in given:
            del opt.state[t]


# The ops that run the head's optimizer, which declare the weight and bias they update; the
# optimizer's own state and bookkeeping stay inside them, read when they run.
torch.library.custom_op(
    "marginops::head_step_backward_", _step_backward, mutates_args=("weight", "bias"), schema=_step_schema()
).register_fake(_step_backward_fake)
torch.library.custom_op(
    "marginops::head_prepare_", _prepare, mutates_args=("weight", "bias"),
    schema="(Tensor(a!) weight, Tensor(b!)? bias, Tensor? class_index, int subcenters, int optimizer) -> ()",
).register_fake(lambda *args: None)  # fmt: skip


def _chunks(local: int, class_index: Optional[torch.Tensor], step: int) -> List:
    """The classes of a backward, in chunks: slices of [0, local), or chunks of the sorted sample."""
    if class_index is None:
        return [slice(c, min(local, c + step)) for c in range(0, local, step)]
    return list(torch.split(class_index, step))


def _rows_of(classes: torch.Tensor, subcenters: int) -> torch.Tensor:
    """The weight rows of classes (K sub-centers each)."""
    return (classes[:, None] * subcenters + torch.arange(subcenters, device=classes.device)).reshape(-1)


def _renumber(labels: torch.Tensor, classes: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Each label's position among the sorted global ``classes``; n (one past them) when absent."""
    pos = torch.searchsorted(classes, labels).clamp(max=classes.numel() - 1)
    found = classes[pos] == labels
    out = torch.where(found, pos, torch.full_like(labels, classes.numel()))
    return torch.where(labels == ignore_index, labels, out)


def head_stats_with_step(optimizer: _HeadOptimizer):
    """ops.head_stats' signature, with the head optimizer in the backward."""

    def head_stats(
        x, weight, labels, *, bias=None, row_margins=None, curricular=None, class_index=None, cfg, **scalars
    ):
        args = dict(cfg._asdict(), **scalars)
        ops._refuse_func_transforms()
        out = _StatsThenStep.apply(
            x, weight, bias, row_margins, curricular, labels, class_index, args, optimizer._handle
        )
        return HeadStats(*out)

    return head_stats
