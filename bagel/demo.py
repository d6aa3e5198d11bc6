"""`python -m bagel.demo --model DIR --out PNG`: one in-process generation (no services)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bagel.params import GenerationParams
from bagel.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="out/demo.png")
    parser.add_argument("--prompt", default="A cute cat sitting on a wooden table")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=52)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    params = GenerationParams(
        height=args.size, width=args.size, num_timesteps=args.steps, seed=args.seed
    )
    start = time.perf_counter()
    result = Pipeline(args.model, args.device).generate(args.prompt, params)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.out)
    print(f"wrote {args.out} ({args.size}x{args.size}) in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
