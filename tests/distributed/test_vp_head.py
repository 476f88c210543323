"""logitkit.distributed.vocab_parallel_linear_head (torch) and jax_vocab_parallel_linear_head against
the single-process head and float64.

Torch on P ranks three ways: threads in this process with the collectives through a barrier
(``_vp_sim.ThreadGroup``, many cases in little time), torch.distributed with gloo on 2 and 4
ranks (one spawned launch each, every case batched in it), and no process group at all; JAX
under shard_map on 4 host devices in one child process (two cases, one compilation each). Each
case is compared with ``logitkit.linear_head`` on the full head (same dtype) and with a float64
torch reference that materializes the logits (gradients by autograd), for the outputs and for
``d/d hidden``, ``d/d local_weight``, ``d/d local_bias`` under random cotangents of every output;
the collectives of each call are counted against the docstring's table of bytes per token.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from logitkit.distributed import _torch_head, vocab_parallel_linear_head  # noqa: E402

from _vp_head_cases import (ALL, compare, expected_collectives, make_case, reference64,  # noqa: E402
                            reference_linear_head, run_rank)
from _vp_sim import run_ranks  # noqa: E402

pytestmark = pytest.mark.timeout(400)  # the gloo launches kill their ranks after 150 s each

U2, U4, Z4 = [7, 12], [5, 1, 9, 3], [5, 0, 9, 6]   # uneven shards; Z4 has an empty one
KL = ALL + ("kl",)

CASES = {
    # each output alone
    "loss": ([7, 12], ("loss",), {}, {}),
    "logprobs": (U2, ("logprobs",), {}, {}),
    "entropy": (U2, ("entropy",), {}, {}),
    "lse": (U2, ("lse",), {}, {}),
    "argmax": (U4, ("argmax",), {}, {}),
    "kl": (U2, ("kl",), {}, {"teacher": "head"}),
    # every option, 2 and 4 ranks
    "all-smooth-weight-zloss": (U4, ALL, {"label_smoothing": 0.1, "z_loss": 1e-2}, {"weight": True}),
    "all-softcap-T-none": (Z4, ALL, {"softcap": 3.0, "temperature": 0.7, "reduction": "none"}, {}),
    "all-sum-ignore2": (U2, ALL, {"reduction": "sum", "ignore_index": 2}, {}),
    "all-num-items": (U4, ALL, {"num_items_in_batch": 13, "z_loss": 1e-3}, {}),
    "per-token-T": (U4, ALL, {"softcap": 5.0}, {"per_token_temp": True}),
    "3d": (U2, ALL, {"label_smoothing": 0.2}, {"lead": (3, 4), "chunk": 5}),
    "equal-shards": ([8, 8], ALL, {}, {"equal": True, "chunk": 1}),
    "default-chunk": (U2, ("loss", "logprobs", "entropy"), {}, {"chunk": None}),
    # teacher forms and divergences
    "head-kl": (U4, KL, {"teacher_temperature": 1.5}, {"teacher": "head"}),
    "logits-reverse": (Z4, KL, {"divergence": "reverse_kl"}, {"teacher": "logits"}),
    "head-jsd": (U2, KL, {"divergence": "jsd", "beta": 0.3}, {"teacher": "head"}),
    "logits-jsd-T": (U4, ("entropy", "kl"), {"divergence": "jsd", "beta": 0.6, "softcap": 4.0},
                     {"teacher": "logits", "per_token_temp": True}),
    "jsd-beta0": (U2, ("loss", "kl"), {"divergence": "jsd", "beta": 0.0}, {"teacher": "logits"}),
    "jsd-beta1": (U2, ("loss", "kl"), {"divergence": "jsd", "beta": 1.0}, {"teacher": "head"}),
    "topk-kl": (U4, KL, {"teacher_temperature": 2.0, "label_smoothing": 0.1}, {"teacher": "topk", "k": 4}),
    "topk-jsd-3d": (Z4, KL, {"divergence": "jsd", "beta": 0.4}, {"teacher": "topk", "lead": (2, 5)}),
    # no labels: entropy, lse, argmax, kl
    "no-labels": (U4, ("entropy", "lse", "argmax", "kl"), {}, {"teacher": "logits", "labels": False}),
}


def _case(name, dtype="float64", seed=None):
    sizes, outs, opts, kw = CASES[name]
    kw = dict(kw)
    return make_case(sizes, outs, opts, dtype=dtype, seed=seed if seed is not None else zlib.crc32(name.encode()), **kw)


class _SimComm:
    """TorchCollectives over a ThreadGroup (NumPy buffers), one per rank thread."""

    def __init__(self, rank, group):
        self.rank, self.size, self.active, self.group, self.g = rank, group.size, True, None, group

    def all_reduce_max(self, t):
        return torch.from_numpy(self.g._collective(self.rank, "max", t.detach().numpy()))

    def all_reduce_sum(self, t):
        return torch.from_numpy(self.g._collective(self.rank, "sum", t.detach().numpy()))


@pytest.fixture
def sim(monkeypatch):
    """Run a case on threads: ``group`` is each rank's :class:`_SimComm`."""
    real = _torch_head.TorchCollectives
    monkeypatch.setattr(_torch_head, "TorchCollectives", lambda group: group if isinstance(group, _SimComm)
                        else real(group))

    def run(c, fn=None):
        fn = fn or (lambda rank, g: run_rank(c, rank, _SimComm(rank, g)))
        return run_ranks(len(c["sizes"]), fn)

    return run


