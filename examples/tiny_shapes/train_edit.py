"""`python -m examples.tiny_shapes.train_edit --init examples/tiny_shapes/checkpoint --out DIR
--device cuda`: teach the trained tiny shapes BAGEL to edit, through the served edit path.

Continues from the text-to-image checkpoint `--init` on fresh edit pairs (`data.EditPairGenerator`:
recolour, reshape, new background), with the language model, the ViT and the connector trained
together and the autoencoder frozen. Each batch mixes:
- edits in BAGEL's three contexts (`edit_flow`): image + instruction (`cond`); the image alone
  (`uncond_text`, cfg_text); the instruction alone (`uncond_img`, cfg_img); and the empty one;
- text-to-image samples (the target's caption, sometimes dropped), so that generation keeps
  working.
The loss is the target's rectified flow, as for text-to-image. The directory gets
`ema.safetensors` (the same keys and dtypes, the EMA weights), the other files of `--init`
unchanged, `edit_train_log.json`, `samples.png` (the text-to-image check again) and
`edit_samples.png` (source and edit side by side). `--device cpu --smoke` runs two steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from bagel.checkpoints.checkpoint import EMA_FILE, load_autoencoder, load_bagel, load_vit
from bagel.network.autoencoder import AutoEncoder
from bagel.network.latents import latent_position_ids
from bagel.network.model import Bagel
from bagel.network.vit import ImageContextEncoder
from bagel.pipeline import Pipeline
from bagel.text.tokenizer import PromptTokenizer, load_tokenizer
from examples.tiny_shapes.check import EDIT_EVAL_PROMPTS, check_edit
from examples.tiny_shapes.data import IMAGE_SIZE, EditPairGenerator
from examples.tiny_shapes.edit_flow import EditContexts, edit_flow_loss
from examples.tiny_shapes.edit_inputs import EDIT_RESIZE, as_8_bit, vit_patches, vit_pixels
from examples.tiny_shapes.flow import pad_prompts, patchify_batch, sample_t
from examples.tiny_shapes.train import (
    Clock,
    LossLog,
    autocast,
    device_name,
    evaluate,
    lr_factor,
    synchronize,
    uses_bf16,
)
from serving.imaging.input_images import EDIT_DEFAULTS
from serving.params import GenerationParams

FROZEN = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")  # the fixed sincos tables


@dataclass
class EditSettings:
    init: str  # the text-to-image checkpoint to continue from
    out: str
    device: str = "cuda"
    seed: int = 0
    minutes: float = 8.5  # training; loading, the final checks and writing add about 35 s
    batch: int = 512
    lr: float = 3e-4
    max_steps: int = 0  # 0: until the time is up
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    text_to_image_share: float = 0.2  # of each batch: a caption and its image, no input image
    caption_dropout: float = 0.1  # text-to-image samples with the empty context
    # Edit samples' contexts: the rest keep image and instruction (cond).
    image_only: float = 0.1  # uncond_text, what cfg_text subtracts
    instruction_only: float = 0.1  # uncond_img, what cfg_img subtracts
    empty: float = 0.05
    precision: str = "bf16"
    eval_timesteps: int = 20
    eval_prompts: int = len(EDIT_EVAL_PROMPTS)
    log_every_s: float = 15.0

    @classmethod
    def smoke(cls, init: str, out: str, device: str, seed: int) -> EditSettings:
        return cls(
            init=init,
            out=out,
            device=device,
            seed=seed,
            batch=4,
            max_steps=2,
            warmup_steps=1,
            eval_timesteps=3,
            eval_prompts=2,
            log_every_s=0.0,
        )


class PromptIds:
    """Framed token ids of each text, encoded once (the generator writes a few hundred)."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = [self.cache.setdefault(t, self.tokenizer.encode_prompt(t)) for t in texts]
        return pad_prompts(ids)


@dataclass
class TrainingBatch:
    contexts: EditContexts
    x0: Tensor  # [B, n, patch_dim]: the target's latent tokens


