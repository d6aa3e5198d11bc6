"""`python -m examples.tiny_shapes.train --out DIR --device cuda --seed 0`: train the tiny shapes
BAGEL and write it in the published checkpoint format.

Two stages within one time budget (`--minutes`): the autoencoder, then the Mixture-of-Transformers
with BAGEL's rectified-flow objective on a pool of pre-encoded latents. The directory gets
`llm_config.json`, `vit_config.json`, `ema.safetensors` (the EMA weights, bf16 as in the real
checkpoint), `ae.safetensors`, the tiny tokenizer, `train_log.json`, and `samples.png` (the
prompt-check images). `--device cpu --smoke` runs a few steps of each stage in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from bagel.checkpoints.model_info import CheckpointFacts, write_checkpoint_facts
from bagel.network.autoencoder import AutoEncoder
from bagel.network.config import BagelConfig
from bagel.network.latents import latent_position_ids
from bagel.network.model import Bagel
from bagel.pipeline import Pipeline
from bagel.testing.tiny import tiny_vit_config_json, unused_tensors
from bagel.testing.tokenizer import write_tiny_tokenizer
from bagel.text.tokenizer import PromptTokenizer, load_tokenizer
from examples.tiny_shapes.architecture import init_bagel, shapes_config
from examples.tiny_shapes.autoencoder import autoencoder_loss, fold_unit_scale
from examples.tiny_shapes.check import EVAL_PROMPTS, check_prompt
from examples.tiny_shapes.data import IMAGE_SIZE, ShapeGenerator
from examples.tiny_shapes.flow import flow_loss, pad_prompts, patchify_batch, sample_t
from serving.params import GenerationParams

MODEL_NAME = "tiny-shapes"  # model_info.json: what GetModelInfo calls it


@dataclass
class Settings:
    out: str
    device: str = "cuda"
    seed: int = 0
    minutes: float = 8.0  # both stages; start-up, the final check and writing add about 40 s
    ae_share: float = 0.25  # of `minutes`, for the autoencoder
    ae_batch: int = 64
    ae_lr: float = 5e-4
    ae_max_steps: int = 0  # 0: until its time is up
    pool_size: int = 262_144  # images encoded once for the flow stage
    mot_batch: int = 512
    mot_lr: float = 5e-4
    mot_max_steps: int = 0
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    text_dropout: float = 0.1  # the empty context, for CFG
    precision: str = "bf16"  # bf16 autocast on CUDA; always fp32 on the CPU
    eval_timesteps: int = 20
    eval_prompts: int = len(EVAL_PROMPTS)
    log_every_s: float = 15.0

    @classmethod
    def smoke(cls, out: str, device: str, seed: int) -> Settings:
        return cls(
            out=out,
            device=device,
            seed=seed,
            ae_batch=1,
            ae_max_steps=1,
            pool_size=8,
            mot_batch=4,
            mot_max_steps=2,
            warmup_steps=1,
            eval_timesteps=3,
            eval_prompts=2,
            log_every_s=0.0,
        )


class Clock:
    """Seconds since the run began, and whether a stage's share of the budget is spent."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then a cosine from 1 to 0.1 over the stage's time."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def uses_bf16(settings: Settings) -> bool:
    return settings.device.startswith("cuda") and settings.precision == "bf16"


