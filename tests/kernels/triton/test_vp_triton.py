"""Vocabulary-parallel CE's Triton kernels (kernels/triton/vp.py) in Triton's CPU interpreter.

``vp_partials`` / ``vp_grad`` against the stages they replace (``stages.local_partials`` /
``stages.local_grad``, computed in float64 on the same inputs), and against a float64 reference
of the full-vocabulary loss with the reductions simulated in-process over 2-3 shards of a full
logits matrix; then ``vocab_parallel_cross_entropy`` end to end through the monkeypatched
selector (``_torch._vp_kernels``): one process, the device mode (NaN for a bad label, no raise),
and three ranks on threads with the collectives through a barrier.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from logitkit._namespace import TORCH, get_namespace  # noqa: E402
from logitkit.core.logsumexp import transform  # noqa: E402
from logitkit.core.reduction import row_scales  # noqa: E402
from logitkit.distributed import _torch as vt  # noqa: E402
from logitkit.distributed import stages, vocab_parallel_cross_entropy  # noqa: E402
from logitkit.kernels.triton import vp  # noqa: E402
from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402

xp = get_namespace(TORCH)
# the interpreter evaluates both sides of the kernels' masks in NumPy (−inf − −inf and the like)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": True, "label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"temperature": 0.7},
    {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "temperature": 1.3},
]
IDS = ["plain", "smooth", "weight+smooth", "zloss", "softcap", "temp", "all"]
DTYPES = {"float64": (torch.float64, 1e-12, 1e-12), "float32": (torch.float32, 2e-6, 2e-6),
          "bfloat16": (torch.bfloat16, 2e-6, 1e-2)}     # (dtype, stats rtol, gradient rtol)


def _case(seed=0, N=5, V=50, sizes=(17, 16, 17)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    bounds = np.cumsum((0,) + tuple(sizes))
    y = torch.randint(0, V, (N,), generator=g)
    y[0] = int(bounds[1])                         # first class of shard 1 ...
    x[0] += 1e4                                   # ... in a row with a large common offset
    y[1] = -100                                   # ignored
    y[2] = int(bounds[1]) - 1                     # last class of shard 0
    y[3] = V - 1                                  # last class of the last shard ...
    x[3, V - 1] += 40.0                           # ... in a confident row: loss ~1e-17
    w = (torch.rand(V, generator=g, dtype=torch.float64) + 0.5).float().double()  # exact in float32
    return x, y, w, [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _opts(o, w):
    o = dict(o)
    if o.pop("weight", False):
        o["weight"] = w
    return o


def _stage_partials(xs, y, start, o, wl):
    """stages.local_partials in float64 on the (already rounded) inputs."""
    u = transform(xp, xs.double(), o.get("softcap"), 1.0)
    return stages.local_partials(xp, u, y, start=start, ignore_index=-100,
                                 label_smoothing=o.get("label_smoothing", 0.0),
                                 weight_local=None if wl is None else wl.double(),
                                 temperature=o.get("temperature", 1.0), stat_dtype=torch.float64)


def _kernel_partials(xs, y, start, o, wl):
    return vp.vp_partials(xs, y, start=start, ignore_index=-100, label_smoothing=o.get("label_smoothing", 0.0),
                          weight_local=wl, softcap=o.get("softcap"), temperature=o.get("temperature", 1.0))


def _close(a, b, rtol, what):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin) and torch.equal(torch.isnan(a), torch.isnan(b)), what
    err = ((a - b).abs()[fin] / b.abs()[fin].clamp_min(1e-30)).max() if fin.any() else 0.0
    assert float(err) <= rtol, (what, float(err))


def _blocks(monkeypatch, wide):
    """``wide``: 16-wide blocks, so a shard is streamed in several (two passes, persistent grid);
    ``"no-prefetch"``: the same without the next block's load issued ahead."""
    if wide:
        monkeypatch.setenv("LOGITKIT_TRITON_BLOCK", "16")
    if wide == "no-prefetch":
        monkeypatch.setenv("LOGITKIT_TRITON_PREFETCH", "0")


PARTIALS = ([(o, d, False) for o in OPTIONS for d in DTYPES]
            + [(OPTIONS[i], d, True) for i in (0, 2, 6) for d in ("float32", "bfloat16")])
