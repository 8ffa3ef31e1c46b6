"""``tools/benchmark.py agc``: the cost of Adaptive Gradient Clipping.

Times ``clip_grad_agc_`` on the gradients of a real NFNet backward pass against a straightforward
per-tensor Python loop, and against one full training step (forward, backward, SGD step with AGC)
of the same model.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..modeling import build_nfnet
from ..solver import build_param_groups, clip_grad_agc_, get_agc_stats, with_agc
from .harness import (
    add_common_arguments,
    describe_machine,
    format_table,
    setup_device,
    time_calls,
    time_interleaved,
    write_json,
)

__all__ = ["add_agc_arguments", "agc_loop_", "benchmark_agc", "main_agc"]


@torch.no_grad()
def agc_loop_(parameters: Iterable[torch.Tensor], clipping: float = 0.01, eps: float = 1e-3):
    """AGC written the straightforward way: a few tensor ops per parameter, in a Python loop."""
    for p in parameters:
        if p.grad is None:
            continue
        # Unit norms over every dim but the first (any memory layout, no copies); a tensor whose
        # squeezed shape has rank <= 1 is one unit.
        dims = tuple(range(1, p.dim())) if sum(d != 1 for d in p.shape) >= 2 else None
        max_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True)
        max_norm = max_norm.clamp_min(eps) * clipping
        grad_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
        p.grad.mul_(torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), 1.0))


def add_agc_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``benchmark.py agc`` to ``parser``."""
    parser.add_argument("--variant", default="F0", help="NFNet variant (default F0)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per training step")
    parser.add_argument("--image-size", type=int, default=192,
                        help="square input resolution (default 192, F0's training size)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--clipping", type=float, default=0.01)
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps")
    add_common_arguments(parser, repeats=20)


def benchmark_agc(args: argparse.Namespace) -> dict:
    """Run the AGC benchmark; return its figures (seconds, ratios, the machine and setting)."""
    device = setup_device(args)
    if args.smoke:
        args.batch_size, args.image_size, args.repeats, args.warmup = 1, 64, 1, 1
        args.train_steps = 1
    torch.manual_seed(0)
    model = build_nfnet(args.variant, num_classes=args.num_classes).to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    groups = build_param_groups(model, 0.1, 2e-5, agc_clipping=args.clipping)
    optimizer = with_agc(torch.optim.SGD)(groups, lr=0.1, momentum=0.9, nesterov=True)
    clipped = [p for g in groups if g["agc_clipping"] is not None for p in g["params"]]

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step_s, step_med = time_calls(train_step, args.train_steps, args.warmup, device)
    fraction = get_agc_stats(optimizer).get("agc_clipped_fraction", 0.0)
    # Fresh gradients of a real backward pass for the AGC timings (clipping them repeatedly
    # costs the same every time: every unit's norms are computed and its gradient rescaled).
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    timings = time_interleaved(
        {
            "batched": lambda: clip_grad_agc_(clipped, args.clipping),
            "loop": lambda: agc_loop_(clipped, args.clipping),
        },
        args.repeats, args.warmup, device,
    )
    agc, loop = timings["batched"], timings["loop"]
    return {
        "benchmark": "agc",
        "machine": describe_machine(device),
        "variant": args.variant,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "clipped_tensors": len(clipped),
        "clipped_params": sum(p.numel() for p in clipped),
        # Best of the timed calls; the medians are kept too.
        "agc_s": agc["best_s"],
        "loop_s": loop["best_s"],
        "train_step_s": step_s,
        "agc_median_s": agc["median_s"],
        "loop_median_s": loop["median_s"],
        "train_step_median_s": step_med,
        "speedup_vs_loop": loop["best_s"] / agc["best_s"],
        "agc_share_of_step": agc["best_s"] / step_s,
        "clipped_fraction_last_step": fraction,
    }


def main_agc(args: argparse.Namespace) -> dict:
    """Entry point of ``benchmark.py agc``: run, print a summary, optionally write JSON."""
    r = benchmark_agc(args)
    m = r["machine"]
    print(
        f"AGC benchmark: {r['variant']} on {m['device']} ({m.get('gpu', m['cpu'])}, "
        f"{m['threads']} threads), batch {r['batch_size']} at {r['image_size']}px, "
        f"{r['clipped_tensors']} clipped tensors ({r['clipped_params'] / 1e6:.1f}M parameters)"
    )
    ms = {k: 1e3 * v for k, v in r.items() if k.endswith("_s")}
    print(format_table(
        ["", "best ms", "median ms"],
        [
            ["clip_grad_agc_ (batched)", f"{ms['agc_s']:.2f}", f"{ms['agc_median_s']:.2f}"],
            ["per-tensor Python loop", f"{ms['loop_s']:.2f}", f"{ms['loop_median_s']:.2f}"],
            ["training step (fwd+bwd+SGD with AGC)", f"{ms['train_step_s']:.1f}",
             f"{ms['train_step_median_s']:.1f}"],
        ],
    ))
    print(f"loop / batched = {r['speedup_vs_loop']:.2f}; AGC = "
          f"{100 * r['agc_share_of_step']:.2f}% of a training step; units clipped in the last "
          f"step: {100 * r['clipped_fraction_last_step']:.1f}%")
    if args.json:
        write_json(args.json, r)
    return r
