# Vocabulary-parallel training with logitkit: torchrun --nproc-per-node 2 examples/vocab_parallel_torchrun.py
# Each rank holds the same trunk and V/world rows of the output head; the loss never gathers
# the head or the logits (NCCL when every process has a GPU, else gloo on the CPU).
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from logitkit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # a GPU per process
dist.init_process_group("nccl" if use_cuda else "gloo")
try:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    N, H, V = 256, 64, 1000                       # tokens, hidden size, vocabulary (V % world == 0)
    torch.manual_seed(0)                          # the same data, trunk and head on every rank
    inputs = torch.randn(N, H, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[::17] = -100                           # ignored (padding) tokens
    trunk = torch.nn.Linear(H, H, device=device)
    head = (torch.randn(V, H, device=device) * 0.1).chunk(world)[rank].requires_grad_()  # this rank's rows
    params = [*trunk.parameters(), head]

    for step in range(20):
        loss = vocab_parallel_linear_cross_entropy(torch.tanh(trunk(inputs)), head, labels, label_smoothing=0.1)
        loss.backward()       # d loss / d hidden is all-reduced inside: the trunk gets the same grad everywhere
        with torch.no_grad():
            for p in params:  # plain SGD
                p -= 0.5 * p.grad
                p.grad = None
        if rank == 0 and step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.6f}", flush=True)

    # The same loss from logits that are already sharded, and, to check, from gathered logits.
    with torch.no_grad():
        local_logits = torch.tanh(trunk(inputs)) @ head.T          # (N, V / world)
        parts = [torch.empty_like(local_logits) for _ in range(world)]
        dist.all_gather(parts, local_logits)                        # only for the comparison
        gathered = F.cross_entropy(torch.cat(parts, dim=-1), labels, label_smoothing=0.1)
    loss = vocab_parallel_cross_entropy(local_logits, labels, label_smoothing=0.1)
    ok = torch.allclose(loss, gathered, rtol=1e-5)
    print(f"rank {rank}/{world}: vocab-parallel loss {loss.item():.6f}, gathered-logits loss "
          f"{gathered.item():.6f} -> {'matches' if ok else 'MISMATCH'}", flush=True)
finally:
    dist.destroy_process_group()
