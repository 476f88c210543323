"""Rank processes of tests/distributed/test_dtensor.py: one spawned group per world size runs every check.

Each check is a function ``check(ctx) -> dict`` of NumPy results; a rank writes ``out{rank}.pkl``
with one entry per check (its results, or the traceback). After a check raises, the rest are
skipped (the group may be out of step; a timeout must never be the way a failure shows). The
inputs come from :func:`data`, which the parent test calls too, to build its float64 references.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import time
import traceback

import numpy as np

N, H, V = 12, 6, 11          # tokens, hidden size, classes (uneven over 2 and 4 ranks)
CE_OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"weight": True, "ignore_index": 2},
    {"label_smoothing": 0.2, "weight": True},
    {"z_loss": 1e-2},
    {"softcap": 4.0, "temperature": 0.7},
    {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-3, "softcap": 6.0, "temperature": 1.3},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "none", "weight": True},
]
# the options torch's loss_parallel supports (no label smoothing, z-loss, softcap or temperature)
LP_OPTIONS = [i for i, o in enumerate(CE_OPTIONS) if not set(o) - {"reduction", "weight", "ignore_index"}]


def data(seed: int, n: int = N, v: int = V, h: int = H) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, v, n)
    y[3] = -100
    y[7] = 2
    return {"x": rng.normal(size=(n, v)) * 3, "y": y, "w": rng.uniform(0.2, 2.0, v), "h": rng.normal(size=(n, h)),
            "W": rng.normal(size=(v, h)) * 0.5, "b": rng.normal(size=v) * 0.1}


def labels_for(y: np.ndarray, o: dict) -> np.ndarray:
    """With another ignore_index, -100 is no class: those positions get class 0."""
    return np.where(y == -100, 0, y) if "ignore_index" in o else y


def options(o: dict, w: np.ndarray) -> dict:
    o = dict(o)
    if o.get("weight"):
        o["weight"] = w
    return o


def _torch_opts(o: dict, torch, device=None) -> dict:
    o = dict(o)
    if o.get("weight") is not None:
        o["weight"] = torch.tensor(o["weight"], device=device)
    return o


def _np(t) -> np.ndarray:
    import torch

    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class Ctx:
    def __init__(self, rank: int, world: int, device) -> None:
        import torch
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world, self.device = rank, world, device
        self.dev_type = device.type
        self.mesh1 = init_device_mesh(self.dev_type, (world,), mesh_dim_names=("tp",))
        self.mesh2 = (init_device_mesh(self.dev_type, (2, world // 2), mesh_dim_names=("dp", "tp"))
                      if world == 4 else None)
        self.torch = torch
        self.gathers = 0

    def t(self, a, dtype=None, grad=False):
        torch = self.torch
        x = torch.tensor(a, device=self.device)
        if dtype is not None:
            x = x.to(dtype)
        return x.requires_grad_() if grad else x


def install_gather_counter(ctx: Ctx) -> None:
    """Count every all-gather (c10d and functional collectives): the head and logits must not be gathered."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    for mod, names in ((dist, ("all_gather", "all_gather_into_tensor", "all_gather_object")),
                       (funcol, ("all_gather_single", "all_gather_tensor", "all_gather_tensor_autograd",
                                 "all_gather_into_tensor_coalesced"))):
        for name in names:
            fn = getattr(mod, name, None)
            if fn is None:
                continue

            def wrapped(*a, __fn=fn, **k):
                ctx.gathers += 1
                return __fn(*a, **k)

            setattr(mod, name, wrapped)


# ----------------------------------------------------------------------------------------------
# checks


def check_ce_options_1d(ctx: Ctx) -> dict:
    """Logits Shard(1) on a 1-D mesh, every cross_entropy option; torch's loss_parallel beside it."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import logitkit.torch as lt

    d = data(1)
    out = {}
    for k, o in enumerate(CE_OPTIONS):
        full = ctx.t(d["x"])
        x = distribute_tensor(full, ctx.mesh1, [Shard(1)]).requires_grad_()
        oo = _torch_opts(options(o, d["w"]), torch, ctx.device)
        ctx.gathers = 0
        yk = ctx.t(labels_for(d["y"], o))
        loss = lt.cross_entropy(x, yk, **oo)
        loss.sum().backward()
        out[f"{k}/gathers"] = ctx.gathers  # before _np's full_tensor() gathers for the comparison
        out[f"{k}/loss"], out[f"{k}/grad"] = _np(loss), _np(x.grad)
        out[f"{k}/placements"] = str(tuple(loss.placements))
        if k in LP_OPTIONS:
            x2 = distribute_tensor(full, ctx.mesh1, [Shard(1)]).requires_grad_()
            with loss_parallel():
                l2 = F.cross_entropy(x2, yk, **oo)
                l2.sum().backward()
            out[f"{k}/lp_loss"], out[f"{k}/lp_grad"] = _np(l2), _np(x2.grad)
        del x
        # the same options on replicated logits: the local computation, a Replicate loss
        xr = distribute_tensor(ctx.t(d["x"]), ctx.mesh1, [Replicate()]).requires_grad_()
        lr = lt.cross_entropy(xr, yk, **oo)
        lr.sum().backward()
        out[f"{k}/rep_loss"], out[f"{k}/rep_grad"] = _np(lr), _np(xr.grad)
    return out


def check_ce_token_sharded(ctx: Ctx) -> dict:
    """Logits and labels Shard(0) (data parallel): local losses, the global mean, Shard(0) 'none'."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    import logitkit.torch as lt

    d = data(2)
    out = {}
    for k, o in enumerate(CE_OPTIONS):
        x = distribute_tensor(ctx.t(d["x"]), ctx.mesh1, [Shard(0)]).requires_grad_()
        y = distribute_tensor(ctx.t(labels_for(d["y"], o)), ctx.mesh1, [Shard(0)])
        loss = lt.cross_entropy(x, y, **_torch_opts(options(o, d["w"]), torch, ctx.device))
        loss.sum().backward()
        out[f"{k}/loss"], out[f"{k}/grad"] = _np(loss), _np(x.grad)
        out[f"{k}/placements"] = str(tuple(loss.placements))
        out[f"{k}/local"] = _np(loss.to_local())
    # num_items_in_batch on DTensor logits: the global sum over it
    x = distribute_tensor(ctx.t(d["x"]), ctx.mesh1, [Shard(0)]).requires_grad_()
    y = distribute_tensor(ctx.t(d["y"]), ctx.mesh1, [Shard(0)])
    loss = lt.cross_entropy(x, y, label_smoothing=0.1, num_items_in_batch=lt.global_num_items(y) + 5)
    loss.backward()
    out["nib/loss"], out["nib/grad"] = _np(loss), _np(x.grad)
    return out


