"""Train a tiny language-model head whose vocabulary is split over the ranks, with logitkit.

Run it with::

    torchrun --nproc-per-node 2 examples/vocab_parallel_torchrun.py

Every rank holds the same trunk (a small MLP, replicated) and one slice of the output head
(``V / world`` rows). The loss is computed without gathering the logits or the head:
``vocab_parallel_linear_cross_entropy`` all-reduces a few scalars per token in the forward pass and
``d loss / d hidden`` in the backward pass, so the replicated trunk gets the same gradient on
every rank. At the end the loss is checked against one process on the gathered logits.
Uses gloo on CPU (NCCL when every rank has a GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from logitkit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

N_TOKENS, HIDDEN, VOCAB, STEPS, SMOOTHING, LR = 256, 64, 1000, 20, 0.1, 0.5


def main() -> None:
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= dist.get_world_size() \
        if dist.is_initialized() else torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
        if VOCAB % world:
            raise SystemExit(f"VOCAB={VOCAB} must divide by the world size {world} (or pass vocab_start)")
        n = VOCAB // world  # equal shards: rank r holds classes [r·n, (r+1)·n)

        # The same seed on every rank: identical data, trunk and full head; each rank keeps its slice.
        g = torch.Generator().manual_seed(0)
        inputs = torch.randn(N_TOKENS, HIDDEN, generator=g)
        labels = torch.randint(0, VOCAB, (N_TOKENS,), generator=g)
        labels[::17] = -100  # padding tokens, ignored
        trunk = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU())
        trunk.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in trunk.state_dict().items()})
        full_head = torch.randn(VOCAB, HIDDEN, generator=g) * 0.1
        head = torch.nn.Parameter(full_head[rank * n:(rank + 1) * n].clone())
        trunk, head = trunk.to(device), torch.nn.Parameter(head.detach().to(device))
        inputs, labels = inputs.to(device), labels.to(device)

        params = [*trunk.parameters(), head]
        for step in range(STEPS):
            hidden = trunk(inputs)
            loss = vocab_parallel_linear_cross_entropy(hidden, head, labels, label_smoothing=SMOOTHING)
            loss.backward()  # d loss / d hidden is all-reduced, so the trunk gradients agree on every rank
            with torch.no_grad():  # plain SGD (a torch.optim optimizer works the same way)
                for p in params:
                    p -= LR * p.grad
                    p.grad = None
            if rank == 0 and step % 5 == 0:
                print(f"step {step:2d}  loss {loss.item():.6f}", flush=True)

        # Check: the same loss from already-sharded logits, and from one process on gathered logits.
        with torch.no_grad():
            hidden = trunk(inputs)
            local_logits = hidden @ head.T
        loss_vp = vocab_parallel_cross_entropy(local_logits, labels, label_smoothing=SMOOTHING)
        parts = [torch.empty_like(local_logits) for _ in range(world)]
        dist.all_gather(parts, local_logits)  # only for this check: the loss itself never gathers
        loss_full = F.cross_entropy(torch.cat(parts, dim=-1), labels, label_smoothing=SMOOTHING)
        trunk_sum = torch.stack([p.detach().double().sum() for p in trunk.parameters()]).sum().reshape(1)
        spread = trunk_sum.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        spread -= trunk_sum
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        ok = torch.allclose(loss_vp.double(), loss_full.double(), rtol=1e-5) and spread.item() == 0.0
        print(f"rank {rank}/{world}: vocab-parallel loss {loss_vp.item():.6f}, gathered-logits loss "
              f"{loss_full.item():.6f}, trunk identical on every rank: {spread.item() == 0.0} -> "
              f"{'matches' if ok else 'MISMATCH'}", flush=True)
        if not ok:
            raise SystemExit(1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