PARTIAL_IDS = ([f"{i}-{d}" for i in IDS for d in DTYPES]
               + [f"blocks-{IDS[i]}-{d}" for i in (0, 2, 6) for d in ("float32", "bfloat16")])


@pytest.mark.parametrize("o,dname,wide", PARTIALS, ids=PARTIAL_IDS)
def test_partials_match_the_stage(o, dname, wide, monkeypatch):
    _blocks(monkeypatch, wide)
    dtype, rtol, _ = DTYPES[dname]
    x, y, w, shards = _case(sizes=(26, 24))
    o = _opts(o, w)
    for a, b in shards:
        xs = x[:, a:b].to(dtype)
        wl = None if o.get("weight") is None else o["weight"][a:b]
        ref = _stage_partials(xs, y, a, o, wl)
        got = _kernel_partials(xs, y, a, o, wl)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert got.m.dtype == got.zy.dtype == acc and got.t.dtype == got.c.dtype == torch.float64
        assert got.own.dtype == torch.bool and got.m.shape == got.t.shape == got.own.shape == (x.shape[0], 1)
        assert torch.equal(got.own, ref.own) and torch.equal(got.c, ref.c)
        _close(got.m, ref.m, 1e-6 if o.get("softcap") else 0.0, "m")
        _close(got.zy, ref.zy, 1e-6 if o.get("softcap") else 0.0, "zy")
        assert torch.all(got.zy[~got.own] == 0)
        _close(got.t, ref.t, rtol, "t")
        if "label_smoothing" in o:
            assert got.s.dtype == got.wsum.dtype == torch.float64 and got.wsum.shape == ()
            _close(got.s, ref.s, rtol, "s")
            _close(got.wsum, ref.wsum, 1e-15, "wsum")
        else:
            assert got.s is None and got.wsum is None


def _rows64(x, y, weight=None, label_smoothing=0.0, softcap=None, temperature=1.0):
    """Per-row loss in float64 with lse − m as log1p of the sum without the max (a confident row's
    ~1e-17 loss is exact here, unlike log_softmax's)."""
    u = x if softcap is None else softcap * np.tanh(x / softcap)
    V = x.shape[1]
    w = np.ones(V) if weight is None else weight
    out = np.zeros(x.shape[0])
    for i in range(x.shape[0]):
        if y[i] == -100:
            continue
        m = u[i].max()
        d = (m - u[i]) / temperature
        e = np.exp(-d)
        e[np.argmax(u[i])] = 0.0
        r = np.log1p(e.sum())
        out[i] = (1 - label_smoothing) * w[y[i]] * (d[y[i]] + r) + label_smoothing / V * (w @ d + w.sum() * r)
    return out


def _simulate(x, y, shards, o, dtype, reduction="mean"):
    """Every shard through the kernels, the two all-reduces summed in-process, as reduce_rows does."""
    N = x.shape[0]
    T = o.get("temperature", 1.0)
    eps = o.get("label_smoothing", 0.0)
    w = o.get("weight")
    xs = [x[:, a:b].to(dtype) for a, b in shards]
    wl = [None if w is None else w[a:b] for a, b in shards]
    parts = [_kernel_partials(s, y, a, o, wlk) for s, (a, _), wlk in zip(xs, shards, wl)]
    m = torch.stack([torch.where(torch.isnan(p.m), -math.inf, p.m).reshape(N) for p in parts]).amax(0).reshape(N, 1)
    sums = sum(torch.cat(stages.global_slots(xp, p, m, T), dim=1) for p in parts).T
    validf, wy = stages._row_weights(xp, y, w, -100, torch.float64)
    V = x.shape[1]
    wtotal = float(V) if w is None else w.sum()
    m1 = m.reshape(N).double()
    ce, r = stages.finish(xp, m1, sums, validf, wy, vocab_size=V, wtotal=wtotal, label_smoothing=eps)
    lse = m1 / T + r
    zl = o.get("z_loss", 0.0)
    g_ce, g_z = row_scales(xp, validf, wy, reduction)
    grads = [vp.vp_grad(s, y, m1, r, g_ce, g_z, start=a, vocab_size=V, wtotal=wtotal, wy=wy, validf=validf,
                        weight_local=wlk, label_smoothing=eps, z_loss=zl, softcap=o.get("softcap"),
                        temperature=T) for s, (a, _), wlk in zip(xs, shards, wl)]
    refs = [stages.local_grad(xp, s.double(), y, m1, r, g_ce, g_z, start=a, vocab_size=V, wtotal=wtotal,
                              wy=wy, validf=validf, weight_local=None if wlk is None else wlk.double(),
                              label_smoothing=eps, z_loss=zl, softcap=o.get("softcap"), temperature=T,
                              max_before_temperature=True) for s, (a, _), wlk in zip(xs, shards, wl)]
    return ce, lse, torch.cat(grads, 1), torch.cat(refs, 1)


