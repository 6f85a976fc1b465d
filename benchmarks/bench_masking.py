"""Time mask generation, token reduction and negative sampling (target: a 32 x 2000-frame mask < 1 ms).

Run on a quiet machine: `OMP_NUM_THREADS=2 python benchmarks/bench_masking.py`.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_ssl_speech.masking import compute_frame_mask, frame_to_token_mask, sample_negatives

SETTINGS = {  # strategy: (mask_time_prob, mask_time_length), the reference recipes
    "span": (0.065, 10),
    "patch": (0.5, 48),
    "block": (0.01, 40),
}


def _best_of(fn, repeats: int) -> float:
    """Median of `repeats` timings in milliseconds, after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--negatives", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    # unequal lengths, as in a real batch
    lengths = torch.randint(args.frames // 2, args.frames + 1, (args.batch,), generator=generator)
    lengths[0] = args.frames
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} x {args.frames} frames")
    for strategy, (prob, span) in SETTINGS.items():
        ms = _best_of(
            lambda s=strategy, p=prob, L=span: compute_frame_mask(s, lengths, args.frames, p, L, 1, generator),
            args.repeats,
        )
        print(f"mask {strategy:6s} p={prob} L={span}: {ms:.3f} ms (median)")
    frame_mask = compute_frame_mask("block", lengths, args.frames, 0.01, 40, 1, generator)
    ms = _best_of(lambda: frame_to_token_mask(frame_mask, lengths, args.factor, 0.8), args.repeats)
    print(f"frame -> token mask (factor {args.factor}): {ms:.3f} ms")
    token_mask = frame_to_token_mask(frame_mask, lengths, args.factor, 0.8)
    ms = _best_of(lambda: sample_negatives(token_mask, args.negatives, generator), max(args.repeats // 10, 5))
    print(f"negatives K={args.negatives} for {int(token_mask.sum())} masked tokens: {ms:.3f} ms")


if __name__ == "__main__":
    main()
