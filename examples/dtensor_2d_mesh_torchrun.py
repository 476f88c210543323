# A 2-D mesh (data × tensor parallel) with logitkit's fused loss: torchrun --nproc-per-node 4 examples/dtensor_2d_mesh_torchrun.py
# The head is ColwiseParallel over "tp" (a DTensor Shard(0): each rank of a tp group holds V/tp rows);
# FSDP2 shards the model over "dp". The loss is computed inside the model's forward, where FSDP2
# has unsharded its parameters: the head is then the tp-sharded DTensor, and
# logitkit.torch.linear_cross_entropy runs the vocabulary-parallel loss over the tp group without
# gathering the head or the logits. num_items_in_batch (global_num_items, one all-reduce) × dp size
# makes FSDP2's gradient average the gradient of the global mean. Rank 0 trains the same model in
# one process on the whole batch and prints both losses (NCCL when every process has a GPU, else gloo).
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import logitkit.torch as lt

N, H, V, STEPS, LR = 64, 32, 1000, 10, 0.5    # tokens per step (all ranks), hidden size, vocabulary


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(H, H)
        self.block = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, labels=None, num_items=None):
        h = torch.tanh(self.embed(x))
        h = h + torch.tanh(self.block(h))
        if labels is None:
            return h @ self.lm_head.weight.T  # the logits (only for the one-process reference)
        # inside forward: FSDP2 has all-gathered its shards; lm_head.weight is ColwiseParallel's DTensor
        return lt.linear_cross_entropy(h, self.lm_head.weight, labels, num_items_in_batch=num_items,
                                       label_smoothing=0.1)


use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # a GPU per process
dist.init_process_group("nccl" if use_cuda else "gloo")
try:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    tp = 2 if world % 2 == 0 else 1
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    dp_size, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()

    torch.manual_seed(0)                                  # the same data and weights on every rank
    inputs = torch.randn(STEPS, N, H, device=device)
    labels = torch.randint(0, V, (STEPS, N), device=device)
    labels[:, ::7] = -100                                 # ignored (padding) tokens
    torch.manual_seed(1)
    ref = TinyLM().to(device)                             # the one-process reference
    model = TinyLM().to(device)
    model.load_state_dict(ref.state_dict())
    parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel())
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)

    mine = slice(dp_rank * N // dp_size, (dp_rank + 1) * N // dp_size)   # this dp rank's tokens
    for step in range(STEPS):
        x, y = inputs[step, mine], labels[step, mine]
        n = lt.global_num_items(y, group=mesh["dp"].get_group())         # the global count, one all-reduce
        loss = model(x, y, num_items=n) * dp_size        # FSDP2 averages over dp: × dp size = the sum
        opt.zero_grad()
        loss.backward()
        opt.step()
        # the loss is a DTensor on the tp mesh (Replicate: the same on each tp rank); its value:
        total = loss.detach().full_tensor() / dp_size
        dist.all_reduce(total, group=mesh["dp"].get_group())            # the global loss, for printing

        ref_loss = F.cross_entropy(ref(inputs[step]), labels[step], label_smoothing=0.1)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        if rank == 0:
            print(f"step {step:2d}  2-D mesh {tuple(mesh.shape)} loss {total.item():.6f}   "
                  f"one process {ref_loss.item():.6f}", flush=True)
    ok = torch.allclose(total, ref_loss.detach(), rtol=1e-4)
    print(f"rank {rank}/{world} (dp {dp_rank}, tp {mesh['tp'].get_local_rank()}): final loss {total.item():.6f} "
          f"vs one process {ref_loss.item():.6f} -> {'matches' if ok else 'MISMATCH'}", flush=True)
finally:
    dist.destroy_process_group()