FULL = ([(o, "float32", False) for o in OPTIONS] + [(OPTIONS[-1], "float64", False), (OPTIONS[-1], "bfloat16", False),
                                                     (OPTIONS[-1], "float32", True), (OPTIONS[2], "bfloat16", True),
                                                     (OPTIONS[-1], "float32", "no-prefetch")])
FULL_IDS = [f"{i}-float32" for i in IDS] + ["all-float64", "all-bfloat16", "blocks-all-float32",
                                             "blocks-weight+smooth-bfloat16", "blocks-no-prefetch-all-float32"]


@pytest.mark.parametrize("o,dname,wide", FULL, ids=FULL_IDS)
def test_full_vocabulary_loss_and_gradient(o, dname, wide, monkeypatch):
    _blocks(monkeypatch, wide)
    dtype, rtol, grtol = DTYPES[dname]
    x, y, w, shards = _case(seed=1)
    o = _opts(o, w)
    ce, lse, dx, dx_stage = _simulate(x, y, shards, o, dtype)
    assert dx.dtype == dtype and dx.shape == x.shape
    xr = x.to(dtype).double().numpy()
    ref_o = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in o.items() if k != "z_loss"}
    ref = _rows64(xr, y.numpy(), **ref_o)
    # per-row cross-entropy within the float32 contract, the confident row's ~1e-17 loss included
    np.testing.assert_allclose(ce.numpy(), ref, rtol=max(rtol, 1e-12), atol=0)
    assert ce[1] == 0
    full_o = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in o.items()}
    g = cross_entropy_grad64(xr, y.numpy(), **full_o)
    scale = np.abs(g).max()
    np.testing.assert_allclose(dx.double().numpy(), g, rtol=grtol, atol=grtol * 1e-2 * scale)
    np.testing.assert_allclose(dx.double().numpy(), dx_stage.double().numpy(), rtol=grtol,
                               atol=grtol * 1e-2 * scale)
    assert torch.all(dx[1] == 0)


@pytest.mark.parametrize("wide", [False, True], ids=["one-block", "blocks"])
def test_non_finite_rows_and_empty_shard(wide, monkeypatch):
    _blocks(monkeypatch, wide)
    x = torch.randn(5, 12, dtype=torch.float32)
    x[0, 3] = float("nan")
    x[1, :] = -math.inf                           # all masked (ignored below)
    x[2, 4:] = -math.inf                          # partly masked
    x[3, 5] = math.inf
    y = torch.tensor([1, -100, 2, 0, 7])
    for o in ({}, {"label_smoothing": 0.1}, {"temperature": 0.5}):   # (a softcap makes ±inf finite)
        ref = _stage_partials(x, y, 0, o, None)
        got = _kernel_partials(x, y, 0, o, None)
        assert torch.isnan(got.m[0]) and torch.isnan(got.t[0]) and torch.isnan(ref.m[0])
        assert got.m[1] == -math.inf and got.t[1] == 0 and got.c[1] == 0
        for f in ("m", "t", "zy"):
            _close(getattr(got, f)[2:], getattr(ref, f)[2:].to(getattr(got, f).dtype), 2e-6, f)
        ce, lse, dx, _ = _simulate(x.double(), y, [(0, 6), (6, 12)], o, torch.float32)
        assert torch.isnan(ce[0]) and torch.isnan(ce[3]) and ce[1] == 0 and torch.isfinite(ce[4])
        # smoothing puts weight on the masked classes of row 2: an infinite loss, not NaN
        assert ce[2] == math.inf if "label_smoothing" in o else torch.isfinite(ce[2])
        assert torch.all(dx[1] == 0) and torch.isfinite(dx[2]).all()
        if "label_smoothing" not in o:
            assert torch.all(dx[2, 4:] == 0)
    empty = vp.vp_partials(torch.zeros(3, 0), torch.tensor([0, 1, 2]), start=5, ignore_index=-100)
    assert torch.all(empty.m == -math.inf) and torch.all(empty.t == 0) and torch.all(empty.c == 0)