def _merge(results):
    """Rank 0's outputs (every rank must agree) and the gathered head gradients."""
    out = dict(results[0])
    for r in results[1:]:
        for k in ALL + ("kl", "dh"):
            a, b = out.get(k), r.get(k)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14, err_msg=k)
    if out.get("dw") is not None:
        out["dw"] = np.concatenate([r["dw"] for r in results])
        out["db"] = np.concatenate([r["db"] for r in results])
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_matches_linear_head_and_reference(sim, name):
    c = _case(name)
    results, group = sim(c)
    got = _merge(results)
    compare(got, reference_linear_head(c), atol=1e-11, rtol=1e-10, what=f"{name} vs linear_head")
    compare(got, reference64(c), atol=1e-10, rtol=1e-9, what=f"{name} vs float64 reference")
    # the collectives: what the docstring's table says (the sim records (op, numel, bytes))
    want = expected_collectives(c, len(c["sizes"]))
    calls = [(op.upper(), numel) for op, numel, _ in group.calls]
    has_grad = got.get("dh") is not None
    assert calls == [(op, n) for _, op, n in want["fwd"]] + ([("SUM", n) for _, _, n in want["bwd"]] if has_grad
                                                             else [])


@pytest.mark.parametrize("name", ["all-smooth-weight-zloss", "per-token-T", "head-kl", "logits-reverse",
                                  "head-jsd", "topk-jsd-3d", "no-labels"])
def test_float32_against_float64(sim, name):
    c = _case(name, "float32")
    results, _ = sim(c)
    got = _merge(results)
    want = reference64(c)
    # per-token values: the DESIGN.md contract for loss / logprobs / lse (2^-21 relative); entropy
    # and kl within 1e-6 absolute
    for k, tol in (("logprobs", 2.0 ** -21), ("lse", 2.0 ** -21)):
        if got[k] is not None:
            np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=1e-7, err_msg=k)
    if got["loss"] is not None:
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=2.0 ** -21, atol=1e-7)
    # (kl values of 5-9 here: their float32 rounding alone is up to 4.8e-7; the single-process
    # head is off by the same 1.1e-6 on those rows, hence one float32 ulp of the value beyond 1e-6)
    for k in ("entropy", "kl"):
        if got[k] is not None:
            np.testing.assert_allclose(got[k], want[k], rtol=2.0 ** -22, atol=1e-6, err_msg=k)
    if got["argmax"] is not None:
        assert np.array_equal(got["argmax"], want["argmax"])
    _close_grads(got, want, 2e-6, name)
    # and the single-process head in float32 agrees as closely
    lh = reference_linear_head(c)
    compare(got, lh, atol=2e-6, rtol=2e-6, what=f"{name} float32 vs linear_head", grads=False)
    _close_grads(got, lh, 2e-6, name + " vs linear_head")


def _close_grads(got, want, rel, what):
    """Gradients within ``rel`` of the largest element (float32 sums of products of ~1 values)."""
    for k in ("dh", "dw", "db"):
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=rel * np.abs(want[k]).max(), err_msg=f"{what}: {k}")


