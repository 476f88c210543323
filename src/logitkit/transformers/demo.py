r"""Demo: a Hugging Face Llama (V = 32000) trained twice, with HF's own loss and through logitkit.

The corpus is made at run time by a seeded Markov source over an alphabet of ``A`` tokens drawn
from the vocabulary: from token ``s`` the next token is ``σ_j(s)`` with probability ``p_j`` (``σ_j``
random permutations). The transition matrix ``Σ_j p_j Π_j`` is doubly stochastic, so the uniform
distribution is stationary and the entropy rate is exactly ``(1/A) Σ_s H(P[s, ·])`` nats/token:
the floor of the training loss. Both runs start from the same weights and see the same batches;
each runs in its own process so that its peak memory (RSS above the RSS before its first step)
is its own.

    python -m logitkit.transformers.demo            # the full demo (a few minutes on 2 CPU cores)
    python -m logitkit.transformers.demo --quick    # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from typing import Any, Optional

import numpy as np

__all__ = ["MarkovSource", "main"]


class MarkovSource:
    """Seeded first-order Markov source over ``alphabet`` tokens of a ``vocab``-sized vocabulary.

    >>> src = MarkovSource(vocab=1000, alphabet=50, branches=3, seed=0)
    >>> x = src.sample(np.random.default_rng(1), 2, 16); x.shape, bool(np.isin(x, src.tokens).all())
    ((2, 16), True)
    >>> 0 < src.entropy_rate() <= math.log(3)
    True
    """

    def __init__(self, vocab: int, alphabet: int, branches: int, seed: int) -> None:
        if not 2 <= alphabet <= vocab:
            raise ValueError(f"alphabet: expected 2 <= alphabet <= vocab ({vocab}), got {alphabet}")
        if branches < 1:
            raise ValueError(f"branches: expected a positive count, got {branches}")
        rng = np.random.default_rng(seed)
        self.tokens = np.sort(rng.choice(vocab, alphabet, replace=False))
        self.p = rng.dirichlet(np.full(branches, 2.0))
        self.succ = np.stack([rng.permutation(alphabet) for _ in range(branches)], axis=1)  # (A, K) indices

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats per token (branches that land on one token are merged)."""
        A, K = self.succ.shape
        P = np.zeros((A, A))
        np.add.at(P, (np.repeat(np.arange(A), K), self.succ.reshape(-1)), np.tile(self.p, A))
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(P > 0, P * np.log(P), 0.0).sum(axis=1)
        return float(h.mean())  # the stationary distribution is uniform (P is doubly stochastic)

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """``(batch, length)`` token ids; each row starts in the stationary (uniform) distribution."""
        s = np.empty((batch, length), dtype=np.int64)
        s[:, 0] = rng.integers(0, self.succ.shape[0], batch)
        cum = np.cumsum(self.p)
        for t in range(1, length):
            j = np.minimum(np.searchsorted(cum, rng.random(batch), side="right"), len(self.p) - 1)
            s[:, t] = self.succ[s[:, t - 1], j]
        return self.tokens[s]


