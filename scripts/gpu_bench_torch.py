#!/usr/bin/env python3
"""PyTorch side of scripts/gpu-bench: the GPU's bf16 matmul peak, and GPT-2
training throughput in plain PyTorch on the same model, batch and optimizer as
`mics gpu-bench` (docs/gpu.md).

    python3 scripts/gpu_bench_torch.py --part peak
    python3 scripts/gpu_bench_torch.py --part eager   [--steps 10 --warmup 3 --micro-batch 8 --seq 1024]
    python3 scripts/gpu_bench_torch.py --part compile [--time-budget 120]

Each run prints ONE JSON line on stdout (progress goes to stderr); a failure
is a line with "error" and a non-zero exit status.

The model is GPT-2 written in plain torch (no transformers), the same math as
models/gpt: pre-norm blocks, fused qkv projection, explicit softmax attention
with an additive -10000 causal bias (not scaled_dot_product_attention, so that
both sides compute the same full score matrix), tanh GELU, LM head tied to the
token embeddings, weights N(0, 0.02) (positions N(0, 0.01)). Parameters are
bf16 (no fp32 master copy, as Burn's `Cuda<bf16>`), AdamW(lr, betas
0.9/0.999, eps 1e-5, weight decay 1e-4), cross-entropy on the shifted tokens
of synthetic random batches (fixed seed).
"""

import argparse
import json
import math
import sys
import time


def log(msg):
    print(f"gpu_bench_torch: {msg}", file=sys.stderr, flush=True)