@torch.no_grad()
def training_batch(
    data: EditPairGenerator,
    ae: AutoEncoder,
    prompt_ids: PromptIds,
    settings: EditSettings,
    choice: torch.Generator,
    patch: int,
) -> TrainingBatch:
    """A batch of edit pairs turned into contexts and target latents; which context each sample
    gets is drawn from `choice` (CPU)."""
    device = torch.device(settings.device)
    pairs = data.edit_batch(settings.batch)
    with autocast(settings):
        source = ae.encode(as_8_bit(pairs.sources))
        target = ae.encode(as_8_bit(pairs.targets))
    patches, ids = vit_patches(vit_pixels(pairs.sources))

    n = settings.batch
    text_to_image = torch.rand(n, generator=choice) < settings.text_to_image_share
    u = torch.rand(n, generator=choice)
    s = settings
    empty = torch.where(text_to_image, u < s.caption_dropout, u < s.empty)
    image_only = ~text_to_image & (u >= s.empty) & (u < s.empty + s.image_only)
    no_image = (
        text_to_image
        | empty
        | ((u >= s.empty + s.image_only) & (u < s.empty + s.image_only + s.instruction_only))
    )
    texts = [
        caption if t2i else instruction
        for caption, instruction, t2i in zip(
            pairs.target_captions, pairs.instructions, text_to_image.tolist(), strict=True
        )
    ]
    text_ids, lengths = prompt_ids(texts)
    lengths = torch.where(empty | image_only, 0, lengths)
    contexts = EditContexts(
        source_tokens=patchify_batch(source.float(), patch),
        vit_patches=patches,
        vit_ids=ids,
        has_image=(~no_image).to(device),
        text_ids=text_ids.to(device),
        text_lengths=lengths.to(device),
    )
    return TrainingBatch(contexts, patchify_batch(target.float(), patch))


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, p in module.named_parameters():
        p.requires_grad_(name not in FROZEN)
        if p.requires_grad:
            params[name] = p
    return params


