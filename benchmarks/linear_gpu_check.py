"""GPU check of logitkit.torch.linear_cross_entropy (one short script for a CUDA machine).

Compares loss and gradients on CUDA against torch's unfused float64 computation, through the
Triton linear kernels (default) and through the chunk driver on torch ops (``LOGITKIT_KERNELS=core``),
for float32 and bfloat16, ``mean`` and ``none`` (per-token grad_output, ignored rows), then times
the ``head`` workload (forward + backward) against eager torch and reports peak CUDA memory; the
Triton linear-head kernels (lse / logprobs / entropy) are checked against float64 too.

    PYTHONPATH=src python benchmarks/linear_gpu_check.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from logitkit.kernels import registry
from logitkit.torch.linear import linear_cross_entropy


def ref(h, W, b, y, reduction, **o):
    z = F.linear(h.double(), W.double(), b.double())
    if o.get("softcap"):
        z = o["softcap"] * torch.tanh(z / o["softcap"])
    return F.cross_entropy(z, y, reduction=reduction, label_smoothing=o.get("label_smoothing", 0.0))


def check(dtype, reduction, core, N=300, H=64, V=1000, **o):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, H, generator=g).cuda().to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.3).cuda().to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).cuda().to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).cuda()
    y[::7] = -100
    go = torch.randn(N if reduction == "none" else (), generator=g).cuda().double()
    if core:
        with registry.use_core():
            loss = linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction, chunk_size=(64, 300), **o)
            got = torch.autograd.grad(loss, (h, W, b), go.to(loss.dtype))
    else:
        loss = linear_cross_entropy(h, W, y, linear_bias=b, reduction=reduction, **o)
        got = torch.autograd.grad(loss, (h, W, b), go.to(loss.dtype))
    r = ref(h, W, b, y, reduction, **o)
    want = torch.autograd.grad(r, (h, W, b), go)
    err_l = float(((loss.detach().double() - r.detach()).abs().max()) / r.detach().abs().max())
    errs = [float((a.double() - e).abs().max() / e.abs().max()) for a, e in zip(got, want)]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ok = err_l <= tol and max(errs) <= tol
    print(f"{'core ' if core else 'triton'} {str(dtype):15s} {reduction:5s} {o} loss {err_l:.1e} "
          f"grads {[f'{e:.1e}' for e in errs]} {'OK' if ok else 'FAIL'}", flush=True)
    return ok


def check_head_kernels(dtype, N=300, H=64, V=1000):
    """kernels/triton/linear_head.py on CUDA: lse / logprobs / entropy and their gradients vs float64."""
    from logitkit.kernels import triton as tk

    g = torch.Generator(device="cpu").manual_seed(1)
    h = torch.randn(N, H, generator=g).cuda().to(dtype)
    W = (torch.randn(V, H, generator=g) * 0.3).cuda().to(dtype)
    y = torch.randint(0, V, (N,), generator=g).cuda()
    y[::7] = -100
    g_lp, g_ent = torch.randn(N, generator=g).cuda(), torch.randn(N, generator=g).cuda()
    lse, lp, ent, m, r = tk.linear_head_forward(h, W, y)
    dh, dW, _ = tk.linear_head_backward(h, W, y, m, r, ent, None, g_lp, g_ent)
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    ls = torch.log_softmax(h64 @ W64.T, -1)
    keep = y != -100
    lp64 = torch.where(keep, ls.gather(1, torch.where(keep, y, 0)[:, None])[:, 0], 0.0)
    ent64 = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
    want = torch.autograd.grad((g_lp.double() * lp64).sum() + (g_ent.double() * ent64).sum(), (h64, W64))

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    errs = [rel(lp, lp64), rel(ent, ent64), rel(dh, want[0]), rel(dW, want[1])]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ok = max(errs) <= tol
    print(f"head kernels {str(dtype):15s} logprobs/entropy/dh/dW {[f'{e:.1e}' for e in errs]} "
          f"{'OK' if ok else 'FAIL'}", flush=True)
    return ok


def bench():
    N, H, V = 4096, 1024, 32000
    h = torch.randn(N, H, device="cuda").requires_grad_()
    W = (torch.randn(V, H, device="cuda") / 32).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    for name, fn in (("torch eager", lambda: F.cross_entropy(h @ W.T, y)),
                     ("logitkit", lambda: linear_cross_entropy(h, W, y))):
        for _ in range(2):
            fn().backward()
        h.grad = W.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().backward()
            torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
            h.grad = W.grad = None
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        print(f"head fp32 fwd+bwd {name}: {sorted(t)[2] * 1e3:.1f} ms, peak extra {peak:.0f} MB", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    ok = True
    for core in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for red in ("mean", "none"):
                ok &= check(dtype, red, core)
        ok &= check(torch.float32, "sum", core, label_smoothing=0.1, softcap=5.0)
    for dtype in (torch.float32, torch.bfloat16):
        ok &= check_head_kernels(dtype)
    bench()
    print("ALL OK" if ok else "SOME FAILED")
