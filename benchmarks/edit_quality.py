"""Edit quality on the trained tiny checkpoint (examples/tiny_shapes): the 12 edit instructions of
`check.EDIT_EVAL_PROMPTS`, each on its rendered source, through the one-process `Pipeline.edit`
with the service's editing defaults, at each number of timesteps asked.

Per kind of edit (recolour, reshape, background) and in all: how many pass `check_edit`, how many
get each attribute right, and the largest centroid shift from the source. Prints one table; the
last line is one JSON object.

    python -m benchmarks.edit_quality --device cpu --timesteps 20,50
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: the repo root, not benchmarks/, heads the import path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import math

from bagel.pipeline import Pipeline
from benchmarks._report import emit_json
from examples.tiny_shapes.check import EDIT_EVAL_PROMPTS, check_edit
from examples.tiny_shapes.data import EDIT_KINDS, IMAGE_SIZE
from examples.tiny_shapes.edit_inputs import EDIT_RESIZE
from serving.imaging.input_images import EDIT_DEFAULTS
from serving.params import GenerationParams

CHECKPOINT = Path(__file__).resolve().parents[1] / "examples" / "tiny_shapes" / "checkpoint"


def edit_results(pipeline: Pipeline, timesteps: int) -> list[dict]:
    rows = []
    for prompt in EDIT_EVAL_PROMPTS:
        params = GenerationParams(
            **EDIT_DEFAULTS,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_timesteps=timesteps,
            seed=prompt.seed,
        )
        image = pipeline.edit(prompt.source_image(), prompt.text, params, rules=EDIT_RESIZE).image
        verdict = check_edit(image, prompt.text, prompt.source)
        shift = math.dist(verdict.centre, prompt.source.centre) if verdict.centre else float("inf")
        found = verdict.found
        rows.append(
            {
                "kind": prompt.edit.kind,
                "instruction": prompt.text,
                "passed": verdict.passed,
                "colour_ok": found.colour_ok,
                "shape_ok": found.shape_ok,
                "background_ok": found.background_ok,
                "centre_shift_px": round(shift, 2),
            }
        )
    return rows


def summarise(rows: list[dict]) -> dict:
    return {
        "passed": sum(r["passed"] for r in rows),
        "colour_ok": sum(r["colour_ok"] for r in rows),
        "shape_ok": sum(r["shape_ok"] for r in rows),
        "background_ok": sum(r["background_ok"] for r in rows),
        "count": len(rows),
        "max_centre_shift_px": max(r["centre_shift_px"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.edit_quality",
        description="The 12 tiny shapes edit instructions through Pipeline.edit, judged by pixels.",
    )
    parser.add_argument("--model", default=str(CHECKPOINT), help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument(
        "--timesteps",
        default="20,50",
        help="comma-separated timestep counts (default: %(default)s)",
    )
    parser.add_argument("--json", default=None, help="also write the JSON summary to this file")
    args = parser.parse_args()
    pipeline = Pipeline(args.model, args.device)
    summary: dict = {"model": args.model, "device": args.device, "runs": {}}
    print(f"{'timesteps':>9} {'edit':>10} {'pass':>5} {'colour':>6} {'shape':>5} {'ground':>6} "
          f"{'max shift px':>12}")  # fmt: skip
    for timesteps in (int(t) for t in args.timesteps.split(",")):
        rows = edit_results(pipeline, timesteps)
        groups = {kind: [r for r in rows if r["kind"] == kind] for kind in EDIT_KINDS}
        groups["all"] = rows
        run = {name: summarise(group) for name, group in groups.items()}
        for name, s in run.items():
            print(
                f"{timesteps:>9} {name:>10} {s['passed']:>2}/{s['count']:<2} {s['colour_ok']:>6} "
                f"{s['shape_ok']:>5} {s['background_ok']:>6} {s['max_centre_shift_px']:>12.1f}"
            )
        summary["runs"][str(timesteps)] = {**run, "edits": rows}
    emit_json(summary, args.json)


if __name__ == "__main__":
    main()