def model_config(name, seq):
    if name == "gpt2-124m":
        cfg = dict(vocab=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    else:
        cfg = dict(vocab=256, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    cfg["n_positions"] = max(cfg["n_positions"], seq)
    return cfg


def build_model(torch, cfg):
    nn = torch.nn
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self, d, n_head):
            super().__init__()
            self.n_head = n_head
            self.ln_1 = nn.LayerNorm(d, eps=1e-5)
            self.c_attn = nn.Linear(d, 3 * d)
            self.c_proj = nn.Linear(d, d)
            self.ln_2 = nn.LayerNorm(d, eps=1e-5)
            self.c_fc = nn.Linear(d, 4 * d)
            self.mlp_proj = nn.Linear(4 * d, d)

        def attn(self, x, bias):
            b, t, d = x.shape
            hd = d // self.n_head
            q, k, v = self.c_attn(x).split(d, dim=2)
            q, k, v = (y.view(b, t, self.n_head, hd).transpose(1, 2) for y in (q, k, v))
            scores = (q @ k.transpose(2, 3)) / math.sqrt(hd) + bias
            ctx = torch.softmax(scores, dim=-1) @ v
            return self.c_proj(ctx.transpose(1, 2).reshape(b, t, d))

        def forward(self, x, bias):
            x = x + self.attn(self.ln_1(x), bias)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class Gpt2(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            d = cfg["n_embd"]
            self.wte = nn.Embedding(cfg["vocab"], d)
            self.wpe = nn.Embedding(cfg["n_positions"], d)
            self.h = nn.ModuleList(Block(d, cfg["n_head"]) for _ in range(cfg["n_layer"]))
            self.ln_f = nn.LayerNorm(d, eps=1e-5)
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif "ln_" in name:
                    nn.init.ones_(p)
                elif name.startswith("wpe"):
                    nn.init.normal_(p, std=0.01)
                else:
                    nn.init.normal_(p, std=0.02)

        def forward(self, idx, targets):
            b, t = idx.shape
            pos = torch.arange(t, device=idx.device)
            x = self.wte(idx) + self.wpe(pos)[None]
            bias = torch.full((t, t), -10000.0, device=idx.device, dtype=x.dtype).triu(1)
            for block in self.h:
                x = block(x, bias)
            logits = self.ln_f(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t))

    return Gpt2(cfg)


def measure_peak(torch, device):
    """bf16 dense matmul 8192^3, best of a few timed batches."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    iters = 20
    for _ in range(3):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        best = max(best, 2 * n**3 * iters / seconds / 1e12)
    return {
        "part": "peak",
        "peak_bf16_tflops": round(best, 1),
        "matmul": "bf16 8192x8192 @ 8192x8192, 20 per timing, best of 3",
        "gpu": torch.cuda.get_device_name(0),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
    }


def train(torch, args, compiled):
    started = time.time()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = model_config(args.model, args.seq)
    torch.manual_seed(args.seed)
    model = build_model(torch, cfg).to(device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    flops_params = params - cfg["n_positions"] * cfg["n_embd"]
    flops_per_token = 6.0 * flops_params + 12.0 * cfg["n_layer"] * args.seq * cfg["n_embd"]
    optim = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-4
    )
    step_fn = model
    if compiled:
        step_fn = torch.compile(model)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def mem_used():
        if not cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return total - free, total

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = mem_used()
    peak_used = None
    warmup_s, step_s, losses = [], [], []
    step = 0
    while True:
        if len(warmup_s) >= args.warmup:
            if len(step_s) >= max(args.steps, 1):
                break
            if args.time_budget and step_s:
                mean = sum(step_s) / len(step_s)
                if time.time() - started + mean > args.time_budget:
                    break
        tokens = torch.randint(0, cfg["vocab"], (args.micro_batch, args.seq + 1), generator=gen)
        tokens = tokens.to(device)
        t0 = time.perf_counter()
        loss = step_fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        value = loss.item()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        (warmup_s if len(warmup_s) < args.warmup else step_s).append(seconds)
        losses.append(value)
        used = mem_used()
        if used is not None:
            peak_used = used[0] if peak_used is None else max(peak_used, used[0])
        log(f"{args.part} step {step} {seconds:.4f} s loss {value:.4f} (at {time.time() - started:.1f} s)")
        step += 1

    mean = sum(step_s) / len(step_s)
    ordered = sorted(step_s)
    k = len(ordered)
    median = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    tokens_per_step = args.micro_batch * args.seq
    tokens_per_s = tokens_per_step / mean
    achieved = tokens_per_s * flops_per_token / 1e12
    gib = lambda b: None if b is None else round(b / 2**30, 3)
    report = {
        "part": "torch_compile" if compiled else "torch_eager",
        "backend": "torch",
        "device": device.type,
        "dtype": args.dtype,
        "model": args.model,
        "n_layer": cfg["n_layer"],
        "n_embd": cfg["n_embd"],
        "n_head": cfg["n_head"],
        "vocab_size": cfg["vocab"],
        "seq": args.seq,
        "micro_batch": args.micro_batch,
        "tokens_per_step": tokens_per_step,
        "params": params,
        "params_for_flops": flops_params,
        "flops_per_token": flops_per_token,
        "warmup_steps": len(warmup_s),
        "timed_steps": len(step_s),
        "first_step_s": round((warmup_s or step_s)[0], 4),
        "warmup_s": round(sum(warmup_s), 3),
        "step_s_mean": round(mean, 5),
        "step_s_median": round(median, 5),
        "step_s_min": round(ordered[0], 5),
        "step_s_max": round(ordered[-1], 5),
        "tokens_per_s": round(tokens_per_s, 1),
        "achieved_tflops": round(achieved, 3),
        "mfu": round(achieved / args.peak_tflops, 4) if args.peak_tflops else None,
        "losses": [round(x, 4) for x in losses],
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "loss_finite": all(math.isfinite(x) for x in losses),
        "device_total_gib": gib(baseline[1]) if baseline else None,
        "baseline_device_used_gib": gib(baseline[0]) if baseline else None,
        "peak_device_used_gib": gib(peak_used),
        "torch_max_memory_allocated_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "torch_max_memory_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
        "torch_version": torch.__version__,
        "wall_s": round(time.time() - started, 3),
    }
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["peak", "eager", "compile"], default="eager")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--model", choices=["gpt2-124m", "tiny"], default="gpt2-124m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="stop the timed steps early (at least one) after this many seconds")
    ap.add_argument("--peak-tflops", type=float, default=None, help="to report MFU")
    args = ap.parse_args()
    if args.seq is None:
        args.seq = 1024 if args.model == "gpt2-124m" else 32
    part = {"peak": "peak", "eager": "torch_eager", "compile": "torch_compile"}[args.part]
    try:
        import torch

        if args.part == "peak":
            report = measure_peak(torch, torch.device(args.device))
        else:
            report = train(torch, args, compiled=args.part == "compile")
        print(json.dumps(report), flush=True)
        return 0
    except Exception as exc:  # the script records any failure as this part's error
        print(json.dumps({"part": part, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
