# The vocabulary-parallel fused head: torchrun --nproc-per-node 2 examples/vocab_parallel_head_torchrun.py
# Each rank holds the same trunk and V/world rows of the student's (and the teacher's) head. One
# call returns log-probabilities, entropy and a distillation KL for every token; a GRPO-style
# objective backpropagates through them without gathering the head or the logits (NCCL when every
# process has a GPU, else gloo on the CPU).
import os

import torch
import torch.distributed as dist

import logitkit
from logitkit.distributed import vocab_parallel_linear_head

use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # a GPU per process
dist.init_process_group("nccl" if use_cuda else "gloo")
try:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    N, H, V = 128, 32, 1000                       # tokens, hidden size, vocabulary (V % world == 0)
    torch.manual_seed(0)                          # the same data, trunk and heads on every rank
    inputs = torch.randn(N, H, device=device)
    actions = torch.randint(0, V, (N,), device=device)     # sampled tokens
    actions[::13] = -100                                    # padding
    advantages = torch.randn(N, device=device)
    temps = torch.rand(N, device=device) + 0.5              # per-sample sampling temperatures
    trunk = torch.nn.Linear(H, H, device=device)
    W = torch.randn(V, H, device=device) * 0.1
    W_teacher = torch.randn(V, H, device=device) * 0.1
    head = W.chunk(world)[rank].clone().requires_grad_()   # this rank's rows
    teacher_head = W_teacher.chunk(world)[rank]
    params = [*trunk.parameters(), head]
    valid = actions != -100

    for step in range(10):
        hidden = torch.tanh(trunk(inputs))
        out = vocab_parallel_linear_head(hidden, head, actions, outputs=("logprobs", "entropy", "kl"),
                                         temperature=temps, teacher_hidden=inputs.detach(),
                                         teacher_weight=teacher_head)
        if step == 0:
            old = out.logprobs.detach()
        ratio = torch.exp(out.logprobs - old)
        pg = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
        objective = ((pg - 0.01 * out.entropy + 0.1 * out.kl) * valid).sum() / valid.sum()
        objective.backward()   # d/d hidden is all-reduced inside: the trunk gets the same grad everywhere
        with torch.no_grad():
            for p in params:   # plain SGD
                p -= 0.5 * p.grad
                p.grad = None
        if rank == 0 and step % 3 == 0:
            print(f"step {step}  objective {objective.item():+.6f}  mean kl {out.kl[valid].mean().item():.6f}",
                  flush=True)

    # To check: the same outputs from the gathered head in one process.
    with torch.no_grad():
        hidden = torch.tanh(trunk(inputs))
        parts = [torch.empty_like(head) for _ in range(world)]
        dist.all_gather(parts, head.detach())                       # only for the comparison
        kw = dict(outputs=("logprobs", "entropy", "kl", "argmax"), temperature=temps, teacher_hidden=inputs)
        ref = logitkit.linear_head(hidden, torch.cat(parts), actions, teacher_weight=W_teacher, **kw)
        out = vocab_parallel_linear_head(hidden, head.detach(), actions, teacher_weight=teacher_head, **kw)
    ok = all(torch.allclose(getattr(out, k), getattr(ref, k), rtol=1e-5, atol=1e-6)
             for k in ("logprobs", "entropy", "kl"))
    ok = ok and torch.equal(out.argmax, ref.argmax)
    print(f"rank {rank}/{world}: logprobs, entropy, kl and argmax against the gathered head -> "
          f"{'matches' if ok else 'MISMATCH'}", flush=True)
finally:
    dist.destroy_process_group()
