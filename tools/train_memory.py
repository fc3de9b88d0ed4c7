"""Where a training step's memory peaks, on the GPU: one step of `moekit bench train`'s experts stage per path,
its backward under torch.cuda's allocation history, then the tensors live at the backward's peak, largest first,
each with the moekit (or autograd) line that allocated it. An allocation with no Python line is autograd's own
(a materialized zero gradient, an accumulated gradient). Found triton_grouped's [M, F] of zeros for an absent
gradient (0.47 GB at Mixtral T=8192).

  python tools/train_memory.py --shape mixtral --tokens 8192 --paths triton_grouped,torchtitan_peer [--top 8]
  python tools/train_memory.py --snapshot PATH   (a snapshot pickled by an earlier run: the report alone)
"""

import argparse
import pickle

import torch

from moekit.bench.forward import SHAPES
from moekit.bench.train import train_step
from moekit.config import MoEConfig
from moekit.problem import make_problem


def live_at_peak(snapshot: dict) -> tuple[int, list[dict]]:
    """(peak bytes, the allocation events live then): the device trace replayed, frees at free_completed."""
    live, current, peak, at_peak = {}, 0, 0, []
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return peak, sorted(at_peak, key=lambda e: -e["size"])


def allocation_site(event: dict) -> str:
    frames = [f for f in event.get("frames", []) if "moekit" in f["filename"] or "autograd" in f["filename"]]
    return " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in frames[:3]) or "autograd"


def report(snapshot: dict, top: int) -> None:
    peak, live = live_at_peak(snapshot)
    print(f"  allocated during backward, at its peak: {peak / 1e9:.3f} GB")
    for event in live[:top]:
        print(f"  {event['size'] / 1e9:8.3f} GB  {allocation_site(event)}")


def record(shape: str, tokens: int, path: str) -> dict:
    config = MoEConfig(**SHAPES[shape], router="topk_softmax", dtype=torch.bfloat16)
    step = train_step(make_problem(config, tokens, seed=0, device="cuda"), path)
    step.step()  # compiled and tuned outside the record
    for leaf in step.leaves:
        leaf.grad = None
    y = step.forward()
    dy = torch.randn_like(y)
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    y.backward(dy)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--paths", default="triton_grouped,torchtitan_peer")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--snapshot", help="report on this pickled snapshot instead of running a step")
    args = parser.parse_args()
    if args.snapshot:
        with open(args.snapshot, "rb") as f:
            report(pickle.load(f), args.top)
        return
    for path in args.paths.split(","):
        print(f"{args.shape} T={args.tokens} {path}")
        report(record(args.shape, args.tokens, path), args.top)


if __name__ == "__main__":
    main()
