"""Cases of the vocabulary-parallel fused head, shared by the in-process and the gloo tests.

A case is a dict of NumPy arrays and options (picklable). :func:`run_rank` runs one rank's call
and backward (objective: ``loss·c_loss + Σ_k c_k·out_k`` over the per-token outputs, fixed random
cotangents); :func:`reference_linear_head` runs ``logitkit.linear_head`` on the full head with the
same objective, :func:`reference64` a float64 torch reference that materializes the logits.
"""

from __future__ import annotations

import math

import numpy as np

ALL = ("loss", "logprobs", "entropy", "lse", "argmax")
PER_TOKEN = ("logprobs", "entropy", "lse", "kl")


def shard_bounds(sizes: list) -> list:
    out, s = [], 0
    for n in sizes:
        out.append((s, s + n))
        s += n
    return out


def make_case(sizes, outputs, opts=None, *, teacher=None, dtype="float64", lead=(9,), H=5, seed=0,
              per_token_temp=False, chunk=4, k=3, ignore=(2,), scale=1.5, weight=False, equal=False,
              labels=True):
    """One case: data for ``sum(sizes)`` classes split as ``sizes`` over the ranks."""
    rng = np.random.default_rng(seed)
    V = sum(sizes)
    N = math.prod(lead)
    o = dict(opts or {})
    ii = o.get("ignore_index", -100)
    y = rng.integers(0, V, N)
    for i in ignore:
        if i < N:
            y[i] = ii
    if weight:
        o["weight"] = rng.uniform(0.2, 2.0, V)
    c = {"sizes": list(sizes), "bounds": shard_bounds(sizes), "outputs": tuple(outputs), "opts": o,
         "teacher": teacher, "dtype": dtype, "lead": tuple(lead), "chunk": chunk, "equal": equal, "labels": labels,
         "h": rng.normal(size=(*lead, H)) * scale, "w": rng.normal(size=(V, H)), "b": rng.normal(size=V),
         "y": y.reshape(lead), "cot": {kk: rng.normal(size=lead) for kk in ("loss",) + PER_TOKEN}}
    if per_token_temp:
        c["temp"] = rng.uniform(0.5, 2.0, lead)
    if teacher == "head":
        c["th"] = rng.normal(size=(*lead, 4)) * scale
        c["tw"] = rng.normal(size=(V, 4))
        c["tb"] = rng.normal(size=V)
    elif teacher == "logits":
        c["tl"] = rng.normal(size=(*lead, V)) * 2
    elif teacher == "topk":
        c["tk_idx"] = np.stack([rng.permutation(V)[:k] for _ in range(N)]).reshape(*lead, k)
        c["tk_lp"] = rng.normal(size=(*lead, k))
    if dtype != "float64":
        # the inputs as the ranks see them, so that the references start from the same values
        import torch

        for key in ("h", "w", "b", "th", "tw", "tb", "tl", "tk_lp", "temp"):
            if key in c:
                c[key] = torch.tensor(c[key]).to(getattr(torch, dtype)).double().numpy()
    return c


def _t(torch, a, dtype):
    return torch.tensor(np.asarray(a)).to(dtype)


def _opts(torch, c, dtype):
    o = dict(c["opts"])
    if o.get("weight") is not None:
        o["weight"] = _t(torch, o["weight"], torch.float64 if dtype == torch.float64 else torch.float32)
    if "temp" in c:
        o["temperature"] = _t(torch, c["temp"], dtype)
    return o


def _teacher_kwargs(torch, c, dtype, s=None, e=None):
    t = c["teacher"]
    sl = slice(s, e)
    if t == "head":
        return {"teacher_hidden": _t(torch, c["th"], dtype), "teacher_weight": _t(torch, c["tw"][sl], dtype),
                "teacher_bias": _t(torch, c["tb"][sl], dtype)}
    if t == "logits":
        return {"teacher_logits": _t(torch, c["tl"][..., sl], dtype)}
    if t == "topk":
        return {"teacher_topk": (torch.tensor(c["tk_idx"]), _t(torch, c["tk_lp"], dtype))}
    return {}


def objective(torch, c, out):
    """``loss·c + Σ c_k·out_k``, or ``None`` when no differentiable output was requested."""
    tot = None
    if out.loss is not None:
        cl = torch.tensor(c["cot"]["loss"])
        tot = (out.loss.double() * cl).sum() if out.loss.ndim else out.loss.double()
    for k in PER_TOKEN:
        v = getattr(out, k)
        if v is not None:
            t = (v.double() * torch.tensor(c["cot"][k])).sum()
            tot = t if tot is None else tot + t
    return tot


