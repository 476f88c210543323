"""A GRPO-style loop on a tiny random Llama, with per-token log-probabilities from the fused head.

``logitkit.transformers.token_logprobs(model, ids)`` gives ``log p(ids[:, t+1] | ids[:, :t+1])``
(B, T-1), differentiable, without the (B, T, V) logits: what a PPO / GRPO objective needs. The
reward here is the share of even token ids in a completion; the policy learns to emit them.

    python examples/transformers_grpo.py --steps 30
"""

import argparse
import copy

import torch
import transformers

import logitkit.transformers as lkt


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--new", type=int, default=12, help="tokens per completion")
    ap.add_argument("--beta", type=float, default=0.02, help="KL penalty against the reference policy")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    policy = transformers.LlamaForCausalLM(cfg)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    lkt.apply(policy)  # optional for token_logprobs: a patched model is verified once, not at every call
    lkt.apply(reference)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    prompts = torch.randint(0, args.vocab, (4, 6))
    P = prompts.shape[1]
    first = last = None
    for step in range(args.steps):
        policy.eval()
        with torch.no_grad():
            seqs = policy.generate(prompts, do_sample=True, max_new_tokens=args.new, min_new_tokens=args.new,
                                   num_return_sequences=args.group, pad_token_id=0, top_k=0)
            reward = (seqs[:, P:] % 2 == 0).float().mean(-1)
            r = reward.view(-1, args.group)
            adv = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)).view(-1, 1)
            ref_lp = lkt.token_logprobs(reference, seqs)[:, P - 1:]
        policy.train()
        lp = lkt.token_logprobs(policy, seqs)[:, P - 1:]  # the completion tokens' log-probabilities
        ratio = torch.exp(lp - lp.detach())  # one update per batch of samples: the old policy is this one
        kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1  # the k3 estimator of KL(policy || reference)
        loss = -(ratio * adv).mean() + args.beta * kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = reward.mean().item()
        first = mean if first is None else first
        last = mean
        print(f"step {step:3d}  reward {mean:.3f}  kl {kl.mean().item():.4f}")
    print(f"reward: {first:.3f} -> {last:.3f}")
    return first, last


if __name__ == "__main__":
    main()
