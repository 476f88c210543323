"""DTensor, FSDP2 and global loss normalization (issue 17), on gloo CPU ranks.

One spawned group per world size (2: a 1-D mesh; 4: a 2-D dp × tp mesh and the 1-D checks) runs
every check of :mod:`_dtensor_workers` and reports per check; each test below reads one check.
References: float64 NumPy (:mod:`logitkit.reference`) on the gathered arrays, torch's own
``loss_parallel`` + ``F.cross_entropy`` where it supports the options, and, for FSDP2 and DDP, a
single-process torch run on the whole batch. The ranks run the core on torch ops
(``LOGITKIT_KERNELS=core``): the numba kernels are tested against it elsewhere, and loading them
in each rank would cost more than these checks. A rank that dies or stalls fails the launch
(120 s), it never hangs it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from logitkit.reference import cross_entropy64, cross_entropy_grad64  # noqa: E402

import _dtensor_workers as W  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def get(world, check):
        if world not in cache:
            cache[world] = W.launch(world, str(tmp_path_factory.mktemp(f"dtensor{world}")))
        per_rank = [r[check] for r in cache[world]]
        for rank, r in enumerate(per_rank):
            assert "exception" not in r, f"rank {rank}:\n{r['exception']}"
            assert "skipped" not in r, f"rank {rank}: {r['skipped']}"
        return per_rank

    return get


def _ref(x, y, o, w):
    oo = W.options(o, w)
    return cross_entropy64(x, y, **oo), cross_entropy_grad64(x, y, **oo)


def _close(a, b, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# cross_entropy on DTensor logits


@pytest.mark.parametrize("world", [2, 4])
def test_logits_sharded_on_classes_every_option(results, world):
    """Shard(1) logits (ColwiseParallel(use_local_output=False)): every option, float64-exact; the
    same as torch's loss_parallel where that has the option; no gather; a Replicate loss."""
    per_rank = results(world, "check_ce_options_1d")
    d = W.data(1)
    for k, o in enumerate(W.CE_OPTIONS):
        y = W.labels_for(d["y"], o)
        loss, grad = _ref(d["x"], y, o, d["w"])
        for r in per_rank:
            _close(r[f"{k}/loss"], loss)
            _close(r[f"{k}/grad"], grad)
            assert r[f"{k}/gathers"] == 0, o
            assert r[f"{k}/placements"] == "(Replicate(),)", o
            _close(r[f"{k}/rep_loss"], loss)
            _close(r[f"{k}/rep_grad"], grad)
            if k in W.LP_OPTIONS:
                _close(r[f"{k}/loss"], r[f"{k}/lp_loss"])
                _close(r[f"{k}/grad"], r[f"{k}/lp_grad"])
    assert W.LP_OPTIONS, "no option set that torch's loss_parallel supports"


def test_label_smoothing_is_global_where_loss_parallel_has_none(results):
    """torch's loss_parallel refuses label smoothing; the DTensor route gives the global formula."""
    per_rank = results(2, "check_ce_options_1d")
    d = W.data(1)
    k = W.CE_OPTIONS.index({"label_smoothing": 0.1})
    for r in per_rank:
        _close(r[f"{k}/loss"], cross_entropy64(d["x"], d["y"], label_smoothing=0.1))
        assert f"{k}/lp_loss" not in r


def test_logits_and_labels_token_sharded(results):
    """Shard(0) logits and labels (data parallel): the global mean, Shard(0) per-token losses."""
    per_rank = results(2, "check_ce_token_sharded")
    d = W.data(2)
    for k, o in enumerate(W.CE_OPTIONS):
        y = W.labels_for(d["y"], o)
        loss, grad = _ref(d["x"], y, o, d["w"])
        red = o.get("reduction", "mean")
        for rank, r in enumerate(per_rank):
            _close(r[f"{k}/loss"], loss)
            _close(r[f"{k}/grad"], grad)
            if red == "none":
                assert r[f"{k}/placements"] == "(Shard(dim=0),)"
                _close(r[f"{k}/local"], np.array_split(loss, 2)[rank])
            else:
                assert r[f"{k}/placements"] == "(Replicate(),)"
                _close(r[f"{k}/local"], loss)  # the global value on every rank
    n = int((d["y"] != -100).sum()) + 5
    for r in per_rank:
        _close(r["nib/loss"], cross_entropy64(d["x"], d["y"], label_smoothing=0.1, reduction="sum") / n)
        _close(r["nib/grad"], cross_entropy_grad64(d["x"], d["y"], label_smoothing=0.1, reduction="sum") / n)