def _backward(torch, c, out) -> bool:
    tot = objective(torch, c, out)
    if tot is None:
        return False
    tot.backward()
    return True


def _result(out, grads) -> dict:
    res = {k: (None if v is None else v.detach().cpu().double().numpy() if k != "argmax" else v.cpu().numpy())
           for k, v in out._asdict().items()}
    res["dh"], res["dw"], res["db"] = (None if g is None else g.detach().cpu().double().numpy() for g in grads)
    return res


def run_rank(c, rank, group=None, log=None) -> dict:
    """This rank's outputs and gradients (NumPy), and the collectives of forward and backward."""
    import torch

    from logitkit.distributed import vocab_parallel_linear_head

    dtype = getattr(torch, c["dtype"])
    s, e = c["bounds"][rank]
    h = _t(torch, c["h"], dtype).requires_grad_()
    w = _t(torch, c["w"][s:e], dtype).requires_grad_()
    b = _t(torch, c["b"][s:e], dtype).requires_grad_()
    if log is not None:
        del log[:]
    out = vocab_parallel_linear_head(h, w, torch.tensor(c["y"]) if c["labels"] else None, local_bias=b, group=group,
                                     vocab_start=None if c["equal"] else s, outputs=c["outputs"],
                                     chunk_size=c["chunk"], **_opts(torch, c, dtype),
                                     **_teacher_kwargs(torch, c, dtype, s, e))
    fwd = None if log is None else list(log)
    if log is not None:
        del log[:]
    _backward(torch, c, out)
    res = _result(out, (h.grad, w.grad, b.grad))
    if log is not None:
        res["fwd"], res["bwd"] = fwd, list(log)
    return res


def reference_linear_head(c) -> dict:
    """``logitkit.linear_head`` on the full head, same dtype, same objective."""
    import torch

    import logitkit

    dtype = getattr(torch, c["dtype"])
    h, w, b = (_t(torch, c[k], dtype).requires_grad_() for k in ("h", "w", "b"))
    out = logitkit.linear_head(h, w, torch.tensor(c["y"]) if c["labels"] else None, linear_bias=b, outputs=c["outputs"],
                               **_opts(torch, c, dtype), **_teacher_kwargs(torch, c, dtype))
    _backward(torch, c, out)
    return _result(out, (h.grad, w.grad, b.grad))