def train_edits(
    model: Bagel,
    vit: ImageContextEncoder,
    ae: AutoEncoder,
    prompt_ids: PromptIds,
    marker_ids: tuple[int, int],
    settings: EditSettings,
    clock: Clock,
) -> tuple[dict, dict[str, Tensor]]:
    """Returns the stage's log and the EMA weights of the model and the ViT, by parameter name
    (the two modules' names do not overlap: they are the checkpoint's keys)."""
    device = torch.device(settings.device)
    model.train()
    vit.train()
    params = {**trainable(model), **trainable(vit)}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    ema = {n: p.detach().clone() for n, p in params.items()}
    ema_list, param_list = list(ema.values()), list(params.values())
    data = EditPairGenerator(settings.seed + 3, device)
    choice = torch.Generator().manual_seed(settings.seed + 4)
    generator = torch.Generator(device=device).manual_seed(settings.seed + 5)
    config = model.config
    rows, cols = config.latent_grid(IMAGE_SIZE, IMAGE_SIZE)
    pos_ids = latent_position_ids(rows, cols, config.max_latent_size).to(device)
    markers = torch.tensor(marker_ids, device=device)
    log = LossLog("edit", settings.log_every_s)
    begin, step, lr = clock.elapsed(), 0, settings.lr
    budget = settings.minutes * 60
    while clock.elapsed() - begin < budget and (
        settings.max_steps == 0 or step < settings.max_steps
    ):
        lr = settings.lr * lr_factor(
            step, settings.warmup_steps, (clock.elapsed() - begin) / budget
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = training_batch(data, ae, prompt_ids, settings, choice, config.latent_patch_size)
        t = sample_t(settings.batch, generator)
        noise = torch.randn(batch.x0.shape, generator=generator, device=device)
        with autocast(settings):
            loss = edit_flow_loss(model, vit, batch.contexts, batch.x0, t, noise, pos_ids, markers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(param_list, 1.0)
        optimizer.step()
        beta = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_list, param_list, 1.0 - beta)
        step += 1
        log.add({"loss": loss, "grad_norm": grad_norm})
        log.maybe_flush(step, clock, lr)
    log.maybe_flush(step, clock, lr, force=True)
    synchronize(device)
    return {
        "steps": step,
        "seconds": round(clock.elapsed() - begin, 1),
        "samples_seen": step * settings.batch,
        "losses": log.records,
        "final": log.final,
    }, ema


def write_checkpoint(init: Path, out: Path, ema: dict[str, Tensor]) -> None:
    """`init`'s files, with the trained tensors replaced in `ema.safetensors` (bf16, same keys)."""
    tensors = load_file(init / EMA_FILE)
    unknown = set(ema) - set(tensors)
    if unknown:
        raise ValueError(f"trained tensors not in {init / EMA_FILE}: {sorted(unknown)[:5]}")
    for name, value in ema.items():
        tensors[name] = value.detach().to("cpu", torch.bfloat16).contiguous()
    if out.resolve() != init.resolve():
        for path in init.iterdir():
            if path.is_file() and path.name != EMA_FILE:
                shutil.copy2(path, out / path.name)
    save_file(tensors, out / EMA_FILE)


def evaluate_edits(out: Path, device: str, timesteps: int, count: int) -> dict:
    """The first `count` of `check.EDIT_EVAL_PROMPTS` through `Pipeline.edit` with the editing
    defaults the service applies; source and edit side by side go into `edit_samples.png`."""
    pipeline = Pipeline(out, device)
    results, pairs = [], []
    for prompt in EDIT_EVAL_PROMPTS[:count]:
        params = GenerationParams(
            **EDIT_DEFAULTS,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_timesteps=timesteps,
            seed=prompt.seed,
        )
        source = prompt.source_image()
        image = pipeline.edit(source, prompt.text, params, rules=EDIT_RESIZE).image
        verdict = check_edit(image, prompt.text, prompt.source)
        pairs.append((source, image))
        found = verdict.found
        results.append(
            {
                "instruction": prompt.text,
                "seed": prompt.seed,
                "passed": verdict.passed,
                "expected": dataclasses.asdict(verdict.expected),
                "found": dataclasses.asdict(found),
                "centre": verdict.centre,
            }
        )
        print(
            f"[edit check] {'pass' if verdict.passed else 'FAIL'}  {prompt.text!r} on a "
            f"{prompt.source.colour} {prompt.source.shape} on {prompt.source.background}: "
            f"{found.colour} {found.shape} on {found.background}, centroid "
            f"{'kept' if verdict.centre_ok else 'moved'}"
        )
    grid = Image.new("RGB", (4 * IMAGE_SIZE, math.ceil(len(pairs) / 2) * IMAGE_SIZE))
    for i, (source, image) in enumerate(pairs):
        x, y = (i % 2) * 2 * IMAGE_SIZE, (i // 2) * IMAGE_SIZE
        grid.paste(source, (x, y))
        grid.paste(image, (x + IMAGE_SIZE, y))
    grid.save(out / "edit_samples.png")
    passed = sum(r["passed"] for r in results)
    print(f"[edit check] {passed}/{len(results)} pass")
    return {"timesteps": timesteps, "passed": passed, "results": results}


def run(settings: EditSettings) -> dict:
    clock = Clock()
    device = torch.device(settings.device)
    init, out = Path(settings.init), Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    os.environ["BAGEL_FUSED_KERNELS"] = "0"  # the fused Triton kernels have no backward

    tokenizer = load_tokenizer(init)
    model = load_bagel(init, "diffusion", torch.float32, device)
    vit = load_vit(init, torch.float32, device)
    ae = load_autoencoder(init, torch.float32, device).eval().requires_grad_(False)
    marker_ids = (tokenizer.start_of_image, tokenizer.end_of_image)
    edit_log, ema = train_edits(model, vit, ae, PromptIds(tokenizer), marker_ids, settings, clock)
    train_seconds = clock.elapsed()

    write_checkpoint(init, out, ema)
    os.environ.pop("BAGEL_FUSED_KERNELS")
    edits = evaluate_edits(out, settings.device, settings.eval_timesteps, settings.eval_prompts)
    text_to_image = evaluate(out, settings.device, settings.eval_timesteps, settings.eval_prompts)
    log = {
        "command": f"python -m examples.tiny_shapes.train_edit --init {settings.init} "
        f"--out {settings.out} --device {settings.device} --seed {settings.seed} "
        f"--minutes {settings.minutes:g}",
        "settings": dataclasses.asdict(settings),
        "device": device_name(device),
        "compute_precision": "bf16 autocast" if uses_bf16(settings) else "fp32",
        "torch": torch.__version__,
        "trained_parameters": sum(t.numel() for t in ema.values()),
        "edit": edit_log,
        "edit_check": edits,
        "text_to_image_check": text_to_image,
        "wall_seconds": {"training": round(train_seconds, 1), "total": round(clock.elapsed(), 1)},
    }
    (out / "edit_train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {out} in {clock.elapsed() / 60:.1f} min")
    return log


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.tiny_shapes.train_edit",
        description="Teach the trained tiny shapes BAGEL to edit (recolour, reshape, background).",
    )
    defaults = EditSettings(init="", out="")
    parser.add_argument("--init", required=True, help="the text-to-image checkpoint to continue")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--device", default=defaults.device, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=defaults.minutes,
        help="training time (default: %(default)s)",
    )
    parser.add_argument("--smoke", action="store_true", help="two steps on a tiny batch")
    args = parser.parse_args()
    if args.smoke:
        settings = EditSettings.smoke(args.init, args.out, args.device, args.seed)
    else:
        settings = EditSettings(
            init=args.init, out=args.out, device=args.device, seed=args.seed, minutes=args.minutes
        )
    run(settings)


if __name__ == "__main__":
    main()