# ----------------------------------------------------------------------------------------------
# the linear head


def _linear_ref(d, o, bias=True):
    y = W.labels_for(d["y"], o)
    logits = d["h"] @ d["W"].T + (d["b"] if bias else 0.0)
    loss, g = _ref(logits, y, o, d["w"])
    if o.get("reduction") == "none":
        pass  # the gradient of the summed per-token losses, as the workers' .sum().backward()
    return loss, g @ d["W"], g.T @ d["h"], g.sum(0)


@pytest.mark.parametrize("world", [2, 4])
def test_colwise_parallel_head(results, world):
    """A ColwiseParallel head: the vocabulary-parallel loss, no gather of weight or logits, the full
    hidden gradient (plain hidden) or a Partial one (Replicate DTensor hidden), Shard(0) weight grads."""
    per_rank = results(world, "check_linear_tp")
    d = W.data(3)
    opts = [{}, {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-3, "softcap": 5.0},
            {"reduction": "none", "temperature": 2.0}, {"reduction": "sum", "ignore_index": 2}]
    for k, o in enumerate(opts):
        loss, dh, dW, db = _linear_ref(d, o)
        for hk in ("plain", "dtensor"):
            for r in per_rank:
                key = f"{k}/{hk}"
                assert r[key + "/gathers"] == 0, (o, hk)
                _close(r[key + "/loss"], loss)
                _close(r[key + "/dh"], dh)
                _close(r[key + "/dW"], dW)
                _close(r[key + "/db"], db)
                assert r[key + "/placements"].endswith("(Shard(dim=0),)")
    y = d["y"]
    logits = d["h"] @ d["W"].T
    for r in per_rank:
        # bfloat16 inputs: the float64 loss of the rounded inputs, to bfloat16's precision
        hb = torch.tensor(d["h"]).to(torch.bfloat16).double().numpy()
        Wb = torch.tensor(d["W"]).to(torch.bfloat16).double().numpy()
        gb = cross_entropy_grad64(hb @ Wb.T, y, label_smoothing=0.1)
        assert r["bf16/dtype"] == "torch.bfloat16"
        _close(r["bf16/loss"], cross_entropy64(hb @ Wb.T, y, label_smoothing=0.1), rtol=1e-2)
        _close(r["bf16/dh"], gb @ Wb, rtol=5e-2, atol=2e-3)
        _close(r["bf16/dW"], gb.T @ hb, rtol=5e-2, atol=2e-3)
        for lk in ("sharded", "plain"):  # sequence parallel before the head: all-gathered on the head's dim
            g = cross_entropy_grad64(logits, y, label_smoothing=0.1)
            _close(r[f"sp/{lk}/loss"], cross_entropy64(logits, y, label_smoothing=0.1))
            _close(r[f"sp/{lk}/dh"], (g @ d["W"]).reshape(2, W.N // 2, W.H))
            _close(r[f"sp/{lk}/dW"], g.T @ d["h"])
            assert r[f"sp/{lk}/placements"] == "(Shard(dim=1),)"
        for red in ("mean", "none"):  # every linear_head output after sequence parallelism
            for lk in ("sharded", "plain"):
                key, ref = f"sphead/{red}/{lk}", f"sphead/{red}/ref"
                for f in ("loss", "logprobs", "entropy", "lse", "dh", "dW"):
                    _close(r[f"{key}/{f}"], r[f"{ref}/{f}"])
                assert r[f"{key}/placements"] == "(Shard(dim=1),)(Shard(dim=1),)"
            if red == "mean":
                _close(r[f"sphead/{red}/ref/loss"], cross_entropy64(logits, y, label_smoothing=0.1))
        _close(r["head/loss"], cross_entropy64(logits, y, label_smoothing=0.1))
        _close(r["head/dW"], cross_entropy_grad64(logits, y, label_smoothing=0.1).T @ d["h"])
        # every linear_head output with the weight Shard(0) (vocabulary-parallel head), against one
        # process on the full weight: values, argmax, and the gradients of a combination of outputs
        for red in ("mean", "none", "num_items"):  # num_items: mean with num_items_in_batch = N + 3
            ref = {k[len(f"vhead/{red}/ref/"):]: v for k, v in r.items() if k.startswith(f"vhead/{red}/ref/")}
            for hk in ("plain", "dtensor"):
                key = f"vhead/{red}/{hk}"
                assert r[key + "/gathers"] == 0
                for f in ("loss", "logprobs", "entropy", "lse", "dh", "dW", "db"):
                    _close(r[f"{key}/{f}"], ref[f], rtol=1e-10, atol=1e-12)
                np.testing.assert_array_equal(r[key + "/argmax"], ref["argmax"])
                assert r[key + "/placements"] == "(Replicate(),)(Shard(dim=0),)", r[key + "/placements"]


def test_linear_token_sharded_and_linear_head_outputs(results):
    per_rank = results(2, "check_linear_token_sharded")
    d = W.data(4)
    opts = [{}, {"weight": True, "z_loss": 1e-2, "label_smoothing": 0.1}, {"reduction": "none"},
            {"reduction": "sum", "softcap": 3.0}]
    for k, o in enumerate(opts):
        loss, dh, dW, _ = _linear_ref(d, o, bias=False)
        for r in per_rank:
            _close(r[f"{k}/loss"], loss)
            _close(r[f"{k}/dh"], dh)
            _close(r[f"{k}/dW"], dW)
            # the weight's gradient is each rank's part (Partial), as DTensor's own matmul gives
            want = "(Shard(dim=0),)" if o.get("reduction") == "none" else "(Replicate(),)"
            assert r[f"{k}/placements"] == want + "(Partial(sum),)"
    logits = d["h"] @ d["W"].T
    g = cross_entropy_grad64(logits, d["y"], label_smoothing=0.1)
    gs = cross_entropy_grad64(logits, d["y"], label_smoothing=0.1, reduction="none")
    for r in per_rank:
        _close(r["seq/mean/loss"], cross_entropy64(logits, d["y"], label_smoothing=0.1))
        _close(r["seq/mean/dh"], (g @ d["W"]).reshape(2, W.N // 2, W.H))
        assert r["seq/mean/placements"] == "(Replicate(),)"
        _close(r["seq/none/loss"],
               cross_entropy64(logits, d["y"], label_smoothing=0.1, reduction="none").reshape(2, W.N // 2))
        _close(r["seq/none/dh"], (gs @ d["W"]).reshape(2, W.N // 2, W.H))
        assert r["seq/none/placements"] == "(Shard(dim=1),)"
        _close(r["head_nib/loss"], cross_entropy64(logits, d["y"], z_loss=1e-2, reduction="sum") / 20)
    from logitkit.reference import log_softmax64

    lp = log_softmax64(logits)
    valid = d["y"] != -100
    logprobs = np.where(valid, np.take_along_axis(lp, np.where(valid, d["y"], 0)[:, None], 1)[:, 0], 0.0)
    ent = np.where(valid, -(np.exp(lp) * lp).sum(-1), 0.0)
    for r in per_rank:
        assert r["head/lce_calls"] == 0
        _close(r["head/loss"], cross_entropy64(logits, d["y"]))
        _close(r["head/logprobs"], logprobs)
        _close(r["head/entropy"], ent)
        assert r["head/placements"] == "(Shard(dim=0),)"


# ----------------------------------------------------------------------------------------------
# the 2-D mesh


def test_mesh_2d_data_by_tensor_parallel(results):
    """dp × tp = 2 × 2: tokens Shard(0) on dp, logits / head sharded on tp; every option; torch's
    loss_parallel beside it for the reductions it supports there (sum, none); no gather."""
    per_rank = results(4, "check_mesh2d")
    d = W.data(8)
    for k, o in enumerate(W.CE_OPTIONS):
        y = W.labels_for(d["y"], o)
        loss, grad = _ref(d["x"], y, o, d["w"])
        red = o.get("reduction", "mean")
        for r in per_rank:
            _close(r[f"ce{k}/loss"], loss)
            _close(r[f"ce{k}/grad"], grad)
            assert r[f"ce{k}/gathers"] == 0
            want = "(Shard(dim=0), Replicate())" if red == "none" else "(Replicate(), Replicate())"
            assert r[f"ce{k}/placements"] == want
            if f"ce{k}/lp_loss" in r:
                _close(r[f"ce{k}/loss"], r[f"ce{k}/lp_loss"])
                _close(r[f"ce{k}/grad"], r[f"ce{k}/lp_grad"])
    assert any("ce1/lp_loss" in r for r in per_rank)
    for k, o in enumerate([{}, {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-2, "softcap": 5.0,
                              "temperature": 0.8}, {"reduction": "none"}]):
        loss, dh, dW, db = _linear_ref(d, o)
        for r in per_rank:
            assert r[f"lin{k}/gathers"] == 0
            _close(r[f"lin{k}/loss"], loss)
            _close(r[f"lin{k}/dh"], dh)
            _close(r[f"lin{k}/dW"], dW)
            _close(r[f"lin{k}/db"], db)
            assert r[f"lin{k}/placements"].endswith("(Partial(sum), Shard(dim=0))")
    # linear_head on the 2-D mesh: the loss and the per-token outputs from one vocabulary-parallel
    # pass, equal to one process on the full head
    for k, o in enumerate([{"label_smoothing": 0.1, "weight": True, "z_loss": 1e-2},
                           {"reduction": "sum", "temperature": 1.5}]):
        logits = d["h"] @ d["W"].T
        loss, _ = _ref(logits, W.labels_for(d["y"], o), o, d["w"])
        for r in per_rank:
            assert r["mhead/lce_calls"] == 0
            _close(r[f"mhead{k}/mesh/loss"], loss)
            for f in ("loss", "logprobs", "entropy", "lse", "dh", "dW"):
                _close(r[f"mhead{k}/mesh/{f}"], r[f"mhead{k}/ref/{f}"])
            assert r[f"mhead{k}/mesh/placements"] == "(Replicate(), Replicate())(Shard(dim=0), Replicate())"
    big = W.data(9, n=2 * W.N)
    logits = big["h"] @ big["W"].T
    for r in per_rank:
        assert r["accum/n"] == int((big["y"] != -100).sum())
        _close(r["accum/loss"], cross_entropy64(logits, big["y"], label_smoothing=0.1))
        _close(r["accum/dW"], cross_entropy_grad64(logits, big["y"], label_smoothing=0.1).T @ big["h"])


# ----------------------------------------------------------------------------------------------
# FSDP2, gradient accumulation × data parallel


@pytest.mark.parametrize("mode", ["sharded_weight", "unshard", "inside_forward", "divide_factor_1"])
def test_fsdp2_tiny_model_matches_one_process(results, mode):
    """fully_shard-ed blocks and head: the sharded weight outside forward (all-gathered, FSDP's
    contract), after unshard(), and inside the root's forward; 3 SGD steps against one process."""
    per_rank = results(2, "check_fsdp2")
    for r in per_rank:
        _close(r[f"{mode}/losses"], r["ref/losses"], rtol=1e-12)
        for name, g in r["ref/grads"].items():
            _close(r[f"{mode}/grads"][name], g, rtol=1e-9, atol=1e-12)
        for name, p in r["ref/params"].items():
            _close(r[f"{mode}/params"][name], p, rtol=1e-9, atol=1e-12)
    kinds = per_rank[0][f"{mode}/kinds"]
    assert kinds == {"sharded_weight": ["DTensor"] * 3, "unshard": ["Parameter"] * 3,
                     "inside_forward": ["in_forward"] * 3, "divide_factor_1": ["DTensor"] * 3}[mode]
    if mode == "sharded_weight":
        assert per_rank[0]["sharded_weight/gathers"] > 0  # the weight was all-gathered (and the counter works)


def test_fsdp2_over_dp_with_colwise_head_over_tp(results):
    """The example's 2-D setup (FSDP2 × ColwiseParallel, loss in forward) trains as one process does."""
    per_rank = results(4, "check_fsdp_tp_2d")
    for r in per_rank:
        _close(r["losses"], r["ref"], rtol=1e-12)
        for name, p in r["ref_params"].items():
            _close(r["params"][name], p, rtol=1e-10, atol=1e-13)
        assert r["loss_placements"] == "(Replicate(),)"  # a DTensor on the tp mesh
        # outside forward FSDP's 2-D shard of the head is refused, naming what to do
        typ, msg = r["outside"]
        assert typ == "NotImplementedError" and "_StridedShard" in r["outside/placements"], r["outside"]
        assert "linear_weight" in msg and "unshard()" in msg


def test_fsdp2_through_logitkit_transformers_apply(results):
    """A tiny Llama, apply()-ed, layers fully_shard-ed and the head its own unit or the root's,
    num_items_in_batch × world size: the loss and every gradient of one process on the whole batch
    (HF's loss is float32 there)."""
    per_rank = results(2, "check_fsdp2_transformers")
    for r in per_rank:
        for key in ("head_unit", "root"):
            _close(r[f"{key}/loss"], r["ref/loss"], rtol=1e-6)
            assert set(r[f"{key}/grads"]) == set(r["ref/grads"])
            for name, g in r["ref/grads"].items():
                _close(r[f"{key}/grads"][name], g, rtol=1e-5, atol=1e-6 * np.abs(g).max())


@pytest.mark.parametrize("key", ["plain", "weighted", "dtensor"])
def test_grad_accumulation_times_data_parallel_equals_one_big_batch(results, key):
    """2 ranks × 3 micro-batches with num_items_in_batch = global_num_items (DDP: loss × world size;
    the token-sharded DTensor route: no factor) give one big batch's loss and gradients."""
    per_rank = results(2, "check_grad_accum_ddp")
    for r in per_rank:
        _close(r[f"{key}/loss"], r[f"{key}/ref_loss"], rtol=1e-12)
        _close(r[f"{key}/dW"], r[f"{key}/ref_dW"], rtol=1e-10, atol=1e-13)
        if key != "dtensor":
            _close(r[f"{key}/dT"], r[f"{key}/ref_dT"], rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("world", [2, 4])
def test_errors_name_the_argument_and_placement(results, world):
    per_rank = results(world, "check_errors")
    expect = {
        "partial_input": ("ValueError", ["input", "Partial"]),
        "target_sharded_with_vocab": ("ValueError", ["target", "Shard(0)", "Replicate()"]),
        "rowwise_weight": ("NotImplementedError", ["linear_weight", "Shard(1)"]),
        "plain_target_with_sharded_tokens": ("ValueError", ["target", "plain tensor", "Shard(0)"]),
        "hidden_differs_across_ranks": ("ValueError", ["input", "differs across the ranks"]),
        "hidden_columns_permuted_on_one_rank": ("ValueError", ["input", "differs across the ranks"]),
        "plain_weight_with_sharded_tokens": ("ValueError", ["linear_weight", "plain tensor", "Partial()"]),
        "prob_target_vocab_sharded": ("NotImplementedError", ["target", "probability"]),
        "bad_label_one_rank": ("ValueError", []),
        "num_items_with_sum": ("ValueError", ["num_items_in_batch", "sum"]),
        "num_items_zero": ("ValueError", ["num_items_in_batch", "> 0"]),
    }
    for rank, r in enumerate(per_rank):
        for name, (typ, words) in expect.items():
            got_type, msg = r[name]
            assert got_type == typ, (rank, name, r[name])
            for w_ in words:
                assert w_ in msg, (rank, name, msg)
            assert r[name + "/seconds"] < 10, (rank, name)  # raised, not timed out
    last = per_rank[-1]["bad_label_one_rank"][1]
    assert "out of range" in last  # the rank with the bad label names it; the others say a rank failed
    assert all("other rank" in r["bad_label_one_rank"][1] for r in per_rank[:-1])
    d = W.data(7)
    for r in per_rank:
        _close(r["after/loss"], cross_entropy64(d["x"], d["y"]))


# ----------------------------------------------------------------------------------------------
# single process: num_items_in_batch and global_num_items without a process group


def test_num_items_in_batch_single_process():
    import logitkit.torch as lt

    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 7))
    y = rng.integers(0, 7, 9)
    y[2] = -100
    w = rng.uniform(0.5, 2, 7)
    xt = torch.tensor(x, requires_grad=True)
    loss = lt.cross_entropy(xt, torch.tensor(y), torch.tensor(w), label_smoothing=0.1, z_loss=1e-2,
                            num_items_in_batch=torch.tensor(13))
    loss.backward()
    ref = cross_entropy64(x, y, weight=w, label_smoothing=0.1, z_loss=1e-2, reduction="sum") / 13
    _close(loss.item(), ref)
    _close(xt.grad.numpy(), cross_entropy_grad64(x, y, weight=w, label_smoothing=0.1, z_loss=1e-2,
                                                 reduction="sum") / 13)
    h, Wt = rng.normal(size=(9, 4)), rng.normal(size=(7, 4))
    l2 = lt.linear_cross_entropy(torch.tensor(h), torch.tensor(Wt), torch.tensor(y), num_items_in_batch=13)
    _close(l2.item(), cross_entropy64(h @ Wt.T, y, reduction="sum") / 13)
    assert int(lt.global_num_items([torch.tensor(y), torch.tensor(y[:4])])) == 8 + 3
    _close(float(lt.global_num_items(torch.tensor(y), weight=torch.tensor(w))), w[y[y != -100]].sum())
    with pytest.raises(ValueError, match="num_items_in_batch"):
        lt.cross_entropy(xt, torch.tensor(y), num_items_in_batch=-1)
    with pytest.raises(TypeError, match="num_items_in_batch"):
        lt.linear_cross_entropy(torch.tensor(h), torch.tensor(Wt), torch.tensor(y), num_items_in_batch=True)


def test_dtensor_detection_imports_nothing():
    """The entry hooks look DTensor up in sys.modules: plain calls never import torch.distributed.tensor."""
    import sys

    import logitkit.torch as lt
    from logitkit.torch import _dtensor

    before = "torch.distributed.tensor" in sys.modules
    x = torch.randn(4, 5, requires_grad=True)
    lt.cross_entropy(x, torch.tensor([0, 1, 2, 3])).backward()
    lt.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3]))
    lt.linear_head(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3]), outputs=("loss", "entropy"))
    assert ("torch.distributed.tensor" in sys.modules) == before
    assert not _dtensor.is_dtensor(x, None, 3)


# ----------------------------------------------------------------------------------------------
# NCCL (skipped without two GPUs)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or
                    not torch.distributed.is_nccl_available(), reason="needs 2 CUDA devices and NCCL")
def test_nccl_two_gpus(tmp_path):
    res = W.launch(2, str(tmp_path), backend="nccl",
                   names=["check_ce_options_1d", "check_linear_tp", "check_linear_token_sharded"])
    d = W.data(1)
    for r in res:
        for v in r.values():
            assert "exception" not in v, v["exception"]
        for k, o in enumerate(W.CE_OPTIONS):
            loss, grad = _ref(d["x"], W.labels_for(d["y"], o), o, d["w"])
            _close(r["check_ce_options_1d"][f"{k}/loss"], loss)
            _close(r["check_ce_options_1d"][f"{k}/grad"], grad)