def check_linear_tp(ctx: Ctx) -> dict:
    """A ColwiseParallel head (weight and bias Shard(0)); hidden plain or a Replicate DTensor."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import logitkit.torch as lt

    d = data(3)
    out = {}
    opts = [{}, {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-3, "softcap": 5.0},
            {"reduction": "none", "temperature": 2.0}, {"reduction": "sum", "ignore_index": 2}]
    for k, o in enumerate(opts):
        for hk in ("plain", "dtensor"):
            head = torch.nn.Linear(H, V, dtype=torch.float64, device=ctx.device)
            with torch.no_grad():
                head.weight.copy_(ctx.t(d["W"]))
                head.bias.copy_(ctx.t(d["b"]))
            parallelize_module(head, ctx.mesh1, ColwiseParallel())
            hp = ctx.t(d["h"], grad=True)
            h = hp if hk == "plain" else DTensor.from_local(hp, ctx.mesh1, [Replicate()])  # differentiable
            ctx.gathers = 0
            loss = lt.linear_cross_entropy(h, head.weight, ctx.t(labels_for(d["y"], o)), linear_bias=head.bias,
                                           chunk_size=5, **_torch_opts(options(o, d["w"]), torch, ctx.device))
            loss.sum().backward()
            key = f"{k}/{hk}"
            out[key + "/gathers"] = ctx.gathers
            out[key + "/loss"], out[key + "/dh"] = _np(loss), _np(hp.grad)
            out[key + "/dW"], out[key + "/db"] = _np(head.weight.grad), _np(head.bias.grad)
            out[key + "/placements"] = str(tuple(loss.placements)) + str(tuple(head.weight.grad.placements))
    # bfloat16: float32 collectives and accumulation, as the vocabulary-parallel functions promise
    Wb = distribute_tensor(ctx.t(d["W"], torch.bfloat16), ctx.mesh1, [torch.distributed.tensor.Shard(0)])
    hb = ctx.t(d["h"], torch.bfloat16, grad=True)
    lb = lt.linear_cross_entropy(hb, Wb.requires_grad_(), ctx.t(d["y"]), label_smoothing=0.1)
    lb.backward()
    out["bf16/loss"], out["bf16/dh"], out["bf16/dW"] = _np(lb), _np(hb.grad), _np(Wb.grad)
    out["bf16/dtype"] = str(lb.dtype)
    # sequence parallel before the head: (batch, seq, H) Shard(1) on the head's own mesh dim, all-gathered
    # there; labels Shard(1) too (gathered) or plain
    for lk in ("sharded", "plain"):
        hs = distribute_tensor(ctx.t(d["h"]).reshape(2, N // 2, H), ctx.mesh1, [torch.distributed.tensor.Shard(1)])
        hs.requires_grad_()
        Ws = distribute_tensor(ctx.t(d["W"]), ctx.mesh1, [torch.distributed.tensor.Shard(0)]).requires_grad_()
        ys = ctx.t(d["y"]).reshape(2, N // 2)
        if lk == "sharded":
            ys = distribute_tensor(ys, ctx.mesh1, [torch.distributed.tensor.Shard(1)])
        ls = lt.linear_cross_entropy(hs, Ws, ys, label_smoothing=0.1)
        ls.backward()
        out[f"sp/{lk}/loss"], out[f"sp/{lk}/dh"], out[f"sp/{lk}/dW"] = _np(ls), _np(hs.grad), _np(Ws.grad)
        out[f"sp/{lk}/placements"] = str(tuple(hs.grad.placements))
    # every linear_head output after sequence parallelism: gathered on the head's dim, the per-token
    # outputs back on the sequence shard; against one process on the full head
    fields = ("loss", "logprobs", "entropy", "lse")
    for red in ("mean", "none"):
        for lk in ("sharded", "plain", "ref"):
            if lk == "ref":
                hs, Ws, ys = (ctx.t(d["h"]).reshape(2, N // 2, H).requires_grad_(), ctx.t(d["W"], grad=True),
                              ctx.t(d["y"]).reshape(2, N // 2))
            else:
                hs = distribute_tensor(ctx.t(d["h"]).reshape(2, N // 2, H), ctx.mesh1,
                                       [torch.distributed.tensor.Shard(1)]).requires_grad_()
                Ws = distribute_tensor(ctx.t(d["W"]), ctx.mesh1, [torch.distributed.tensor.Shard(0)]).requires_grad_()
                ys = ctx.t(d["y"]).reshape(2, N // 2)
                if lk == "sharded":
                    ys = distribute_tensor(ys, ctx.mesh1, [torch.distributed.tensor.Shard(1)])
            r = lt.linear_head(hs, Ws, ys, outputs=fields, reduction=red, label_smoothing=0.1)
            (r.loss.sum() + 0.5 * r.logprobs.sum() - 0.1 * r.entropy.sum() + 0.01 * r.lse.sum()).backward()
            key = f"sphead/{red}/{lk}"
            for f in fields:
                out[f"{key}/{f}"] = _np(getattr(r, f))
            out[f"{key}/dh"], out[f"{key}/dW"] = _np(hs.grad), _np(Ws.grad)
            if lk != "ref":
                out[f"{key}/placements"] = str(tuple(r.logprobs.placements)) + str(tuple(hs.grad.placements))
    # linear_head with outputs=("loss",) takes the same route
    head = distribute_tensor(ctx.t(d["W"]), ctx.mesh1, [torch.distributed.tensor.Shard(0)]).requires_grad_()
    res = lt.linear_head(ctx.t(d["h"]), head, ctx.t(d["y"]), label_smoothing=0.1)
    res.loss.backward()
    out["head/loss"], out["head/dW"] = _np(res.loss), _np(head.grad)
    # every other output with the weight Shard(0): the vocabulary-parallel head, against one process on
    # the full weight; plain and Replicate-DTensor hidden, a GRPO-like combination of cotangents
    fields = ("loss", "logprobs", "entropy", "lse", "argmax")
    for red in ("mean", "none", "num_items"):
        extra = dict(reduction="mean", num_items_in_batch=N + 3) if red == "num_items" else dict(reduction=red)
        for hk in ("plain", "dtensor"):
            Wv = distribute_tensor(ctx.t(d["W"]), ctx.mesh1, [torch.distributed.tensor.Shard(0)]).requires_grad_()
            bv = distribute_tensor(ctx.t(d["b"]), ctx.mesh1, [torch.distributed.tensor.Shard(0)]).requires_grad_()
            hp = ctx.t(d["h"], grad=True)
            h = hp if hk == "plain" else DTensor.from_local(hp, ctx.mesh1, [Replicate()])
            ctx.gathers = 0
            r = lt.linear_head(h, Wv, ctx.t(d["y"]), linear_bias=bv, outputs=fields, label_smoothing=0.1,
                               temperature=1.5, chunk_size=5, **extra)
            (r.loss.sum() + 0.5 * r.logprobs.sum() - 0.1 * r.entropy.sum() + 0.01 * r.lse.sum()).backward()
            key = f"vhead/{red}/{hk}"
            out[key + "/gathers"] = ctx.gathers
            for f in fields:
                out[key + "/" + f] = _np(getattr(r, f))
            out[key + "/dh"], out[key + "/dW"], out[key + "/db"] = _np(hp.grad), _np(Wv.grad), _np(bv.grad)
            out[key + "/placements"] = str(tuple(r.logprobs.placements)) + str(tuple(Wv.grad.placements))
        Wf, bf, hf = ctx.t(d["W"], grad=True), ctx.t(d["b"], grad=True), ctx.t(d["h"], grad=True)
        r = lt.linear_head(hf, Wf, ctx.t(d["y"]), linear_bias=bf, outputs=fields, label_smoothing=0.1,
                           temperature=1.5, **extra)
        (r.loss.sum() + 0.5 * r.logprobs.sum() - 0.1 * r.entropy.sum() + 0.01 * r.lse.sum()).backward()
        for f in fields:
            out[f"vhead/{red}/ref/{f}"] = _np(getattr(r, f))
        out[f"vhead/{red}/ref/dh"], out[f"vhead/{red}/ref/dW"], out[f"vhead/{red}/ref/db"] = (
            _np(hf.grad), _np(Wf.grad), _np(bf.grad))
    return out


def check_linear_token_sharded(ctx: Ctx) -> dict:
    """Hidden and labels Shard(0), weight Replicate: the global mean; weight.grad Partial; linear_head outputs."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import logitkit.torch as lt

    d = data(4)
    out = {}
    opts = [{}, {"weight": True, "z_loss": 1e-2, "label_smoothing": 0.1}, {"reduction": "none"},
            {"reduction": "sum", "softcap": 3.0}]
    for k, o in enumerate(opts):
        hp = ctx.t(d["h"])
        h = distribute_tensor(hp, ctx.mesh1, [Shard(0)]).requires_grad_()
        W = distribute_tensor(ctx.t(d["W"]), ctx.mesh1, [Replicate()]).requires_grad_()
        y = distribute_tensor(ctx.t(d["y"]), ctx.mesh1, [Shard(0)])
        loss = lt.linear_cross_entropy(h, W, y, **_torch_opts(options(o, d["w"]), torch, ctx.device))
        loss.sum().backward()
        out[f"{k}/loss"], out[f"{k}/dh"], out[f"{k}/dW"] = _np(loss), _np(h.grad), _np(W.grad)
        out[f"{k}/placements"] = str(tuple(loss.placements)) + str(tuple(W.grad.placements))
    # (batch, sequence, hidden) sharded on the sequence (dim 1), as sequence parallelism does
    h3 = distribute_tensor(ctx.t(d["h"]).reshape(2, N // 2, H), ctx.mesh1, [Shard(1)]).requires_grad_()
    W = distribute_tensor(ctx.t(d["W"]), ctx.mesh1, [Replicate()])
    y3 = distribute_tensor(ctx.t(d["y"]).reshape(2, N // 2), ctx.mesh1, [Shard(1)])
    for red in ("mean", "none"):
        loss = lt.linear_cross_entropy(h3, W, y3, reduction=red, label_smoothing=0.1)
        loss.sum().backward()
        out[f"seq/{red}/loss"], out[f"seq/{red}/dh"] = _np(loss), _np(h3.grad)
        out[f"seq/{red}/placements"] = str(tuple(loss.placements))
        h3.grad = None
    # linear_head's loss with num_items_in_batch through the DTensor route
    res = lt.linear_head(distribute_tensor(ctx.t(d["h"]), ctx.mesh1, [Shard(0)]), W,
                         distribute_tensor(ctx.t(d["y"]), ctx.mesh1, [Shard(0)]), num_items_in_batch=20, z_loss=1e-2)
    out["head_nib/loss"] = _np(res.loss)
    h = distribute_tensor(ctx.t(d["h"]), ctx.mesh1, [Shard(0)]).requires_grad_()
    y = distribute_tensor(ctx.t(d["y"]), ctx.mesh1, [Shard(0)])
    from logitkit.torch import _dtensor as _dtm

    calls = []
    lce = _dtm.linear_cross_entropy
    _dtm.linear_cross_entropy = lambda *a, **k: (calls.append(1), lce(*a, **k))[1]
    try:  # the loss and the per-token outputs from one pass over the local head
        res = lt.linear_head(h, W, y, outputs=("loss", "logprobs", "entropy"))
    finally:
        _dtm.linear_cross_entropy = lce
    out["head/lce_calls"] = len(calls)
    (res.loss + 0.1 * res.entropy.sum()).backward()
    out["head/loss"], out["head/logprobs"], out["head/entropy"] = _np(res.loss), _np(res.logprobs), _np(res.entropy)
    out["head/dh"] = _np(h.grad)
    out["head/placements"] = str(tuple(res.logprobs.placements))
    return out


def _tiny(torch, seed, device, V_=V, H_=H, lm_head_in_root=False):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(H_, H_, dtype=torch.float64) for _ in range(2)])
            self.lm_head = torch.nn.Linear(H_, V_, bias=False, dtype=torch.float64)

        def forward(self, x, labels=None, num_items=None, scale=1.0):
            for b in self.blocks:
                x = torch.tanh(b(x)) + x
            if labels is None:
                return x
            import logitkit.torch as lt

            # inside the FSDP root's forward: the head (in the root's group) is unsharded here
            return lt.linear_cross_entropy(x, self.lm_head.weight, labels, num_items_in_batch=num_items) * scale

    torch.manual_seed(seed)
    return Tiny().to(device)


def check_fsdp2(ctx: Ctx) -> dict:
    """fully_shard-ed blocks and head; three ways to call the loss; 3 SGD steps against one process."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    import logitkit.torch as lt

    d = data(5, n=16)
    out = {}
    x_all, y_all = ctx.t(d["x"][:, :H]), ctx.t(d["y"])
    ref = _tiny(torch, 0, ctx.device)
    # one process, the whole batch, torch's own loss
    ref_losses = []
    for step in range(3):
        for p in ref.parameters():
            p.grad = None
        loss = F.cross_entropy(ref(x_all) @ ref.lm_head.weight.T, y_all)
        loss.backward()
        ref_losses.append(loss.item())
        if step == 0:
            out["ref/grads"] = {n: p.grad.numpy().copy() for n, p in ref.named_parameters()}
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
    out["ref/losses"] = np.array(ref_losses)
    out["ref/params"] = {n: p.detach().numpy().copy() for n, p in ref.named_parameters()}
    rows = np.array_split(np.arange(x_all.shape[0]), ctx.world)[ctx.rank]
    xs, ys = x_all[rows], y_all[rows]
    for mode in ("sharded_weight", "unshard", "inside_forward", "divide_factor_1"):
        model = _tiny(torch, 0, ctx.device)
        for b in model.blocks:
            fully_shard(b)
        if mode != "inside_forward":
            fully_shard(model.lm_head)
        fully_shard(model)
        factor = float(ctx.world)
        if mode == "divide_factor_1":  # FSDP sums gradients instead of averaging: no world-size factor
            for m_ in (*model.blocks, model.lm_head, model):
                m_.set_gradient_divide_factor(1.0)
            factor = 1.0
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses, kinds = [], []
        for step in range(3):
            opt.zero_grad()
            n = lt.global_num_items(ys)  # one all-reduce: the global count of this step's tokens
            if mode == "inside_forward":
                # FSDP averages gradients over ranks: the world-size factor makes them sums
                loss = model(xs, ys, num_items=n, scale=float(ctx.world))
                kinds.append("in_forward")
            else:
                hidden = model(xs)
                if mode == "unshard":
                    model.lm_head.unshard()
                W = model.lm_head.weight
                kinds.append(type(W).__name__)
                ctx.gathers = 0
                loss = lt.linear_cross_entropy(hidden, W, ys, num_items_in_batch=n) * factor
            loss.backward()
            if mode == "sharded_weight" and step == 0:
                out[f"{mode}/gathers"] = ctx.gathers
            if step == 0:
                out[f"{mode}/grads"] = {nm: _np(p.grad) for nm, p in model.named_parameters()}
            opt.step()
            g = loss.detach().clone() / factor
            torch.distributed.all_reduce(g)  # the global loss: the sum of the ranks' parts
            losses.append(g.item())
        out[f"{mode}/losses"] = np.array(losses)
        out[f"{mode}/params"] = {nm: _np(p) for nm, p in model.named_parameters()}
        out[f"{mode}/kinds"] = kinds
    return out


def check_fsdp2_transformers(ctx: Ctx) -> dict:
    """logitkit.transformers.apply on a tiny Llama whose layers and lm_head are fully_shard-ed (the
    head's own FSDP unit: the patched forward sees its sharded weight), against one process."""
    import torch
    import transformers
    from torch.distributed.fsdp import fully_shard

    import logitkit.torch as lt
    import logitkit.transformers as lkt

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).double().to(ctx.device)
    model = transformers.LlamaForCausalLM(cfg).double().to(ctx.device)
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (4, 9), generator=g).to(ctx.device)
    labels = ids.clone()
    labels[0, 5:] = -100
    out = {}
    loss = ref(input_ids=ids, labels=labels).loss
    loss.backward()
    out["ref/loss"] = loss.item()
    out["ref/grads"] = {n: p.grad.detach().cpu().numpy().copy() for n, p in ref.named_parameters()}
    state = model.state_dict()
    for head_unit in (True, False):  # the head its own FSDP unit (sharded in the patched forward), or the root's
        model = transformers.LlamaForCausalLM(cfg).double().to(ctx.device)
        model.load_state_dict(state)
        lkt.apply(model)
        for layer in model.model.layers:
            fully_shard(layer)
        if head_unit:
            fully_shard(model.lm_head)
        fully_shard(model)
        mine = slice(ctx.rank * 4 // ctx.world, (ctx.rank + 1) * 4 // ctx.world)
        n = lt.global_num_items(labels[mine, 1:])  # HF shifts the labels: the first position predicts nothing
        loss = model(input_ids=ids[mine], labels=labels[mine], num_items_in_batch=n).loss * ctx.world
        loss.backward()
        total = loss.detach() / ctx.world
        torch.distributed.all_reduce(total)
        key = "head_unit" if head_unit else "root"
        out[f"{key}/loss"] = total.item()
        out[f"{key}/grads"] = {nm: _np(p.grad) for nm, p in model.named_parameters()}
    return out


def check_grad_accum_ddp(ctx: Ctx) -> dict:
    """P ranks × G micro-batches with num_items_in_batch = global_num_items, under DDP (no_sync), and
    the token-sharded DTensor route, against one big batch."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    import logitkit.torch as lt

    G = 3
    d = data(6, n=6 * ctx.world * G)
    out = {}
    h_all, y_all, w_all = ctx.t(d["h"]), ctx.t(d["y"]), ctx.t(d["w"])
    y_all[::5] = -100
    # micro-batch g of rank r: uneven counts of ignored tokens everywhere
    parts = np.array_split(np.arange(h_all.shape[0]), ctx.world * G)
    mine = [parts[ctx.rank * G + g] for g in range(G)]
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(H, H, dtype=torch.float64)
            self.head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)

        def forward(self, x):  # the hidden states; the head's weight goes to the fused loss
            return torch.tanh(self.trunk(x))

    for cw in (False, True):
        torch.manual_seed(1)
        net = Net().to(ctx.device)
        ref = Net().to(ctx.device)
        ref.load_state_dict(net.state_dict())
        model = DDP(net)
        wt = w_all if cw else None
        big = F.cross_entropy(ref(h_all) @ ref.head.weight.T, y_all, weight=wt)
        big.backward()
        n = lt.global_num_items([y_all[i] for i in mine], weight=wt)
        total = torch.zeros((), dtype=torch.float64)
        for g, idx in enumerate(mine):
            with model.no_sync() if g < G - 1 else contextlib.nullcontext():
                hidden = model(h_all[idx])
                loss = lt.linear_cross_entropy(hidden, net.head.weight, y_all[idx], weight=wt, num_items_in_batch=n)
                (loss * ctx.world).backward()  # DDP averages over ranks; the factor makes it the sum
            total += loss.detach()
        torch.distributed.all_reduce(total)
        key = "weighted" if cw else "plain"
        out[f"{key}/loss"], out[f"{key}/ref_loss"] = total.item(), big.item()
        out[f"{key}/dW"], out[f"{key}/ref_dW"] = _np(net.head.weight.grad), _np(ref.head.weight.grad)
        out[f"{key}/dT"], out[f"{key}/ref_dT"] = _np(net.trunk.weight.grad), _np(ref.trunk.weight.grad)
    # the token-sharded DTensor route: hidden and labels Shard(0) per micro-batch, no world-size factor
    W = distribute_tensor(ctx.t(d["W"]), ctx.mesh1, [Replicate()]).requires_grad_()
    mbs = [distribute_tensor(y_all[np.concatenate([parts[r * G + g] for r in range(ctx.world)])], ctx.mesh1,
                             [Shard(0)]) for g in range(G)]
    n = lt.global_num_items(mbs)
    total = 0.0
    for g in range(G):
        rows = np.concatenate([parts[r * G + g] for r in range(ctx.world)])
        h = distribute_tensor(h_all[rows], ctx.mesh1, [Shard(0)])
        loss = lt.linear_cross_entropy(h, W, mbs[g], num_items_in_batch=n, z_loss=1e-3)
        loss.backward()
        total += loss.full_tensor().item()
    Wr = ctx.t(d["W"], grad=True)
    big = F.cross_entropy(h_all @ Wr.T, y_all, reduction="sum")
    lse = torch.logsumexp(h_all @ Wr.T, -1)
    big = (big + 1e-3 * (lse ** 2 * (y_all != -100)).sum()) / (y_all != -100).sum()
    big.backward()
    out["dtensor/loss"], out["dtensor/ref_loss"] = total, big.item()
    out["dtensor/dW"], out["dtensor/ref_dW"] = _np(W.grad), _np(Wr.grad)
    out["dtensor/n"] = int(n)
    return out


def check_errors(ctx: Ctx) -> dict:
    """Placements that make no sense, and one rank's bad labels: every rank raises, none hangs."""
    import torch
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import logitkit.torch as lt

    d = data(7)
    out = {}

    def attempt(name, fn):
        t0 = time.monotonic()
        try:
            fn()
            out[name] = ("no error", "")
        except (ValueError, TypeError, NotImplementedError) as exc:
            out[name] = (type(exc).__name__, str(exc))
        out[name + "/seconds"] = time.monotonic() - t0

    m = ctx.mesh1
    xs = ctx.t(d["x"])
    y = ctx.t(d["y"])
    attempt("partial_input", lambda: lt.cross_entropy(DTensor.from_local(xs, m, [Partial()]), y))
    attempt("target_sharded_with_vocab", lambda: lt.linear_cross_entropy(
        distribute_tensor(ctx.t(d["h"]), m, [Replicate()]), distribute_tensor(ctx.t(d["W"]), m, [Shard(0)]),
        distribute_tensor(y, m, [Shard(0)])))
    attempt("rowwise_weight", lambda: lt.linear_cross_entropy(
        distribute_tensor(ctx.t(d["h"]), m, [Replicate()]), distribute_tensor(ctx.t(d["W"]), m, [Shard(1)]), y))
    attempt("plain_target_with_sharded_tokens", lambda: lt.cross_entropy(
        distribute_tensor(xs, m, [Shard(0)]), y))
    attempt("hidden_differs_across_ranks", lambda: lt.linear_cross_entropy(
        ctx.t(d["h"]) + ctx.rank, distribute_tensor(ctx.t(d["W"]), m, [Shard(0)]), y))
    attempt("hidden_columns_permuted_on_one_rank", lambda: lt.linear_cross_entropy(
        ctx.t(d["h"])[:, [1, 0, 2, 3, 4, 5] if ctx.rank else list(range(H))],
        distribute_tensor(ctx.t(d["W"]), m, [Shard(0)]), y))
    attempt("plain_weight_with_sharded_tokens", lambda: lt.linear_cross_entropy(
        distribute_tensor(ctx.t(d["h"]), m, [Shard(0)]), ctx.t(d["W"], grad=True), distribute_tensor(y, m, [Shard(0)])))
    attempt("prob_target_vocab_sharded", lambda: lt.cross_entropy(
        distribute_tensor(xs, m, [Shard(1)]), torch.softmax(xs, -1)))
    bad = y.clone()
    if ctx.rank == ctx.world - 1:
        bad[-1] = V + 3  # out of range on the last rank only (its shard of the tokens)
    attempt("bad_label_one_rank", lambda: lt.cross_entropy(
        distribute_tensor(xs, m, [Shard(0)]), DTensor.from_local(bad.chunk(ctx.world)[ctx.rank], m, [Shard(0)])))
    attempt("num_items_with_sum", lambda: lt.cross_entropy(xs, y, reduction="sum", num_items_in_batch=3))
    attempt("num_items_zero", lambda: lt.linear_cross_entropy(ctx.t(d["h"]), ctx.t(d["W"]), y, num_items_in_batch=0))
    # the group is still in step after all of that: a correct call works
    loss = lt.cross_entropy(distribute_tensor(xs, m, [Shard(1)]), y)
    out["after/loss"] = _np(loss)
    return out


def check_mesh2d(ctx: Ctx) -> dict:
    """2-D mesh (dp × tp): tokens Shard(0) on dp, the head / logits sharded on tp."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import logitkit.torch as lt

    m = ctx.mesh2
    d = data(8)
    out = {}
    for k, o in enumerate(CE_OPTIONS):
        oo = _torch_opts(options(o, d["w"]), torch, ctx.device)
        x = distribute_tensor(ctx.t(d["x"]), m, [Shard(0), Shard(1)]).requires_grad_()
        y = distribute_tensor(ctx.t(labels_for(d["y"], o)), m, [Shard(0), Replicate()])
        ctx.gathers = 0
        loss = lt.cross_entropy(x, y, **oo)
        loss.sum().backward()
        out[f"ce{k}/gathers"] = ctx.gathers
        out[f"ce{k}/loss"], out[f"ce{k}/grad"] = _np(loss), _np(x.grad)
        out[f"ce{k}/placements"] = str(tuple(loss.placements))
        if k in LP_OPTIONS and o.get("reduction", "mean") != "mean":  # torch: no mean on a 2-D mesh
            x2 = distribute_tensor(ctx.t(d["x"]), m, [Shard(0), Shard(1)]).requires_grad_()
            with loss_parallel():
                l2 = F.cross_entropy(x2, y, **oo)
                l2.sum().backward()
            out[f"ce{k}/lp_loss"], out[f"ce{k}/lp_grad"] = _np(l2), _np(x2.grad)
    for k, o in enumerate([{}, {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-2, "softcap": 5.0,
                              "temperature": 0.8}, {"reduction": "none"}]):
        hp = distribute_tensor(ctx.t(d["h"]), m, [Shard(0), Replicate()]).requires_grad_()
        W = distribute_tensor(ctx.t(d["W"]), m, [Replicate(), Shard(0)]).requires_grad_()
        b = distribute_tensor(ctx.t(d["b"]), m, [Replicate(), Shard(0)]).requires_grad_()
        y = distribute_tensor(ctx.t(d["y"]), m, [Shard(0), Replicate()])
        ctx.gathers = 0
        loss = lt.linear_cross_entropy(hp, W, y, linear_bias=b, **_torch_opts(options(o, d["w"]), torch, ctx.device))
        loss.sum().backward()
        out[f"lin{k}/gathers"] = ctx.gathers
        out[f"lin{k}/loss"], out[f"lin{k}/dh"] = _np(loss), _np(hp.grad)
        out[f"lin{k}/dW"], out[f"lin{k}/db"] = _np(W.grad), _np(b.grad)
        out[f"lin{k}/placements"] = str(tuple(loss.placements)) + str(tuple(W.grad.placements))
    # linear_head with the loss and per-token outputs: one vocabulary-parallel pass on the 2-D mesh
    # (no separate linear_cross_entropy for the loss), against one process on the full head
    from logitkit.torch import _dtensor as _dtm

    calls = []
    lce = _dtm.linear_cross_entropy
    _dtm.linear_cross_entropy = lambda *a, **k: (calls.append(1), lce(*a, **k))[1]
    try:
        for k, o in enumerate([{"label_smoothing": 0.1, "weight": True, "z_loss": 1e-2},
                               {"reduction": "sum", "temperature": 1.5}]):
            oo = _torch_opts(options(o, d["w"]), torch, ctx.device)
            fields = ("loss", "logprobs", "entropy", "lse")
            got = {}
            for hk in ("mesh", "ref"):
                if hk == "mesh":
                    hp = distribute_tensor(ctx.t(d["h"]), m, [Shard(0), Replicate()]).requires_grad_()
                    Wd = distribute_tensor(ctx.t(d["W"]), m, [Replicate(), Shard(0)]).requires_grad_()
                    y = distribute_tensor(ctx.t(d["y"]), m, [Shard(0), Replicate()])
                else:
                    hp, Wd, y = ctx.t(d["h"], grad=True), ctx.t(d["W"], grad=True), ctx.t(d["y"])
                r = lt.linear_head(hp, Wd, y, outputs=fields, **oo)
                (r.loss + 0.5 * r.logprobs.sum() - 0.1 * r.entropy.sum() + 0.01 * r.lse.sum()).backward()
                for f in fields:
                    got[f"{hk}/{f}"] = _np(getattr(r, f))
                got[f"{hk}/dh"], got[f"{hk}/dW"] = _np(hp.grad), _np(Wd.grad)
                if hk == "mesh":
                    got["mesh/placements"] = str(tuple(r.loss.placements)) + str(tuple(r.logprobs.placements))
            for key, v in got.items():
                out[f"mhead{k}/{key}"] = v
    finally:
        _dtm.linear_cross_entropy = lce
    out["mhead/lce_calls"] = len(calls)
    # gradient accumulation on the 2-D mesh: G micro-batches, num_items from DTensor labels
    G = 2
    big = data(9, n=2 * N)
    ys = [distribute_tensor(ctx.t(big["y"][g * N:(g + 1) * N]), m, [Shard(0), Replicate()]) for g in range(G)]
    n = lt.global_num_items(ys)
    W = distribute_tensor(ctx.t(big["W"]), m, [Replicate(), Shard(0)]).requires_grad_()
    total = 0.0
    for g in range(G):
        hg = distribute_tensor(ctx.t(big["h"][g * N:(g + 1) * N]), m, [Shard(0), Replicate()])
        loss = lt.linear_cross_entropy(hg, W, ys[g], num_items_in_batch=n, label_smoothing=0.1)
        loss.backward()
        total += loss.full_tensor().item()
    out["accum/loss"], out["accum/dW"], out["accum/n"] = total, _np(W.grad), int(n)
    return out


def check_fsdp_tp_2d(ctx: Ctx) -> dict:
    """examples/dtensor_2d_mesh_torchrun.py's setup: FSDP2 over dp, a ColwiseParallel head over tp, the
    loss inside forward (the head there is the tp-sharded DTensor); 3 SGD steps against one process."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import logitkit.torch as lt

    m = ctx.mesh2
    d = data(10, n=16)
    x_all, y_all = ctx.t(d["x"][:, :H]), ctx.t(d["y"])
    ref = _tiny(torch, 0, ctx.device)
    model = _tiny(torch, 0, ctx.device)
    parallelize_module(model.lm_head, m["tp"], ColwiseParallel())
    fully_shard(model, mesh=m["dp"])
    dp, r = m["dp"].size(), m["dp"].get_local_rank()
    rows = np.array_split(np.arange(16), dp)[r]
    out = {"losses": [], "ref": []}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(3):
        n = lt.global_num_items(y_all[rows], group=m["dp"].get_group())
        loss = model(x_all[rows], y_all[rows], num_items=n, scale=float(dp))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().full_tensor() / dp
        torch.distributed.all_reduce(total, group=m["dp"].get_group())
        out["losses"].append(total.item())
        rl = F.cross_entropy(ref(x_all) @ ref.lm_head.weight.T, y_all)
        ref_opt.zero_grad()
        rl.backward()
        ref_opt.step()
        out["ref"].append(rl.item())
    out["params"] = {nm: _np(p) for nm, p in model.named_parameters()}
    out["ref_params"] = {nm: p.detach().numpy().copy() for nm, p in ref.named_parameters()}
    out["loss_placements"] = str(tuple(loss.placements))
    # outside forward the head is FSDP's 2-D (dp × tp) shard: refused, with what to do instead
    Wout = model.lm_head.weight
    out["outside/placements"] = str(tuple(Wout.placements))
    try:
        lt.linear_cross_entropy(x_all[rows].detach(), Wout, y_all[rows])
        out["outside"] = ("no error", "")
    except (NotImplementedError, ValueError) as exc:
        out["outside"] = (type(exc).__name__, str(exc))
    return out


CHECKS = {
    2: [check_ce_options_1d, check_ce_token_sharded, check_linear_tp, check_linear_token_sharded, check_fsdp2,
        check_grad_accum_ddp, check_errors, check_fsdp2_transformers],
    4: [check_mesh2d, check_fsdp_tp_2d, check_ce_options_1d, check_linear_tp, check_errors],
}


def worker(rank: int, world: int, workdir: str, backend: str, names: list) -> None:
    # the core on torch ops: the kernels are tested against it elsewhere, and loading numba in every
    # rank would cost more than the checks (read when logitkit's registry is imported)
    os.environ["LOGITKIT_KERNELS"] = "core"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(workdir, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        ctx = Ctx(rank, world, dev)
        install_gather_counter(ctx)
        failed = None
        for fn in CHECKS[world]:
            if names and fn.__name__ not in names:
                continue
            if failed is not None:
                results[fn.__name__] = {"skipped": f"after {failed} failed"}
                continue
            t0 = time.monotonic()
            try:
                res = fn(ctx)
                res["seconds"] = time.monotonic() - t0
                results[fn.__name__] = res
            except Exception:  # noqa: BLE001 - reported to the parent test, per check
                results[fn.__name__] = {"exception": traceback.format_exc()}
                failed = fn.__name__
    finally:
        with open(os.path.join(workdir, f"out{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        dist.destroy_process_group()


PRELOAD = ["torch", "torch._dynamo", "torch.distributed.tensor", "torch.distributed.tensor.parallel", "torch.distributed.fsdp",
           "torch.nn.parallel", "numpy", "transformers", "transformers.models.llama.modeling_llama"]


def launch(world: int, workdir: str, backend: str = "gloo", names: list = (), timeout: float = 120.0) -> list:
    """Spawn ``world`` ranks; return each rank's ``{check: results}``. A rank that dies or stalls fails the
    launch (the others are killed), it never hangs the test."""
    import multiprocessing.forkserver

    import torch.multiprocessing as mp

    # A fork server that has imported torch and DTensor (which imports torch._dynamo) once: every
    # rank of every launch is forked from it, fresh, instead of each importing ~10 s of modules on
    # a 2-core machine. (logitkit is imported in each rank, after LOGITKIT_KERNELS is set.)
    multiprocessing.forkserver.set_forkserver_preload(PRELOAD)
    ctx = mp.start_processes(worker, args=(world, workdir, backend, list(names)), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} {backend} ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for r in range(world):
        with open(os.path.join(workdir, f"out{r}.pkl"), "rb") as f:
            out.append(pickle.load(f))
    return out
