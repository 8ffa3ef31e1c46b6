"""``tools/benchmark.py backbone``: nfdet's NFNet against timm's ``dm_nfnet_f*`` and
torchvision's ResNet-50.

One process builds the three models (timm's with random weights and non-zero skip gains,
converted into nfdet's with ``convert_timm_state_dict``, so both compute the same function),
checks that nfdet's and timm's logits agree, then times every combination of

- model: nfdet, timm, resnet50;
- configuration: "default" (the model as built, NCHW input), "channels_last" (model and input
  in channels_last) and "compile" (channels_last plus ``torch.compile``);
- mode: "eval" (``no_grad`` forward) and "train" (forward, cross-entropy, backward);
- resolution: the variant's train and test sizes (``configs/pretrain/nfnet_<v>_imagenet.yaml``).

The cases of one resolution and mode are timed together, interleaved (one size and mode after
another). A model's "best" is its fastest configuration. CUDA runs use bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from ..checkpoint import convert_timm_state_dict
from ..classification.config import load_pretrain_cfg
from ..modeling import build_nfnet
from ..modeling.variants import canonical_name
from .harness import (
    add_common_arguments,
    autocast,
    describe_machine,
    format_table,
    peak_memory_bytes,
    setup_device,
    time_interleaved,
    write_json,
)

__all__ = ["add_backbone_arguments", "benchmark_backbone", "main_backbone"]

MODELS = ("nfdet", "timm", "resnet50")
CONFIGS = ("default", "channels_last", "compile")
MODES = ("eval", "train")


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``benchmark.py backbone`` to ``parser``."""
    parser.add_argument("--variant", default="F0", help="NFNet variant F0..F7 (default F0)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call")
    parser.add_argument("--sizes", default="",
                        help="comma-separated square resolutions (default: the variant's train "
                        "and test sizes from configs/pretrain)")
    parser.add_argument("--models", default=",".join(MODELS), help="subset of " + ",".join(MODELS))
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="subset of " + ",".join(CONFIGS))
    parser.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES))
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the 'compile' configuration")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest |nfdet - timm| logit difference, relative to max |logit|")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    add_common_arguments(parser)


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: {bad or value!r} not in {', '.join(allowed)}")
    return items


def variant_sizes(variant: str) -> list[int]:
    """The train and test resolutions of the variant's pretraining config."""
    cfg = load_pretrain_cfg(f"pretrain/nfnet_{variant.lower()}_imagenet.yaml")
    return [cfg.INPUT.TRAIN_SIZE, cfg.INPUT.TEST_SIZE]


def _timm_pair(variant: str, device: torch.device):
    """timm's ``dm_nfnet_<v>`` and an nfdet model loaded with the same weights.

    The weights are random with unit variance and skip gains of 0.5, so every branch counts.
    timm adds its eps (1e-5) to the weight variance where DeepMind (and nfdet) floor
    ``var * fan_in`` at 1e-4: the two agree for weights of real scale, not for tiny ones such as
    timm's own initialisation, whose variance is ~1/fan_in.
    """
    import timm

    torch.manual_seed(0)
    reference = timm.create_model(f"dm_nfnet_{variant.lower()}")
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("skipinit_gain"):
                p.fill_(0.5)
            elif name.endswith("weight"):
                p.normal_(0.0, 1.0)
    state, _, num_classes = convert_timm_state_dict(reference.state_dict(), variant)
    ours = build_nfnet(variant, num_classes=num_classes)
    ours.load_state_dict(state)
    return ours.to(device), reference.to(device)


def check_agreement(ours, reference, size: int, device: torch.device, tolerance: float) -> float:
    """Max |ours - reference| of eval logits (fp32) relative to max |logit|; raises if above
    ``tolerance``."""
    x = torch.randn(2, 3, size, size, device=device)
    ours.eval()
    reference.eval()
    with torch.no_grad():
        want, got = reference(x).float(), ours(x).float()
    err = ((want - got).abs().max() / want.abs().max()).item()
    if not err <= tolerance:
        raise SystemExit(
            f"nfdet and timm logits differ by {err:.2e} of max |logit| (tolerance {tolerance}): "
            "not timing models that compute different things"
        )
    return err