def test_gradient_in_place():
    x, y, w, _ = _case(seed=2, sizes=(50,))
    x32 = x.float()
    validf, wy = stages._row_weights(xp, y, None, -100, torch.float64)
    p = _kernel_partials(x32, y, 0, {}, None)
    m = p.m.reshape(-1).double()
    r = torch.log1p(p.t.reshape(-1) + p.c.reshape(-1) - 1)
    g_ce, g_z = row_scales(xp, validf, wy, "sum")
    kw = dict(start=0, vocab_size=50, wtotal=50.0, wy=wy, validf=validf)
    fresh = vp.vp_grad(x32, y, m, r, g_ce, g_z, **kw)
    buf = x32.clone()
    out = vp.vp_grad(buf, y, m, r, g_ce, g_z, out=buf, **kw)
    assert out is buf and torch.equal(buf, fresh)


# ----------------------------------------------------------------------------------------------
# end to end through vocab_parallel_cross_entropy, the Triton route forced by the selector


@pytest.fixture
def triton_route(monkeypatch):
    used = []
    lock = threading.Lock()       # the interpreter is not thread-safe: one kernel at a time

    class Route:
        @staticmethod
        def vp_partials(*a, **k):
            used.append("partials")
            with lock:
                return vp.vp_partials(*a, **k)

        @staticmethod
        def vp_grad(*a, **k):
            used.append("grad")
            with lock:
                return vp.vp_grad(*a, **k)

    monkeypatch.setattr(vt, "_vp_kernels", lambda x: Route)
    return used


def test_selector_sends_cpu_tensors_to_the_stages():
    assert vt._vp_kernels(torch.zeros(2, 3)) is None


@pytest.mark.parametrize("dname", ["float64", "float32", "bfloat16", "float16"])
def test_end_to_end_one_process(triton_route, dname):
    dtype, rtol, grtol = DTYPES.get(dname, (torch.float16, 2e-6, 2e-3))
    x, y, w, _ = _case(seed=3)
    o = {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0, "temperature": 0.9}
    xt = x.to(dtype).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(xt, y, **o)
    loss.backward()
    assert triton_route == ["partials", "grad"]
    xr = x.to(dtype).double().numpy()
    on = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in o.items()}
    np.testing.assert_allclose(loss.double().item(), cross_entropy64(xr, y.numpy(), **on),
                               rtol=max(rtol, 1e-12) if dtype in (torch.float32, torch.float64) else 1e-2)
    g = cross_entropy_grad64(xr, y.numpy(), **on)
    np.testing.assert_allclose(xt.grad.double().numpy(), g, rtol=grtol, atol=grtol * 1e-2 * np.abs(g).max())


def test_device_mode_bad_label_gives_nan(triton_route, monkeypatch):
    monkeypatch.setattr(vt, "_host_mode", lambda x: False)
    x, y, _, _ = _case(seed=4)
    good = vocab_parallel_cross_entropy(x, y)
    np.testing.assert_allclose(good.item(), cross_entropy64(x.numpy(), y.numpy()), rtol=1e-12)
    bad = y.clone()
    bad[0] = 50
    assert torch.isnan(vocab_parallel_cross_entropy(x, bad))   # no raise, no host read of the flag
    assert triton_route == ["partials", "partials"]


