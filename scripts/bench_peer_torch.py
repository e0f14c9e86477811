#!/usr/bin/env python3
"""PyTorch side of scripts/bench-peer: the GPT-2 of configs/gpt2-shakespeare.toml
trained in plain PyTorch eager on the CPU, with the same sizes, global batch,
AdamW and clipping as `mics train`, on random tokens.

    python3 scripts/bench_peer_torch.py [--steps 20 --warmup 3 --threads 2]

Prints ONE JSON line: tokens/s over the timed steps and the peak RSS. The
model is the same math as models/gpt (pre-norm blocks, fused qkv, tanh GELU,
additive causal bias, LM head tied to the token embeddings); the loss is
PyTorch's own cross-entropy over the full logits (what a PyTorch user writes).
"""

import argparse
import json
import math
import resource
import sys
import time


def build_model(torch, vocab, d, n_layer, n_head, n_positions):
    nn = torch.nn
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(d, eps=1e-5)
            self.c_attn = nn.Linear(d, 3 * d)
            self.c_proj = nn.Linear(d, d)
            self.ln_2 = nn.LayerNorm(d, eps=1e-5)
            self.c_fc = nn.Linear(d, 4 * d)
            self.mlp_proj = nn.Linear(4 * d, d)

        def forward(self, x, bias):
            b, t, _ = x.shape
            hd = d // n_head
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (y.view(b, t, n_head, hd).transpose(1, 2) for y in (q, k, v))
            scores = (q @ k.transpose(2, 3)) / math.sqrt(hd) + bias
            ctx = torch.softmax(scores, dim=-1) @ v
            x = x + self.c_proj(ctx.transpose(1, 2).reshape(b, t, d))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class Gpt2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(n_positions, d)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d, eps=1e-5)

        def forward(self, idx, targets):
            b, t = idx.shape
            x = self.wte(idx) + self.wpe(torch.arange(t))[None]
            bias = torch.full((t, t), -10000.0).triu(1)
            for block in self.h:
                x = block(x, bias)
            logits = self.ln_f(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t))

    return Gpt2()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, d, n_layer, n_head = 50257, 128, 4, 4
    model = build_model(torch, vocab, d, n_layer, n_head, args.seq)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)

    def step():
        idx = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)
        loss = model(idx[:, :-1], idx[:, 1:])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq
    print(json.dumps({
        "torch": torch.__version__,
        "threads": args.threads,
        "tokens_per_s": tokens / seconds,
        "step_seconds": seconds / args.steps,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "last_loss": loss,
    }))


if __name__ == "__main__":
    sys.exit(main())
