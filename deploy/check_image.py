"""Compares an image served by the containers with the in-process reference for the same prompt
and seed (`scripts/compose_test.sh`). The pixels must be equal: the image holds the same CPU torch
wheel as the virtualenv the reference runs in, on the same machine, with one diffusion rank."""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from bagel.pipeline import Pipeline
from serving.params import GenerationParams


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("png", help="the served image")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)

    params = GenerationParams(height=args.size, width=args.size, seed=args.seed)
    want = pixels(Pipeline(args.model, "cpu").generate(args.prompt, params).image)
    with Image.open(args.png) as served:
        got = pixels(served)
    if got.shape != want.shape:
        print(f"served image is {got.shape}, the reference {want.shape}")
        return 1
    diff = np.abs(got - want)
    differing = int(diff.any(axis=-1).sum())
    print(
        f"served vs in-process reference, {got.shape[1]}x{got.shape[0]}: "
        f"{differing} pixels differ, largest difference {int(diff.max())}"
    )
    return 0 if differing == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