def test_bfloat16_inputs(sim):
    c = _case("head-kl", "bfloat16")
    got = _merge(sim(c)[0])
    want = reference64(c)    # from the same bfloat16-rounded inputs
    for k in ("loss", "logprobs", "entropy", "lse", "kl"):
        np.testing.assert_allclose(got[k], want[k], rtol=2e-2, atol=2e-2, err_msg=k)
    for k in ("dh", "dw", "db"):
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=3e-2 * np.abs(want[k]).max(), err_msg=k)


def test_confident_rows_and_ties(sim):
    # confident rows (loss ~1e-13) whose maximum is on either rank, a maximum tied across ranks
    # (argmax: the lowest global index), an ignored row
    c = make_case(U2, ALL, {}, lead=(6,), seed=3, ignore=(5,))
    c["h"] = np.eye(6, 5) * 40.0
    c["w"][:] = 0.0
    c["w"][2, 0] = c["w"][15, 1] = 1.0          # row 0: class 2 (rank 0); row 1: class 15 (rank 1)
    c["w"][4, 2] = c["w"][9, 2] = 1.0           # row 2: tie between class 4 (rank 0) and 9 (rank 1)
    c["w"][10, 3] = c["w"][12, 3] = 1.0         # row 3: tie inside rank 1
    c["b"][:] = 0.0
    c["y"] = np.array([2, 15, 4, 12, 0, -100])
    got = _merge(sim(c)[0])
    compare(got, reference64(c), atol=1e-13, rtol=1e-9, what="confident rows", grads=True)
    compare(got, reference_linear_head(c), atol=1e-20, rtol=1e-12, what="confident rows vs linear_head")
    assert list(got["argmax"]) == [2, 15, 4, 10, 0, 0]
    # rows 0 and 1: one logit 40, 18 logits 0: log p = −r, r = log1p(18 e^-40), entropy
    # r + 18·40·e^-40 / (1 + 18 e^-40) (float64 logsumexp rounds r away against 40: exact formulas)
    t = 18 * np.exp(-40.0)
    r = np.log1p(t)
    for i in (0, 1):
        np.testing.assert_allclose(got["logprobs"][i], -r, rtol=1e-13)
        np.testing.assert_allclose(got["entropy"][i], r + 40.0 * t / (1 + t), rtol=1e-13)


def test_nan_row_and_ignored_rows_give_exact_zeros(sim):
    c = make_case(U2, KL, {}, teacher="logits", lead=(5,), seed=4, ignore=(1, 3))
    c["h"][0, 0] = np.nan                     # row 0: NaN on every rank
    c["tl"][4, 2] = np.nan                    # row 4: the teacher's NaN on rank 0 only
    results, _ = sim(c)
    got = _merge(results)
    for k in ("logprobs", "entropy", "lse", "kl"):
        assert np.isnan(got[k][0]), k
        assert got[k][1] == 0 and got[k][3] == 0, k
        assert np.isfinite(got[k][2]), k
    assert np.isnan(got["kl"][4]) and np.isfinite(got["entropy"][4])
    assert np.all(np.isnan(got["dh"][0])) and np.all(np.isnan(got["dh"][4]))
    assert np.all(got["dh"][[1, 3]] == 0) and np.all(np.isfinite(got["dh"][2]))


def test_ranks_that_disagree_raise_the_same_error_everywhere(sim, monkeypatch):
    c = _case("per-token-T")
    temps = [c["temp"], c["temp"] * 1.0001, c["temp"], c["temp"]]

    def fn(rank, g):
        s, e = c["bounds"][rank]
        try:
            vocab_parallel_linear_head(torch.tensor(c["h"]), torch.tensor(c["w"][s:e]), torch.tensor(c["y"]),
                                       group=_SimComm(rank, g), vocab_start=s, outputs=("loss", "entropy"),
                                       temperature=torch.tensor(temps[rank]))
        except ValueError as exc:
            return str(exc)
        return None

    msgs = run_ranks(4, fn)[0]
    assert msgs[0] is not None and all(m == msgs[0] for m in msgs) and "different" in msgs[0]

    def fn2(rank, g):
        s, e = c["bounds"][rank]
        try:
            vocab_parallel_linear_head(torch.tensor(c["h"]), torch.tensor(c["w"][s:e]), torch.tensor(c["y"]),
                                       group=_SimComm(rank, g), vocab_start=s,
                                       outputs=("loss", "entropy") if rank != 2 else ("loss",))
        except ValueError as exc:
            return str(exc)
        return None

    msgs = run_ranks(4, fn2)[0]
    assert msgs[0] is not None and all(m == msgs[0] for m in msgs) and "kind" in msgs[0]

    def fn3(rank, g):  # a top-k class out of the global range [0, V) on every rank
        s, e = c["bounds"][rank]
        idx = torch.tensor(np.stack([np.arange(3)] * 9))
        idx[4, 1] = 18
        try:
            vocab_parallel_linear_head(torch.tensor(c["h"]), torch.tensor(c["w"][s:e]), torch.tensor(c["y"]),
                                       group=_SimComm(rank, g), vocab_start=s, outputs=("kl",),
                                       teacher_topk=(idx, torch.zeros(9, 3, dtype=torch.float64)))
        except ValueError as exc:
            return str(exc)
        return None

    msgs = run_ranks(4, fn3)[0]
    assert all(m == msgs[0] for m in msgs) and "teacher_topk indices: 18 is out of range [0, 18)" in msgs[0]