def test_end_to_end_three_ranks_on_threads(triton_route, monkeypatch):
    """Three ranks, each with its shard, the collectives summed / maxed across threads."""
    import sys
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "distributed"))
    from _vp_sim import ThreadGroup

    P = 3
    x, y, w, shards = _case(seed=5)
    group = ThreadGroup(P)
    local = threading.local()

    def init(self, group=None):
        self.active, self.group, self.rank, self.size = True, None, local.rank, P

    def coll(op):
        def f(self, t):
            out = group._collective(self.rank, op, t.detach().numpy())
            t.copy_(torch.from_numpy(out))
            return t
        return f

    monkeypatch.setattr(vt.TorchCollectives, "__init__", init)
    monkeypatch.setattr(vt.TorchCollectives, "all_reduce_max", coll("max"))
    monkeypatch.setattr(vt.TorchCollectives, "all_reduce_sum", coll("sum"))
    o = {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-3, "temperature": 0.8}
    results, errors = [None] * P, [None] * P

    def rank_fn(rank):
        try:
            local.rank = rank
            a, b = shards[rank]
            xs = x[:, a:b].float().requires_grad_()
            loss = vocab_parallel_cross_entropy(xs, y, vocab_start=a, **o)
            loss.backward()
            results[rank] = (loss.detach(), xs.grad)
        except BaseException as e:  # noqa: BLE001
            errors[rank] = e
            group.barrier.abort()

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for e in errors:
        if e is not None:
            raise e
    on = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in o.items()}
    xr = x.float().double().numpy()
    ref = cross_entropy64(xr, y.numpy(), **on)
    for loss, _ in results:
        np.testing.assert_allclose(loss.double().item(), ref, rtol=2e-6)
    g = cross_entropy_grad64(xr, y.numpy(), **on)
    got = torch.cat([gr for _, gr in results], 1).double().numpy()
    np.testing.assert_allclose(got, g, rtol=2e-5, atol=1e-7 * np.abs(g).max())
    assert triton_route.count("partials") == P and triton_route.count("grad") == P


# ----------------------------------------------------------------------------------------------
# the kernels lower to sm_90 code (the interpreter never does): Triton's LLVM and ptxas, no GPU

_SM90 = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
import torch
from _sm90_compile import compile_sm90, t
from logitkit.kernels.triton import ce as C, vp as P
f32, f64, i64 = torch.float32, torch.float64, torch.int64
for dt, n, allo in ((torch.bfloat16, 16032, False), (torch.float32, 32768, True)):
    block, warps, single = C._config(n, t(dt).element_size(), "ce", dt)
    x = t(dt)
    fa = dict(X=x, LABELS=t(i64), WEIGHT=t(f32), M_OUT=t(f32), T_OUT=t(f64), ZY_OUT=t(f32), S_OUT=t(f64),
              stride_x=n, N=8192, n=n, start=16032, ignore_index=-100, cap_hi=30.0, cap_lo=0.0, t_hi=0.7,
              t_lo=1e-9, it_hi=1.4, it_lo=0.0, trel=1e-9)
    opts = dict(HAS_WEIGHT=allo, HAS_SMOOTH=allo, HAS_SOFTCAP=allo, HAS_TEMP=allo, IS_F64=False)
    compile_sm90(P._vp_fwd_kernel, fa, dict(opts, SINGLE=single, BLOCK=block, PREFETCH=True,
                                            EV_KEEP="evict_last", EV_DROP="evict_first"), warps)
    print("ok fwd", dt, single, flush=True)
    ba = dict(X=x, OUT=x, LABELS=t(i64), WEIGHT=t(f32), M_IN=t(f64), R_IN=t(f64), GCE=t(f64), GZ=t(f64), WY=t(f64),
              VALIDF=t(f64), SC=t(f64), stride_x=n, stride_o=n, N=8192, n=n, start=16032, eps_hi=0.1, eps_lo=0.0,
              zl_hi=0.1, zl_lo=0.0, cap_hi=30.0, cap_lo=0.0, it_hi=1.4, it_lo=0.0)
    compile_sm90(P._vp_bwd_kernel, ba, dict(opts, HAS_ZLOSS=allo, BLOCK=block, EV_DROP="evict_first"), warps)
    print("ok bwd", dt, flush=True)
'''


def test_kernels_compile_for_sm90():
    import importlib.util
    import os
    import subprocess
    import sys

    try:
        if importlib.util.find_spec("triton.backends.nvidia") is None:
            pytest.skip("triton without its NVIDIA backend")
    except ModuleNotFoundError:
        pytest.skip("triton without its NVIDIA backend")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(here))), "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SM90, here], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.stdout.split().count("ok") == 4, proc.stdout