def _rss() -> int:
    """Resident set size of this process in bytes (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0


class _Sampler(threading.Thread):
    """Samples the RSS every few milliseconds: the peak and a timeline for the plot."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.period, self.stop, self.t0 = period, threading.Event(), time.perf_counter()
        self.base, self.peak, self.timeline = _rss(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            r = _rss()
            self.peak = max(self.peak, r)
            self.timeline.append((time.perf_counter() - self.t0, r - self.base))
            time.sleep(self.period)


def _model(args: argparse.Namespace) -> Any:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(cfg).train()


def _worker(args: argparse.Namespace) -> dict:
    """One training run (``args.run`` is ``hf`` or ``logitkit``); returns its measurements."""
    import torch

    torch.set_num_threads(max(1, args.threads)) if args.threads else None
    model = _model(args)
    if args.run == "logitkit":
        from . import apply

        apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    src = MarkovSource(args.vocab, args.alphabet, args.branches, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    batches = [torch.from_numpy(src.sample(rng, args.batch, args.seq)) for _ in range(args.steps)]
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar without tqdm
        def tqdm(it, **kw):
            return it
    # one untimed forward and backward first: numba compiles (or loads) its kernels, torch warms up;
    # the gradients are dropped, so the weights the timed steps start from are the same in both runs
    model(input_ids=batches[0], labels=batches[0]).loss.backward()
    opt.zero_grad(set_to_none=True)
    losses, times = [], []
    sampler = _Sampler()
    sampler.start()
    for ids in tqdm(batches, desc=f"{args.run:>8}", unit="step", file=sys.stderr, leave=True,
                    disable=args.no_progress):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as HF's Trainer does by default
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    sampler.stop.set()
    sampler.join()
    return dict(run=args.run, losses=losses, times=times, peak=sampler.peak - sampler.base,
                timeline=sampler.timeline[:: max(1, len(sampler.timeline) // 2000)])


def _run(args: argparse.Namespace, which: str) -> dict:
    if args.in_process:
        return _worker(argparse.Namespace(**{**vars(args), "run": which}))
    cmd = [sys.executable, "-m", "logitkit.transformers.demo", "--_worker", which] + _forward_args(args)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_KEYS = ("steps", "vocab", "alphabet", "branches", "hidden", "layers", "batch", "seq", "lr", "seed", "threads")


def _forward_args(args: argparse.Namespace) -> list[str]:
    res = []
    for k in _KEYS:
        res += [f"--{k}", str(getattr(args, k))]
    return res + (["--no-progress"] if args.no_progress else [])


def _plot(path: str, runs: list[dict], rate: float, args: argparse.Namespace) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r, style in zip(runs, ("-", "--")):
        a.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], style, label=_NAMES[r["run"]])
    a.axhline(rate, color="k", lw=0.8, ls=":", label=f"entropy rate {rate:.3f} nats")
    a.set(xlabel="step", ylabel="training loss (nats/token)", yscale="log",
          title=f"Llama {args.layers} layers, V = {args.vocab}, {args.batch}x{args.seq} tokens/step")
    a.legend()
    for r in runs:
        t, m = zip(*r["timeline"]) if r["timeline"] else ((0,), (0,))
        b.plot(t, np.array(m) / 2**20, label=f"{_NAMES[r['run']]} (peak {r['peak'] / 2**20:.0f} MiB)")
    b.set(xlabel="seconds", ylabel="RSS above start (MiB)", title="memory during training")
    b.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_NAMES = {"hf": "HF loss", "logitkit": "logitkit.transformers.apply"}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m logitkit.transformers.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="a small smoke run (V = 2048, 3 steps)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--alphabet", type=int, default=64, help="tokens the Markov source emits")
    ap.add_argument("--branches", type=int, default=2, help="successors of each token")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--png", default=os.path.join("bench-out", "transformers_demo.png"))
    ap.add_argument("--in-process", action="store_true", help="both runs in this process (peaks less clean)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--_worker", dest="run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.vocab, args.alphabet, args.hidden, args.batch, args.seq = 3, 2048, 64, 32, 2, 32
    if args.steps < 1:
        ap.error("--steps: expected at least 1")
    if args.run is not None:
        print(json.dumps(_worker(args)))
        return 0
    src = MarkovSource(args.vocab, args.alphabet, args.branches, args.seed)
    rate = src.entropy_rate()
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"Llama, {args.layers} layers, hidden {args.hidden}, V = {args.vocab}; {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens; Markov source over {args.alphabet} tokens, {args.branches} branches, "
          f"entropy rate {rate:.4f} nats/token; float32 logits of one step: {logits_mib:.0f} MiB")
    runs = [_run(args, "hf"), _run(args, "logitkit")]
    tokens = args.batch * args.seq
    tail = max(1, min(5, args.steps // 4))
    print(f"\n{'run':<30} {'step ms':>8} {'tokens/s':>9} {'peak MiB':>9} {'final loss':>11} {'entropy rate':>13}")
    for r in runs:
        step = float(np.median(r["times"][1:] if len(r["times"]) > 1 else r["times"]))
        print(f"{_NAMES[r['run']]:<30} {1e3 * step:8.1f} {tokens / step:9.0f} {r['peak'] / 2**20:9.0f} "
              f"{np.mean(r['losses'][-tail:]):11.4f} {rate:13.4f}")
    d = np.abs(np.array(runs[0]["losses"]) - np.array(runs[1]["losses"]))
    rel = d / np.array(runs[0]["losses"])
    drop = runs[0]["peak"] - runs[1]["peak"]
    print(f"\nloss curves: max |difference| {d.max():.2e} (relative {rel.max():.1e}) over {args.steps} steps; "
          f"peak memory {runs[0]['peak'] / 2**20:.0f} -> {runs[1]['peak'] / 2**20:.0f} MiB "
          f"({drop / 2**20:.0f} MiB less, {drop / 2**20 / logits_mib:.1f}x one step's logits)")
    png = _plot(args.png, runs, rate, args)
    print(f"wrote {png}" if png else "no PNG (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
