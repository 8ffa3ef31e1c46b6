"""Shared machinery of ``tools/benchmark.py``: interleaved timing, peak memory, the machine's
description, tables and JSON.

Timing: the cases of a benchmark run in one process, interleaved (repeat 1 of every case, then
repeat 2, ...), so a slow spell of a shared machine hits every case alike; each case reports the
median of its repeats. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
tensor allocations recorded by the torch profiler during one call, as the highest point of the
running total above what was live before the call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "add_common_arguments",
    "autocast",
    "describe_machine",
    "format_table",
    "peak_memory_bytes",
    "setup_device",
    "synchronize",
    "time_calls",
    "time_interleaved",
    "write_json",
]


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 5,
                         warmup: int = 3) -> None:
    """``--device --threads --repeats --warmup --json --smoke``, shared by the subcommands."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when present); CUDA runs use bf16 "
                        "autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed calls of every case (interleaved); medians are reported")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help="untimed calls of every case first (compiles compiled cases)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one repeat: checks that the benchmark works")
    parser.add_argument("--verbose", action="store_true", help="log warm-ups and repeats")


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and return ``--device``; fails clearly when CUDA is asked for but
    absent."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device is available")
        torch.backends.cudnn.benchmark = True
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine(device: torch.device) -> dict:
    """What the figures were measured on: device, CPU, cores, threads and versions."""
    info = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["precision"] = "bf16 autocast"
    else:
        info["precision"] = "fp32"
    return info


def time_calls(
    fn: Callable[[], object], iters: int, warmup: int, device: torch.device
) -> tuple[float, float]:
    """(best, median) seconds per call of ``fn``, timed on its own."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def time_interleaved(
    cases: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Time every case ``repeats`` times, interleaved; return per case its median, best and
    first-warmup seconds (the warm-up of a compiled case is its compile time).

    Warm-up rounds are interleaved like the timed ones, so every case starts timing in the same
    settled process (on CPU the first calls of a case page in fresh memory, and so slow down
    the calls of other cases too). Rounds alternate their order (A B, then B A): no case
    always runs right after the same other one.
    """
    names = list(cases)
    warm: dict[str, float] = {name: 0.0 for name in names}
    for r in range(warmup):
        for name in names:
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            if r == 0:
                warm[name] = time.perf_counter() - start
        if log:
            log(f"  warm-up {r + 1}/{warmup} done"
                + ("" if r else " (" + ", ".join(f"{n}: {warm[n]:.1f} s" for n in names) + ")"))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            synchronize(device)
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        if log:
            log(f"  repeat {r + 1}/{repeats} done")
    return {
        name: {
            "median_s": statistics.median(ts),
            "best_s": min(ts),
            "warmup_s": warm[name],
            "repeats": len(ts),
        }
        for name, ts in times.items()
    }


def peak_memory_bytes(fn: Callable[[], object], device: torch.device,
                      setup: Callable[[], object] | None = None) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    ``setup`` runs first, outside the measurement: e.g. drop the gradients of a previous step
    (``zero_grad(set_to_none=True)``), so that the step's own gradients count, instead of being
    offset by freeing the old ones.
    """
    if setup is not None:
        setup()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # positive: allocation, negative: free
        peak = max(peak, live)
    return peak


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A fixed-width text table (numbers right-aligned)."""
    rows = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` (a temporary file renamed over it: a crash leaves the old
    file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