def _case(model, compiled, mode: str, x: torch.Tensor, labels: torch.Tensor,
          device: torch.device):
    """One call of ``compiled`` (the model or its compiled wrapper) on ``x``; ``model`` is
    already in the case's layout and mode."""
    if mode == "eval":
        def call() -> None:
            with torch.no_grad(), autocast(device):
                compiled(x)
    else:
        def call() -> None:
            with autocast(device):
                loss = F.cross_entropy(compiled(x).float(), labels)
            loss.backward()
            # Free the gradients: no case leaves memory behind for the cases timed after it.
            model.zero_grad(set_to_none=True)
    return call


def benchmark_backbone(args: argparse.Namespace) -> dict:
    """Run the benchmark; return the machine, the setting and one row per case."""
    device = setup_device(args)
    variant = canonical_name(args.variant)
    if args.smoke:
        # Tiny and quick; torch.compile only traces (inductor's C++ build takes minutes).
        args.batch_size, args.repeats, args.warmup = 1, 1, 1
        args.sizes = args.sizes or "64"
        args.compile_backend = "eager"
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else variant_sizes(variant)
    models = _split(args.models, MODELS, "--models")
    configs = _split(args.configs, CONFIGS, "--configs")
    modes = _split(args.modes, MODES, "--modes")

    built = {}
    agreement = None
    if "timm" in models:
        built["nfdet"], built["timm"] = _timm_pair(variant, device)
        agreement = check_agreement(built["nfdet"], built["timm"], sizes[0], device,
                                    args.tolerance)
    elif "nfdet" in models:
        built["nfdet"] = build_nfnet(variant).to(device)
    if "resnet50" in models:
        import torchvision

        built["resnet50"] = torchvision.models.resnet50().to(device)
    built = {name: built[name] for name in models}

    # One copy of every model per layout and mode (and size in eval): switching a module's
    # layout or mode between calls would cost time of its own, and so would alternating input
    # shapes for nfdet's eval weights, packed for one shape (a fixed-size evaluation keeps one).
    copies = {}

    def copy_for(name: str, layout: str, mode: str, size: int) -> torch.nn.Module:
        key = (name, layout, mode, size if mode == "eval" else None)
        if key not in copies:
            clone = copy.deepcopy(built[name])
            if layout == "channels_last":
                clone = clone.to(memory_format=torch.channels_last)
            copies[key] = clone.train(mode == "train")
        return copies[key]

    gen = torch.Generator().manual_seed(0)
    log = (lambda s: print(s, flush=True)) if args.verbose else None
    rows = []
    # One size after another (the cases of a size interleaved), and a size's eval copies freed
    # before the next: a process holding every copy at once ran measurably slower.
    for size in sizes:
        x = torch.randn(args.batch_size, 3, size, size, generator=gen).to(device)
        labels = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        cases, keys, timings = {}, {}, {}
        for mode in modes:
            # A mode's cases are timed together, apart from the other mode's: a training step
            # frees much memory, which changes how fast the eval calls after it get memory (an
            # inference process does not interleave training steps; docs/benchmarks.md, "Timing
            # protocol").
            mode_cases = {}
            for config in configs:
                for name in built:
                    layout = "nchw" if config == "default" else "channels_last"
                    model = copy_for(name, layout, mode, size)
                    # Static shapes: one compile per size (the default would recompile the
                    # second size with dynamic shapes, slower to build and to run).
                    compiled = (torch.compile(model, backend=args.compile_backend, dynamic=False)
                                if config == "compile" else model)
                    label = f"{name} {config} {mode} {size}px"
                    mode_cases[label] = _case(model, compiled, mode,
                                              x if layout == "nchw" else x_cl, labels, device)
                    keys[label] = (name, config, mode, size)
            timings.update(time_interleaved(mode_cases, args.repeats, args.warmup, device,
                                            log=log))
            cases.update(mode_cases)
        for label, (name, config, mode, _) in keys.items():
            t = timings[label]
            row = {
                "model": name, "config": config, "mode": mode, "size": size,
                "batch_size": args.batch_size, "median_s": t["median_s"], "best_s": t["best_s"],
                "warmup_s": t["warmup_s"], "images_per_s": args.batch_size / t["median_s"],
            }
            if not args.no_memory:
                # A training case ends with its gradients freed, so its peak counts its own.
                row["peak_memory_mb"] = peak_memory_bytes(cases[label], device) / 2**20
            rows.append(row)
        for key in [k for k in copies if k[2] == "eval" and k[3] == size]:
            del copies[key]
        del cases
    return {
        "benchmark": "backbone",
        "machine": describe_machine(device),
        "variant": variant,
        "batch_size": args.batch_size,
        "sizes": sizes,
        "repeats": args.repeats,
        "compile_backend": args.compile_backend,
        "nfdet_vs_timm_max_rel_logit_diff": agreement,
        "rows": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Speed-ups of nfdet over timm (and ResNet-50) per mode and size: default vs default and
    best vs best (the fastest configuration of each model)."""
    by = {(r["model"], r["config"], r["mode"], r["size"]): r["median_s"] for r in rows}
    out = []
    for mode, size in sorted({(r["mode"], r["size"]) for r in rows}):
        for other in ("timm", "resnet50"):
            entry = {"mode": mode, "size": size, "vs": other}
            ours_default = by.get(("nfdet", "default", mode, size))
            theirs_default = by.get((other, "default", mode, size))
            if ours_default and theirs_default:
                entry["default_speedup"] = theirs_default / ours_default
            ours = {c: t for (m, c, mo, s), t in by.items() if (m, mo, s) == ("nfdet", mode, size)}
            theirs = {c: t for (m, c, mo, s), t in by.items() if (m, mo, s) == (other, mode, size)}
            if ours and theirs:
                best_ours = min(ours, key=ours.get)
                best_theirs = min(theirs, key=theirs.get)
                entry.update(
                    best_speedup=theirs[best_theirs] / ours[best_ours],
                    nfdet_best=best_ours, other_best=best_theirs,
                )
            if len(entry) > 3:
                out.append(entry)
    return out


def main_backbone(args: argparse.Namespace) -> dict:
    """Entry point of ``benchmark.py backbone``: run, print the tables, optionally write JSON."""
    r = benchmark_backbone(args)
    m = r["machine"]
    print(f"Backbone benchmark: NFNet-{r['variant']} on {m['device']} ({m.get('gpu', m['cpu'])}, "
          f"{m['threads']} threads, {m['precision']}), batch {r['batch_size']}, "
          f"median of {r['repeats']} interleaved repeats")
    if r["nfdet_vs_timm_max_rel_logit_diff"] is not None:
        print(f"nfdet vs timm logits: max difference {r['nfdet_vs_timm_max_rel_logit_diff']:.1e} "
              "of max |logit|")
    headers = ["model", "config", "mode", "px", "ms/batch", "img/s"]
    if not args.no_memory:
        headers.append("peak MB")
    table = []
    for row in r["rows"]:
        line = [row["model"], row["config"], row["mode"], row["size"], 1e3 * row["median_s"],
                row["images_per_s"]]
        if not args.no_memory:
            line.append(row["peak_memory_mb"])
        table.append(line)
    print(format_table(headers, table))
    print()
    summary = [
        [s["mode"], s["size"], s["vs"],
         f"{s['default_speedup']:.2f}x" if "default_speedup" in s else "-",
         f"{s['best_speedup']:.2f}x ({s['nfdet_best']} vs {s['other_best']})"
         if "best_speedup" in s else "-"]
        for s in r["summary"]
    ]
    print(format_table(["mode", "px", "nfdet vs", "default", "best"], summary))
    if args.json:
        write_json(args.json, r)
    return r