def autocast(settings: Settings):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=uses_bf16(settings))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LossLog:
    """Running sums of loss terms kept on the device (no host sync per step), printed and
    recorded every `every_s` seconds."""

    def __init__(self, stage: str, every_s: float) -> None:
        self.stage, self.every_s = stage, every_s
        self.records: list[dict] = []
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.last = time.monotonic()

    def add(self, parts: dict[str, Tensor]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1

    def maybe_flush(self, step: int, clock: Clock, lr: float, force: bool = False) -> None:
        if self.count == 0 or not (force or time.monotonic() - self.last >= self.every_s):
            return
        means = {k: (v / self.count).item() for k, v in self.sums.items()}
        record = {"step": step, "seconds": round(clock.elapsed(), 1), "lr": lr, **means}
        self.records.append(record)
        terms = " ".join(f"{k} {v:.5f}" for k, v in means.items())
        print(
            f"[{self.stage}] step {step:6d}  {clock.elapsed() / 60:5.2f} min  {terms}  lr {lr:.2e}"
        )
        self.sums, self.count, self.last = {}, 0, time.monotonic()

    @property
    def final(self) -> dict:
        return self.records[-1] if self.records else {}


def train_autoencoder(
    ae: AutoEncoder, data: ShapeGenerator, settings: Settings, clock: Clock, deadline: float
) -> dict:
    device = torch.device(settings.device)
    ae.train()
    optimizer = torch.optim.AdamW(
        ae.parameters(), lr=settings.ae_lr, betas=(0.9, 0.99), weight_decay=0.0
    )
    generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
    log = LossLog("autoencoder", settings.log_every_s)
    begin, step, lr = clock.elapsed(), 0, settings.ae_lr
    budget = max(deadline - begin, 1e-6)
    while clock.elapsed() < deadline and (
        settings.ae_max_steps == 0 or step < settings.ae_max_steps
    ):
        lr = settings.ae_lr * lr_factor(
            step, settings.warmup_steps, (clock.elapsed() - begin) / budget
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = data.batch(settings.ae_batch).images
        with autocast(settings):
            loss, parts = autoencoder_loss(ae, images, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        step += 1
        log.add({"loss": loss, **parts})
        log.maybe_flush(step, clock, lr)
    log.maybe_flush(step, clock, lr, force=True)
    synchronize(device)
    ae.eval().requires_grad_(False)
    probe = data.batch(256 if device.type == "cuda" else 2).images
    scale = fold_unit_scale(ae, probe)
    with torch.no_grad():
        held_out = data.batch(probe.shape[0]).images
        recon = ae.decode(ae.encode(held_out))
        held_out_l1 = (recon - held_out).abs().mean().item()
    print(f"[autoencoder] held-out L1 {held_out_l1:.5f}, latent scale {scale.tolist()}")
    return {
        "steps": step,
        "seconds": round(clock.elapsed() - begin, 1),
        "losses": log.records,
        "final": log.final,
        "held_out_l1": held_out_l1,
        "latent_channel_scale": scale.tolist(),
    }


@dataclass
class LatentPool:
    """Pre-encoded training pairs: latent tokens `[N, n, patch_dim]` and, per image, the row of
    its caption in a table of the framed, padded caption tokens."""

    latents: Tensor
    caption_rows: Tensor  # [N]
    caption_ids: Tensor  # [captions, P_max]
    caption_lengths: Tensor  # [captions]


@torch.no_grad()
def build_pool(
    ae: AutoEncoder,
    data: ShapeGenerator,
    tokenizer: PromptTokenizer,
    config: BagelConfig,
    settings: Settings,
) -> LatentPool:
    device = torch.device(settings.device)
    chunk = 1024 if device.type == "cuda" else 8
    captions: dict[str, int] = {}
    latents, rows = [], []
    remaining = settings.pool_size
    while remaining > 0:
        batch = data.batch(min(chunk, remaining))
        with autocast(settings):
            z = ae.encode(batch.images)
        latents.append(patchify_batch(z.float(), config.latent_patch_size))
        rows += [captions.setdefault(c, len(captions)) for c in batch.captions]
        remaining -= len(batch.captions)
    ids, lengths = pad_prompts([tokenizer.encode_prompt(c) for c in captions])
    return LatentPool(
        latents=torch.cat(latents),
        caption_rows=torch.tensor(rows, device=device),
        caption_ids=ids.to(device),
        caption_lengths=lengths.to(device),
    )


def train_mot(
    model: Bagel,
    pool: LatentPool,
    marker_ids: tuple[int, int],
    settings: Settings,
    clock: Clock,
    deadline: float,
) -> tuple[dict, dict[str, Tensor]]:
    """Returns the stage's log and the EMA weights, by parameter name."""
    device = torch.device(settings.device)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.mot_lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    ema = {n: p.detach().clone() for n, p in params.items()}
    ema_list, param_list = list(ema.values()), list(params.values())
    generator = torch.Generator(device=device).manual_seed(settings.seed + 2)
    config = model.config
    rows, cols = config.latent_grid(IMAGE_SIZE, IMAGE_SIZE)
    pos_ids = latent_position_ids(rows, cols, config.max_latent_size).to(device)
    markers = torch.tensor(marker_ids, device=device)
    log = LossLog("flow", settings.log_every_s)
    begin, step, lr = clock.elapsed(), 0, settings.mot_lr
    budget = max(deadline - begin, 1e-6)
    batch, size = settings.mot_batch, pool.latents.shape[0]
    while clock.elapsed() < deadline and (
        settings.mot_max_steps == 0 or step < settings.mot_max_steps
    ):
        lr = settings.mot_lr * lr_factor(
            step, settings.warmup_steps, (clock.elapsed() - begin) / budget
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(size, (batch,), generator=generator, device=device)
        x0 = pool.latents[index]
        caption = pool.caption_rows[index]
        ids, lengths = pool.caption_ids[caption], pool.caption_lengths[caption]
        dropped = torch.rand(batch, generator=generator, device=device) < settings.text_dropout
        lengths = torch.where(dropped, torch.zeros_like(lengths), lengths)
        t = sample_t(batch, generator)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        with autocast(settings):
            loss = flow_loss(model, ids, lengths, x0, t, noise, pos_ids, markers)
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
        "samples_seen": step * batch,
        "losses": log.records,
        "final": log.final,
    }, ema


def write_checkpoint(
    out: Path, config: BagelConfig, model: Bagel, ema: dict[str, Tensor], ae: AutoEncoder, seed: int
) -> None:
    """The published layout, bf16 as `bagel.testing.tiny` writes it; the EMA weights go into
    `ema`."""
    state = {**model.state_dict(), **ema}
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in state.items()}
    unused = unused_tensors(config, torch.Generator().manual_seed(seed))
    tensors.update({k: v.to(torch.bfloat16) for k, v in unused.items()})
    save_file(tensors, out / "ema.safetensors")
    ae_tensors = {
        k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in ae.state_dict().items()
    }
    save_file(ae_tensors, out / "ae.safetensors")
    (out / "llm_config.json").write_text(json.dumps(config.llm.to_qwen2_json(), indent=2))
    (out / "vit_config.json").write_text(json.dumps(tiny_vit_config_json(), indent=2))
    write_checkpoint_facts(out, CheckpointFacts(name=MODEL_NAME, native_size=IMAGE_SIZE))


def evaluate(out: Path, device: str, timesteps: int, count: int) -> dict:
    """The prompt check (the first `count` prompts) on the written checkpoint, through the
    in-process reference pipeline; the images go into `samples.png` (rows of six)."""
    pipeline = Pipeline(out, device)
    results, images = [], []
    for prompt in EVAL_PROMPTS[:count]:
        params = GenerationParams(
            height=IMAGE_SIZE, width=IMAGE_SIZE, num_timesteps=timesteps, seed=prompt.seed
        )
        image = pipeline.generate(prompt.text, params).image
        verdict = check_prompt(image, prompt)
        images.append(image)
        results.append({"prompt": prompt.text, "seed": prompt.seed, **dataclasses.asdict(verdict)})
        print(
            f"[check] {'pass' if verdict.passed else 'FAIL'}  {prompt.text!r}: background "
            f"{verdict.background}, colour {verdict.colour}, shape {verdict.shape}"
        )
    grid = Image.new("RGB", (6 * IMAGE_SIZE, math.ceil(len(images) / 6) * IMAGE_SIZE))
    for i, image in enumerate(images):
        grid.paste(image, ((i % 6) * IMAGE_SIZE, (i // 6) * IMAGE_SIZE))
    grid.save(out / "samples.png")
    passed = sum(r["background_ok"] and r["colour_ok"] for r in results)
    shapes = sum(r["shape_ok"] for r in results)
    print(
        f"[check] {passed}/{len(results)} pass (background and colour); "
        f"shape {shapes}/{len(results)}"
    )
    return {"timesteps": timesteps, "passed": passed, "shape_ok": shapes, "results": results}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def run(settings: Settings) -> dict:
    clock = Clock()
    device = torch.device(settings.device)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # The fused Triton kernels have no backward; training runs the eager definitions.
    os.environ["BAGEL_FUSED_KERNELS"] = "0"

    write_tiny_tokenizer(out)
    tokenizer = load_tokenizer(out)
    config = shapes_config(tokenizer.vocab_size)
    data = ShapeGenerator(settings.seed, device)
    total = settings.minutes * 60

    ae = AutoEncoder(config.vae).to(device)
    ae_log = train_autoencoder(ae, data, settings, clock, settings.ae_share * total)

    pool_start = clock.elapsed()
    pool = build_pool(ae, data, tokenizer, config, settings)
    pool_seconds = round(clock.elapsed() - pool_start, 1)
    print(f"[flow] {pool.latents.shape[0]} latents encoded in {pool_seconds} s")

    model = init_bagel(config, settings.seed).to(device)
    marker_ids = (tokenizer.start_of_image, tokenizer.end_of_image)
    mot_log, ema = train_mot(model, pool, marker_ids, settings, clock, total)
    train_seconds = clock.elapsed()

    write_checkpoint(out, config, model, ema, ae, settings.seed)
    os.environ.pop("BAGEL_FUSED_KERNELS")
    check = evaluate(out, settings.device, settings.eval_timesteps, settings.eval_prompts)
    log = {
        "command": f"python -m examples.tiny_shapes.train --out {settings.out} "
        f"--device {settings.device} --seed {settings.seed}",
        "settings": dataclasses.asdict(settings),
        "seed": settings.seed,
        "device": device_name(device),
        "compute_precision": "bf16 autocast" if uses_bf16(settings) else "fp32",
        "torch": torch.__version__,
        "config_fingerprint": config.fingerprint(),
        "parameters": {
            "bagel": sum(p.numel() for p in model.parameters()),
            "autoencoder": sum(p.numel() for p in ae.parameters()),
        },
        "autoencoder": ae_log,
        "flow": {**mot_log, "pool_seconds": pool_seconds},
        "check": check,
        "wall_seconds": {"training": round(train_seconds, 1), "total": round(clock.elapsed(), 1)},
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {out} in {clock.elapsed() / 60:.1f} min (fingerprint {config.fingerprint()})")
    return log


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.tiny_shapes.train",
        description="Train the tiny shapes BAGEL and write it in the published checkpoint format.",
    )
    defaults = Settings(out="")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--minutes", type=float, default=defaults.minutes, help="training budget, both stages"
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage")
    args = parser.parse_args()
    if args.smoke:
        settings = Settings.smoke(args.out, args.device, args.seed)
    else:
        settings = Settings(out=args.out, device=args.device, seed=args.seed, minutes=args.minutes)
    run(settings)


if __name__ == "__main__":
    main()
