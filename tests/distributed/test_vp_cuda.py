"""CUDA paths (skipped without a GPU): parity, no host synchronisation, NaN instead of raising.

On one GPU two gloo ranks can share the device (gloo all-reduces CUDA tensors through the host).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from logitkit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy  # noqa: E402
from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402

from _vp_sim import shard_bounds  # noqa: E402
from _vp_workers import launch  # noqa: E402


def _data(N=64, V=1000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, V)) * 3
    y = rng.integers(0, V, N)
    y[5] = -100
    return x, y


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
def test_single_gpu_parity_and_no_host_sync(dtype, tol):
    x, y = _data()
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0}
    xt = torch.tensor(x).to(dtype).cuda().requires_grad_()
    yt = torch.tensor(y).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        loss = vocab_parallel_cross_entropy(xt, yt, **opts)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xr = xt.detach().double().cpu().numpy()
    np.testing.assert_allclose(loss.double().item(), cross_entropy64(xr, y, **opts), rtol=tol)
    np.testing.assert_allclose(xt.grad.double().cpu().numpy(), cross_entropy_grad64(xr, y, **opts),
                               rtol=10 * tol, atol=tol * 1e-2)


def test_bad_label_gives_nan_on_gpu():
    x, y = _data()
    y[0] = 1000  # out of range [0, 1000)
    loss = vocab_parallel_cross_entropy(torch.tensor(x).cuda(), torch.tensor(y).cuda())
    assert torch.isnan(loss).item()


def test_linear_head_bf16_on_gpu():
    rng = np.random.default_rng(1)
    N, H, V = 96, 64, 500
    h, w, b = rng.normal(size=(N, H)), rng.normal(size=(V, H)) * 0.2, rng.normal(size=V)
    y = rng.integers(0, V, N)
    ht, wt, bt = (torch.tensor(a).to(torch.bfloat16).cuda().requires_grad_() for a in (h, w, b))
    loss = vocab_parallel_linear_cross_entropy(ht, wt, torch.tensor(y).cuda(), local_bias=bt, chunk_size=40,
                                               label_smoothing=0.1)
    loss.backward()
    hr, wr, br = (t.detach().double().cpu().numpy() for t in (ht, wt, bt))
    logits = hr @ wr.T + br
    np.testing.assert_allclose(loss.double().item(), cross_entropy64(logits, y, label_smoothing=0.1), rtol=2e-2)
    g = cross_entropy_grad64(logits, y, label_smoothing=0.1)
    np.testing.assert_allclose(ht.grad.double().cpu().numpy(), g @ wr, rtol=0.1, atol=2e-4)


def test_two_gloo_ranks_with_cuda_tensors(tmp_path):
    x, y = _data(N=32, V=37)
    bounds = shard_bounds([20, 17])
    opts = {"label_smoothing": 0.2, "reduction": "sum"}
    cases = [{"kind": "logits", "x": x, "y": y, "bounds": bounds, "dtype": "float32", "device": "cuda",
              "opts": opts},
             # uneven shards without vocab_start: on a GPU the loss is NaN on every rank, nothing raises
             {"kind": "error", "x": x, "y": y, "bounds": bounds, "equal": True, "device": "cuda", "opts": {}}]
    results = launch(2, str(tmp_path), cases)
    ref, g = cross_entropy64(x, y, **opts), cross_entropy_grad64(x, y, **opts)
    for rank, res in enumerate(results):
        assert all("exception" not in r for r in res), res
        s, e = bounds[rank]
        np.testing.assert_allclose(res[0]["loss"], ref, rtol=2e-6)
        np.testing.assert_allclose(res[0]["grad"], g[:, s:e], rtol=2e-5, atol=1e-7)
        assert "error" not in res[1] and np.isnan(res[1]["loss"])
