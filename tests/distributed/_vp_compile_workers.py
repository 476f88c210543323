"""Ranks of tests/distributed/test_vp_compile.py: the vocabulary-parallel functions under
``torch.compile(fullgraph=True)`` on a gloo group, against the one-process loss on the gathered
logits (computed on every rank in float64), with graph and recompile counts.

Spawned by torch.multiprocessing with a ``file://`` rendezvous; 60 s group timeout; the parent
kills the ranks after its own timeout.
"""

from __future__ import annotations

import datetime
import os
import pickle
import traceback


def _cases(torch, rank: int, world: int) -> tuple:
    """``(cases, data)``: each case is ``(name, fn, local_input, full_input, reference, local_grad)``."""
    import torch.nn.functional as F

    import logitkit.distributed as ld

    g = torch.Generator().manual_seed(0)
    V, H = 13, 5
    sizes = [6, 7] if world == 2 else [V]
    start = sum(sizes[:rank])
    n = sizes[rank]
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    wl, bl = W[start:start + n].float(), b[start:start + n].float()

    def data(N, seed):
        gg = torch.Generator().manual_seed(seed)
        h = torch.randn(N, H, generator=gg, dtype=torch.float64)
        y = torch.randint(0, V, (N,), generator=gg)
        y[1] = -100
        return h, y

    def logits(h):
        return h @ W.T + b

    def ce_z(z, y):  # F's weighted, smoothed mean plus the z-loss's mean over the rows not ignored
        keep = y != -100
        lse = torch.logsumexp(z, 1)
        return (F.cross_entropy(z, y, weight=cw, label_smoothing=0.1)
                + 1e-3 * torch.where(keep, lse ** 2, 0.0).sum() / keep.sum())

    cases = [
        ("logits",
         lambda x, y: ld.vocab_parallel_cross_entropy(x, y, weight=cw.float(), vocab_start=start,
                                                      label_smoothing=0.1, z_loss=1e-3),
         lambda h: logits(h)[:, start:start + n].float(), logits, ce_z,
         lambda gz: gz[:, start:start + n]),
        ("linear",
         lambda h, y: ld.vocab_parallel_linear_cross_entropy(h, wl, y, local_bias=bl, vocab_start=start,
                                                             label_smoothing=0.1),
         lambda h: h.float(), lambda h: h,
         lambda h, y: F.cross_entropy(logits(h), y, label_smoothing=0.1), lambda gh: gh),
        ("head",
         lambda h, y: _head_sum(ld.vocab_parallel_linear_head(h, wl, y, local_bias=bl, vocab_start=start,
                                                              outputs=("loss", "logprobs", "entropy"))),
         lambda h: h.float(), lambda h: h,
         lambda h, y: _head_ref(torch, logits(h), y), lambda gh: gh),
    ]
    return cases, data


def _head_sum(out):
    return out.loss + (out.logprobs * 0.3).sum() - (out.entropy * 0.01).sum()


def _head_ref(torch, z, y):
    import torch.nn.functional as F

    ls = torch.log_softmax(z, 1)
    keep = y != -100
    lp = torch.where(keep, ls.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(keep, -(ls.exp() * ls).sum(1), 0.0)
    return F.cross_entropy(z, y) + (lp * 0.3).sum() - (ent * 0.01).sum()


# The batch sizes each case is called at (none equal to a shard size: duck sizing would tie the
# two). The logits case at two (a new size must not recompile); the linear heads recompile for a
# new size by design, so one size shows they trace without a graph break and match.
SIZES = {"logits": (5, 9), "linear": (5,), "head": (5,)}


def run(torch, rank: int, world: int, backend: str = "aot_eager", only: tuple = ("logits", "linear", "head"),
        sizes: dict = SIZES) -> list:
    """The cases named in ``only``, each compiled once (``dynamic=True``) and called at its ``sizes``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cases, data = _cases(torch, rank, world)
    results = []
    for name, fn, local, full, ref, local_grad in cases:
        if name not in only:
            continue
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(backend)
        compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
        res = {"name": name, "frames": [], "loss": [], "grad": []}
        for N in sizes[name]:
            h, y = data(N, N)
            x = local(h).detach().requires_grad_()
            out = compiled(x, y)
            (gx,) = torch.autograd.grad(out, x)
            x64 = full(h).detach().requires_grad_()
            expect = ref(x64, y)
            (g64,) = torch.autograd.grad(expect, x64)
            res["frames"].append(counter.frame_count)
            res["loss"].append((float(out.detach()), float(expect.detach())))
            res["grad"].append((gx.double().numpy(), local_grad(g64).numpy()))
        results.append(res)
    return results


def worker(rank: int, world: int, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        try:
            out = run(torch, rank, world, only=("logits", "head"))
        except Exception:  # noqa: BLE001 - reported to the parent test
            out = {"exception": traceback.format_exc()}
        with open(os.path.join(workdir, f"out{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
    finally:
        dist.destroy_process_group()