def reference64(c) -> dict:
    """Float64 torch on the materialized logits (autograd gives the gradients)."""
    import torch

    f64 = torch.float64
    o = c["opts"]
    h, w, b = (torch.tensor(c[k], dtype=f64, requires_grad=True) for k in ("h", "w", "b"))
    y = torch.tensor(c["y"]).reshape(-1)
    ii = o.get("ignore_index", -100)
    valid = (y != ii) if c["labels"] else torch.ones(y.shape, dtype=torch.bool)
    x = (h @ w.T + b).reshape(y.shape[0], -1)
    u = x if o.get("softcap") is None else o["softcap"] * torch.tanh(x / o["softcap"])
    z = u / o.get("temperature", 1.0)
    if "temp" in c:
        z = z / torch.tensor(c["temp"]).reshape(-1, 1)
    lse = torch.logsumexp(z, -1)
    ls = z - lse[:, None]
    p = ls.exp()
    out = {}
    outs = c["outputs"]
    ysafe = torch.where(valid, y, 0)
    if "loss" in outs:
        wt = None if o.get("weight") is None else torch.tensor(o["weight"], dtype=f64)
        ce = torch.nn.functional.cross_entropy(z, y, weight=wt, ignore_index=ii,
                                               label_smoothing=o.get("label_smoothing", 0.0), reduction="none")
        zl = o.get("z_loss", 0.0) * torch.where(valid, lse * lse, 0.0)
        red = o.get("reduction", "mean")
        if red == "none":
            loss = (ce + zl).reshape(c["lead"])
        elif red == "sum":
            loss = ce.sum() + zl.sum()
        elif o.get("num_items_in_batch") is not None:
            loss = (ce.sum() + zl.sum()) / float(o["num_items_in_batch"])
        else:
            wy = valid.double() if wt is None else torch.where(valid, wt[ysafe], 0.0)
            loss = ce.sum() / wy.sum() + zl.sum() / valid.sum()
        out["loss"] = loss
    zero = torch.zeros((), dtype=f64)
    if "logprobs" in outs:
        out["logprobs"] = torch.where(valid, ls.gather(1, ysafe[:, None])[:, 0], zero)
    if "entropy" in outs:
        out["entropy"] = torch.where(valid, -(p * ls).sum(-1), zero)
    if "lse" in outs:
        out["lse"] = torch.where(valid, lse, zero)
    if "kl" in outs:
        tau = o.get("teacher_temperature", 1.0)
        div, beta = o.get("divergence", "kl"), o.get("beta", 0.5)
        if div == "jsd" and beta in (0.0, 1.0):
            div = "kl" if beta == 0.0 else "reverse_kl"
        N = y.shape[0]
        if c["teacher"] in ("head", "logits"):
            if c["teacher"] == "head":
                zt = torch.tensor(c["th"]).reshape(N, -1) @ torch.tensor(c["tw"]).T + torch.tensor(c["tb"])
            else:
                zt = torch.tensor(c["tl"]).reshape(N, -1)
            lt = torch.log_softmax(zt / tau, -1)
            q = lt.exp()
            if div == "kl":
                kl = (q * (lt - ls)).sum(-1)
            elif div == "reverse_kl":
                kl = (p * (ls - lt)).sum(-1)
            else:
                lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
                kl = beta * (q * (lt - lm)).sum(-1) + (1 - beta) * (p * (ls - lm)).sum(-1)
        else:
            k = c["tk_idx"].shape[-1]
            idx = torch.tensor(c["tk_idx"]).reshape(N, k)
            lq = torch.log_softmax(torch.tensor(c["tk_lp"]).reshape(N, k) / tau, -1)
            q = lq.exp()
            lsk = ls.gather(1, idx)
            if div == "kl":
                kl = (q * (lq - lsk)).sum(-1)
            else:
                s = lsk.exp()
                lm = torch.log(beta * q + (1 - beta) * s)
                rest = (1 - s.sum(-1)).clamp_min(0.0)
                kl = beta * (q * (lq - lm)).sum(-1) + (1 - beta) * ((s * (lsk - lm)).sum(-1)
                                                                    - math.log1p(-beta) * rest)
        out["kl"] = torch.where(valid, kl, zero)
    lead = c["lead"]
    res = {k: None for k in ALL + ("kl",)}
    for k, v in out.items():
        res[k] = v.reshape(lead) if v.ndim else v
    if "argmax" in outs:
        res["argmax"] = torch.where(valid, x.argmax(-1), 0).reshape(lead)

    class _O:
        pass

    obj = _O()
    for k in res:
        setattr(obj, k, res[k])
    _backward(torch, c, obj)
    final = {k: (None if v is None else v.detach().numpy()) for k, v in res.items()}
    final["dh"], final["dw"], final["db"] = (None if t.grad is None else t.grad.numpy() for t in (h, w, b))
    return final


def expected_collectives(c, world: int) -> dict:
    """The all-reduces of one call (op, element count), as the docstring's table says."""
    N = math.prod(c["lead"])
    outs, o = c["outputs"], c["opts"]
    div, beta = o.get("divergence", "kl"), o.get("beta", 0.5)
    if div == "jsd" and beta in (0.0, 1.0):
        div = "kl" if beta == 0.0 else "reverse_kl"
    dense = "kl" in outs and c["teacher"] in ("head", "logits")
    topk = "kl" in outs and c["teacher"] == "topk"
    mx = 1 + dense + ("argmax" in outs)
    sm = 3 + ("loss" in outs and o.get("label_smoothing", 0.0) > 0) + ("entropy" in outs)
    if dense:
        sm += 1 + (div != "jsd")
    if topk:
        sm += c["tk_idx"].shape[-1]
    fwd = [("all_reduce", "MAX", 20 * world + 160), ("all_reduce", "MAX", mx * N), ("all_reduce", "SUM", sm * N)]
    if "argmax" in outs:
        fwd.append(("all_reduce", "MAX", N))
    if dense and div == "jsd":
        fwd.append(("all_reduce", "SUM", 2 * N))
    H = c["h"].shape[-1]
    return {"fwd": fwd, "bwd": [("all_reduce", "SUM", N * H)], "per_token_bytes":
            4 * (mx + sm + ("argmax" in outs) + (2 if dense and div == "jsd" else 0))}


def compare(got: dict, want: dict, *, atol: float, rtol: float, what: str, grads: bool = True) -> None:
    keys = list(ALL) + ["kl"] + (["dh", "dw", "db"] if grads else [])
    for k in keys:
        a, b = got.get(k), want.get(k)
        if k == "argmax":
            assert (a is None) == (b is None), (what, k)
            if a is not None:
                assert np.array_equal(a, b), (what, k, a, b)
            continue
        assert (a is None) == (b is None), (what, k, a is None, b is None)
        if a is None:
            continue
        assert a.shape == b.shape, (what, k, a.shape, b.shape)
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=f"{what}: {k}")