def test_device_mode_header_in_the_max_tail(sim, monkeypatch):
    """What CUDA tensors run (no host synchronisation): the header's table rides in the tail of the
    per-token MAX, after the teacher's max and the argmax key; a failed check gives NaN values."""
    from logitkit.distributed import _torch

    monkeypatch.setattr(_torch, "_host_mode", lambda x: False)
    c = _case("head-kl")
    results, group = sim(c)
    got = _merge(results)
    compare(got, reference_linear_head(c), atol=1e-11, rtol=1e-10, what="device mode")
    want = expected_collectives(c, 4)["fwd"]
    calls = [(op.upper(), numel) for op, numel, _ in group.calls]
    # no header all-reduce of its own: its 20·P cells (no message) follow the 3·N per-token maxima
    assert calls[:2] == [("MAX", want[1][2] + 80), ("SUM", want[2][2])], calls
    # ranks that disagree on the labels: NaN everywhere, no exception, no rank left waiting
    def fn(rank, g):
        s, e = c["bounds"][rank]
        y = torch.tensor(c["y"])
        if rank == 3:
            y = (y + 1) % 18
        out = vocab_parallel_linear_head(torch.tensor(c["h"]), torch.tensor(c["w"][s:e]), y, group=_SimComm(rank, g),
                                         vocab_start=s, outputs=KL, teacher_logits=torch.tensor(c["w"][s:e].T[:1]).
                                         expand(9, e - s).contiguous())
        return out

    outs = run_ranks(4, fn)[0]
    rows = torch.arange(9) != 2          # row 2 is ignored on ranks 0-2 (0 there, as every ignored row)
    for out in outs:
        assert torch.isnan(out.loss)
        for k in ("logprobs", "entropy", "lse", "kl"):
            assert torch.isnan(getattr(out, k)[rows]).all(), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_one_process_device_mode():
    """CUDA tensors take the device path (the header in the MAX tail) even without a group."""
    c = _case("head-kl")
    c["sizes"], c["bounds"] = [18], [(0, 18)]
    dev = torch.device("cuda")
    t = lambda a: torch.tensor(a).to(dev)  # noqa: E731
    h, w, b = (t(c[k]).requires_grad_() for k in ("h", "w", "b"))
    kw = dict(outputs=KL, teacher_hidden=t(c["th"]), teacher_weight=t(c["tw"]), teacher_bias=t(c["tb"]),
              teacher_temperature=1.5)
    out = vocab_parallel_linear_head(h, w, t(c["y"]), local_bias=b, chunk_size=4, **kw)
    (out.loss + out.entropy.sum() + out.kl.sum()).backward()
    got = {"dh": h.grad.cpu().numpy(), "dw": w.grad.cpu().numpy()}
    import logitkit

    h2, w2, b2 = (t(c[k]).requires_grad_() for k in ("h", "w", "b"))
    ref = logitkit.linear_head(h2, w2, t(c["y"]), linear_bias=b2, **kw)
    (ref.loss + ref.entropy.sum() + ref.kl.sum()).backward()
    for k in ("loss", "logprobs", "entropy", "lse", "kl"):
        np.testing.assert_allclose(getattr(out, k).cpu().numpy(), getattr(ref, k).cpu().numpy(), rtol=1e-10,
                                   atol=1e-11, err_msg=k)
    assert torch.equal(out.argmax, ref.argmax)
    np.testing.assert_allclose(got["dh"], h2.grad.cpu().numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(got["dw"], w2.grad.cpu().numpy(), rtol=1e-10, atol=1e-11)


def test_one_process_and_reduce_hidden_grad(sim):
    # no process group: linear_head itself
    c = _case("head-kl")
    c["sizes"], c["bounds"] = [18], [(0, 18)]
    got = run_rank(c, 0, None)
    compare(got, reference_linear_head(c), atol=1e-11, rtol=1e-10, what="one process")
    # reduce_hidden_grad=False: each rank's partial d/d hidden, which sum to the full one
    c = _case("all-smooth-weight-zloss")

    def fn(rank, g):
        s, e = c["bounds"][rank]
        h = torch.tensor(c["h"]).requires_grad_()
        out = vocab_parallel_linear_head(h, torch.tensor(c["w"][s:e]), torch.tensor(c["y"]), group=_SimComm(rank, g),
                                         vocab_start=s, outputs=("loss", "entropy"), reduce_hidden_grad=False)
        (out.loss + out.entropy.sum()).backward()
        return h.grad.numpy()

    parts, group = run_ranks(4, fn)
    h = torch.tensor(c["h"]).requires_grad_()
    import logitkit

    ref = logitkit.linear_head(h, torch.tensor(c["w"]), torch.tensor(c["y"]), outputs=("loss", "entropy"))
    (ref.loss + ref.entropy.sum()).backward()
    np.testing.assert_allclose(sum(parts), h.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert all(op == "max" or numel != c["h"].size for op, numel, _ in group.calls)   # no dh all-reduce


def test_argument_errors_name_the_argument():
    h, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 5])
    f = vocab_parallel_linear_head
    with pytest.raises(ValueError, match="outputs: expected distinct names"):
        f(h, w, y, outputs=("loss", "nll"))
    with pytest.raises(ValueError, match="labels: outputs"):
        f(h, w, None, outputs=("logprobs",))
    with pytest.raises(ValueError, match="teacher_logits: a teacher is given but 'kl'"):
        f(h, w, y, outputs=("loss",), teacher_logits=torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="outputs: 'kl' needs a teacher"):
        f(h, w, y, outputs=("kl",))
    with pytest.raises(ValueError, match=r"teacher_weight: expected this rank's rows of the teacher head, shape \(6, 2\)"):
        f(h, w, y, outputs=("kl",), teacher_hidden=torch.randn(4, 2, dtype=torch.float64),
          teacher_weight=torch.randn(12, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"teacher_logits: expected this rank's classes, shape \(4, 6\)"):
        f(h, w, y, outputs=("kl",), teacher_logits=torch.randn(4, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"temperature: expected shape \(4,\)"):
        f(h, w, y, outputs=("loss", "entropy"), temperature=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature: expected finite values > 0"):
        f(h, w, y, outputs=("loss", "entropy"), temperature=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    topk = (torch.tensor([[0, 1]] * 4), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="divergence: 'reverse_kl' is infinite against a top-k teacher"):
        f(h, w, y, outputs=("kl",), teacher_topk=topk, divergence="reverse_kl")
    with pytest.raises(ValueError, match="teacher_topk indices: row 2 repeats a class"):
        f(h, w, y, outputs=("kl",), teacher_topk=(torch.tensor([[0, 1], [0, 1], [3, 3], [0, 1]]), topk[1]))
    with pytest.raises(ValueError, match=r"teacher_topk indices: 6 is out of range \[0, 6\)"):
        f(h, w, y, outputs=("kl",), teacher_topk=(torch.tensor([[0, 1], [0, 6], [3, 2], [0, 1]]), topk[1]))
    with pytest.raises(ValueError, match="num_items_in_batch: applies to the 'loss' output with reduction='mean'"):
        f(h, w, y, outputs=("loss",), reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="divergence: expected one of"):
        f(h, w, y, outputs=("kl",), teacher_topk=topk, divergence="js")
    with pytest.raises(ValueError, match=r"beta: expected a value in \[0, 1\]"):
        f(h, w, y, outputs=("kl",), teacher_topk=topk, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="local_weight: expected shape"):
        f(h, torch.randn(6, 4, dtype=torch.float64), y)
    with pytest.raises(ValueError, match="labels: 6 is out of range|labels: .*out of range"):
        f(h, w, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="chunk_size: expected None or an int >= 1"):
        f(h, w, y, chunk_size=0)


def test_jax_arrays_are_refused_naming_the_binding():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="hidden: got JAX arrays.*jax_vocab_parallel_linear_head"):
        vocab_parallel_linear_head(jnp.zeros((2, 3)), jnp.zeros((4, 3)), jnp.zeros(2, dtype=jnp.int32))


# ----------------------------------------------------------------------------------------------
# torch.distributed with gloo: 2 and 4 ranks, one launch each

if torch.distributed.is_available() and torch.distributed.is_gloo_available():
    # (the threads above run every case; these check the same maths over real process groups)
    GLOO = {2: ["all-sum-ignore2", "3d", "head-jsd"],
            4: ["all-smooth-weight-zloss", "head-kl", "logits-reverse", "topk-jsd-3d"]}
else:
    GLOO = {}


@pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("world", [2, 4])
def test_gloo(tmp_path, world):
    from _vp_head_workers import launch

    cases = []
    for name in GLOO[world]:
        dtype = "float32" if name in ("head-kl", "3d") else "float64"
        c = _case(name, dtype)
        assert len(c["sizes"]) == world, name
        c["name"] = name
        cases.append(c)
    # one rank passes another per-token temperature: every rank raises the same error, promptly
    c0 = _case("per-token-T" if world == 4 else "all-sum-ignore2")
    temp = np.ones(9)
    per_rank = [{"outputs": ("loss", "entropy"), "temperature": torch.tensor(temp if r else temp * 2)}
                for r in range(world)]
    cases.append({"kind": "error", "h": c0["h"], "w": c0["w"], "y": c0["y"], "bounds": c0["bounds"],
                  "per_rank": per_rank})
    results = launch(world, str(tmp_path), cases)
    for r in range(world):
        for res in results[r]:
            assert "exception" not in res, res.get("exception")
    for i, c in enumerate(cases[:-1]):
        per_rank_results = [results[r][i] for r in range(world)]
        got = _merge(per_rank_results)
        what = f"gloo {world}: {c['name']}"
        if c["dtype"] == "float64":
            compare(got, reference_linear_head(c), atol=1e-11, rtol=1e-10, what=what)
            compare(got, reference64(c), atol=1e-10, rtol=1e-9, what=what + " vs float64")
        else:
            for ref in (reference_linear_head(c), reference64(c)):
                compare(got, ref, atol=2e-6, rtol=2e-6, what=what, grads=False)
                _close_grads(got, ref, 2e-6, what)
        want = expected_collectives(c, world)
        for res in per_rank_results:
            assert [(n, op, k) for n, op, k, _ in res["fwd"]] == want["fwd"], (c["name"], res["fwd"])
            assert [(n, op, k) for n, op, k, _ in res["bwd"]] == want["bwd"], (c["name"], res["bwd"])
            # float32 scalars for 16/32-bit inputs (float64 for float64): the documented bytes per token
            per_scalar = 4 if c["dtype"] != "float64" else 8
            N = np.prod(c["lead"])
            token_bytes = sum(nb for _, _, k, nb in res["fwd"][1:]) / N
            assert token_bytes == want["per_token_bytes"] * per_scalar // 4, (c["name"], token_bytes)
            assert res["bwd"][0][3] == N * c["h"].shape[-1] * per_scalar
    errs = [results[r][-1] for r in range(world)]
    assert all(e["error"] is not None and e["error"] == errs[0]["error"] for e in errs), errs
    assert "different" in errs[0]["error"]


@pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available")
def test_torchrun_example_two_processes():
    """examples/vocab_parallel_head_torchrun.py as a user runs it (torchrun --standalone, gloo)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "vocab_parallel_head_torchrun.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(example)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=example.parent, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun example did not finish in 150 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert out.count("-> matches") == 2 and "step 0  objective" in out, out[-4000:]


# ----------------------------------------------------------------------------------------------
# JAX under shard_map on 4 host devices, in one child process (XLA_FLAGS before jax loads)


def _jax_cases():
    # every option at once, a dense teacher head with the JSD (the second pass), a per-token
    # temperature, 3-D inputs, a vocabulary of 18 padded to 4 devices of 5 classes
    a = make_case([5, 5, 5, 3], KL, {"label_smoothing": 0.1, "z_loss": 1e-2, "divergence": "jsd", "beta": 0.3,
                                     "softcap": 4.0}, teacher="head", weight=True, per_token_temp=True, lead=(3, 3),
                  chunk=4, seed=11)
    a["pad"] = 2
    # no labels, a top-k teacher, float32, the default chunk
    b = make_case([5, 5, 5, 5], ("entropy", "lse", "argmax", "kl"), {"divergence": "jsd", "beta": 0.4,
                                                                   "teacher_temperature": 1.5},
                  teacher="topk", labels=False, dtype="float32", chunk=None, seed=12, k=4)
    return [a, b]


def test_jax_shard_map(tmp_path):
    pytest.importorskip("jax")
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    cases = _jax_cases()
    with open(tmp_path / "cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    child = Path(__file__).parent / "_vp_head_jax_child.py"
    proc = subprocess.run([sys.executable, str(child), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "results.pkl", "rb") as f:
        results = pickle.load(f)
    for c, got in zip(cases, results):
        what = f"jax {c['outputs']} {c['teacher']} {c['dtype']}"
        if c["dtype"] == "float64":
            compare(got, reference_linear_head(c), atol=1e-11, rtol=1e-10, what=what)
            compare(got, reference64(c), atol=1e-10, rtol=1e-9, what=what + " vs float64")
        else:
            for ref in (reference_linear_head(c), reference64(c)):
                compare(got, ref, atol=2e-6, rtol=2e-6, what=what, grads=False)
                _close_grads(got, ref, 2e-6, what)
        assert np.all(got["pad_dw"] == 0) and np.all(got["pad_db"] == 0)
        # the collectives of the forward: the torch binding's, with the header (F·P = 80 scalars)
        # in the tail of the per-token MAX
        want = expected_collectives(c, 4)["fwd"]
        found = [(name.split("_")[0], int(np.prod(shape))) for name, shape, _ in got["fwd"]]   # psum_invariant
        expect = [("pmax", want[1][2] + 80), ("psum", want[2][2])] + [
            ("pmax" if op == "MAX" else "psum", k) for _, op, k in want[3:]]
        assert found == expect, (what, found, expect)


def test_jax_argument_errors_name_the_argument():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from logitkit.distributed import jax_vocab_parallel_linear_head as f

    mesh = jax.make_mesh((1,), ("v",), axis_types=(AxisType.Auto,))
    h, w, y = jnp.zeros((4, 3)), jnp.zeros((6, 3)), jnp.zeros(4, dtype=jnp.int32)

    def trace(**kw):
        lab = kw.pop("labels", y)
        g = jax.shard_map(lambda h, w: f(h, w, lab, "v", **kw).lse, mesh=mesh, in_specs=(P(), P("v")), out_specs=P())
        jax.eval_shape(g, h, w)   # errors are raised while tracing

    with pytest.raises(ValueError, match="outputs: expected distinct names"):
        trace(outputs=("lse", "nll"))
    with pytest.raises(ValueError, match="labels: outputs"):
        trace(labels=None, outputs=("logprobs", "lse"))
    with pytest.raises(ValueError, match=r"vocab_size: expected None or an int in \[1, 6\]"):
        trace(outputs=("lse",), vocab_size=7)
    with pytest.raises(ValueError, match=r"teacher_weight: expected this device's rows of the teacher head, shape \(6, 2\)"):
        trace(outputs=("lse", "kl"), teacher_hidden=jnp.zeros((4, 2)), teacher_weight=jnp.zeros((12, 2)))
    topk = (jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="divergence: 'reverse_kl' is infinite against a top-k teacher"):
        trace(outputs=("lse", "kl"), teacher_topk=topk, divergence="reverse_kl")
    with pytest.raises(ValueError, match="teacher_topk: a teacher is given but 'kl' is not in outputs"):
        trace(outputs=("lse",), teacher_topk=topk)
    with pytest.raises(ValueError, match=r"temperature: expected a float or a floating array of shape \(4,\)"):
        trace(outputs=("lse",), temperature=jnp.ones(5))
    with pytest.raises(TypeError, match="local_weight: expected hidden's dtype"):
        jax.eval_shape(jax.shard_map(lambda h, w: f(h, w, y, "v", outputs=("lse",)).lse, mesh=mesh,
                                     in_specs=(P(), P("v")), out_specs=P()), h, w.astype(jnp.float16))
