"""The FLUX autoencoder: real `ae.safetensors` key layout, shapes, and numerics against a plain
fp64 re-computation written with torch.nn.functional."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bagel.network.autoencoder import AutoEncoder, AutoEncoderParams, to_rgb

# --- The real FLUX.1 `ae.safetensors` layout, written out from the published key names. ---------

# (in_channels, out_channels) of every ResnetBlock at full size (ch 128, ch_mult 1,2,4,4).
ENCODER_DOWN_BLOCKS = {
    0: [(128, 128), (128, 128)],
    1: [(128, 256), (256, 256)],
    2: [(256, 512), (512, 512)],
    3: [(512, 512), (512, 512)],
}
ENCODER_DOWNSAMPLE = {0: 128, 1: 256, 2: 512}  # down.3 has none
# up.0 is the highest resolution; up.3 runs first.
DECODER_UP_BLOCKS = {
    3: [(512, 512), (512, 512), (512, 512)],
    2: [(512, 512), (512, 512), (512, 512)],
    1: [(512, 256), (256, 256), (256, 256)],
    0: [(256, 128), (128, 128), (128, 128)],
}
DECODER_UPSAMPLE = {3: 512, 2: 512, 1: 256}  # up.0 has none

# Spot checks copied from the checkpoint's shape table.
REAL_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_in.bias": (128,),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (32, 512, 3, 3),
    "encoder.conv_out.bias": (32,),
    "decoder.conv_in.weight": (512, 16, 3, 3),
    "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "decoder.conv_out.bias": (3,),
}

# FLUX.1 ae.safetensors: 244 tensors, 83,819,683 parameters (335 MB in fp32).
REAL_TENSOR_COUNT = 244
REAL_PARAMETER_COUNT = 83_819_683


def _conv(name: str, cin: int, cout: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def _norm(name: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _resnet(name: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    keys = {**_norm(f"{name}.norm1", cin), **_conv(f"{name}.conv1", cin, cout, 3)}
    keys |= {**_norm(f"{name}.norm2", cout), **_conv(f"{name}.conv2", cout, cout, 3)}
    if cin != cout:
        keys |= _conv(f"{name}.nin_shortcut", cin, cout, 1)
    return keys


def _mid(name: str, c: int) -> dict[str, tuple[int, ...]]:
    keys = {**_resnet(f"{name}.block_1", c, c), **_norm(f"{name}.attn_1.norm", c)}
    for proj in ("q", "k", "v", "proj_out"):
        keys |= _conv(f"{name}.attn_1.{proj}", c, c, 1)
    return keys | _resnet(f"{name}.block_2", c, c)


def real_flux_layout() -> dict[str, tuple[int, ...]]:
    keys = _conv("encoder.conv_in", 3, 128, 3)
    for level, blocks in ENCODER_DOWN_BLOCKS.items():
        for j, (cin, cout) in enumerate(blocks):
            keys |= _resnet(f"encoder.down.{level}.block.{j}", cin, cout)
    for level, c in ENCODER_DOWNSAMPLE.items():
        keys |= _conv(f"encoder.down.{level}.downsample.conv", c, c, 3)
    keys |= _mid("encoder.mid", 512)
    keys |= _norm("encoder.norm_out", 512) | _conv("encoder.conv_out", 512, 32, 3)

    keys |= _conv("decoder.conv_in", 16, 512, 3) | _mid("decoder.mid", 512)
    for level, blocks in DECODER_UP_BLOCKS.items():
        for j, (cin, cout) in enumerate(blocks):
            keys |= _resnet(f"decoder.up.{level}.block.{j}", cin, cout)
    for level, c in DECODER_UPSAMPLE.items():
        keys |= _conv(f"decoder.up.{level}.upsample.conv", c, c, 3)
    keys |= _norm("decoder.norm_out", 128) | _conv("decoder.conv_out", 128, 3, 3)
    return keys


def test_full_size_state_dict_has_exactly_the_real_flux_keys_and_shapes() -> None:
    with torch.device("meta"):
        ae = AutoEncoder(AutoEncoderParams())
    ours = {name: tuple(t.shape) for name, t in ae.state_dict().items()}
    expected = real_flux_layout()

    assert len(expected) == REAL_TENSOR_COUNT
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert wrong == {}
    for name, shape in REAL_SHAPES.items():
        assert ours[name] == shape, name
    assert sum(t.numel() for t in ae.state_dict().values()) == REAL_PARAMETER_COUNT
    assert all(t.is_meta for t in ae.state_dict().values())


def test_default_params_are_fluxs_and_downsample_is_8() -> None:
    p = AutoEncoderParams()
    assert (p.ch, p.ch_mult, p.num_res_blocks, p.z_channels) == (128, (1, 2, 4, 4), 2, 16)
    assert (p.scale_factor, p.shift_factor) == (0.3611, 0.1159)
    assert p.downsample == 8


def test_params_reject_channel_counts_groupnorm_cannot_split() -> None:
    with pytest.raises(ValueError, match="GroupNorm"):
        AutoEncoderParams(ch=48)


# --- Numerics on a tiny configuration. -----------------------------------------------------------

TINY = AutoEncoderParams(ch=32)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (norm affines too), scaled to keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.dim() == 4:
                value = noise / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5
            elif ".norm" in name and name.endswith("weight"):
                value = 1.0 + 0.2 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))


@pytest.fixture(scope="module")
def tiny_ae() -> AutoEncoder:
    torch.manual_seed(0)
    ae = AutoEncoder(TINY).eval()
    _randomize(ae, seed=1)
    return ae


def _reference_decoder(sd: dict[str, torch.Tensor], z: torch.Tensor, p: AutoEncoderParams):
    """FLUX decoder in fp64, written directly from the architecture description."""
    w = {k: v.to(torch.float64) for k, v in sd.items()}
    x = z.to(torch.float64)

    def conv(name, h, stride=1, padding=1):
        return F.conv2d(h, w[f"{name}.weight"], w[f"{name}.bias"], stride=stride, padding=padding)

    def norm(name, h):
        return F.group_norm(h, 32, w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)

    def swish(h):
        return h * torch.sigmoid(h)

    def resnet(name, h):
        out = conv(f"{name}.conv1", swish(norm(f"{name}.norm1", h)))
        out = conv(f"{name}.conv2", swish(norm(f"{name}.norm2", out)))
        if f"{name}.nin_shortcut.weight" in w:
            h = conv(f"{name}.nin_shortcut", h, padding=0)
        return h + out

    def attention(name, h):
        b, c, hh, ww = h.shape
        n = norm(f"{name}.norm", h)
        q = conv(f"{name}.q", n, padding=0).reshape(b, c, hh * ww)
        k = conv(f"{name}.k", n, padding=0).reshape(b, c, hh * ww)
        v = conv(f"{name}.v", n, padding=0).reshape(b, c, hh * ww)
        scores = torch.einsum("bci,bcj->bij", q, k) / c**0.5
        out = torch.einsum("bij,bcj->bci", scores.softmax(dim=-1), v).reshape(b, c, hh, ww)
        return h + conv(f"{name}.proj_out", out, padding=0)

    h = conv("decoder.conv_in", x)
    h = resnet(
        "decoder.mid.block_2", attention("decoder.mid.attn_1", resnet("decoder.mid.block_1", h))
    )
    for level in reversed(range(len(p.ch_mult))):
        for j in range(p.num_res_blocks + 1):
            h = resnet(f"decoder.up.{level}.block.{j}", h)
        if level != 0:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            h = conv(f"decoder.up.{level}.upsample.conv", h)
    return conv("decoder.conv_out", swish(norm("decoder.norm_out", h)))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_decode_maps_latent_h_w_to_image_8h_8w(tiny_ae: AutoEncoder) -> None:
    z = torch.randn(1, 16, 3, 5)
    with torch.no_grad():
        x = tiny_ae.decode(z)
    assert x.shape == (1, 3, 24, 40)
    assert x.dtype == torch.float32


def test_decoder_matches_plain_fp64_recomputation(tiny_ae: AutoEncoder) -> None:
    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ae64 = AutoEncoder(TINY).double().eval()
    ae64.load_state_dict(tiny_ae.state_dict())
    with torch.no_grad():
        ours = ae64.decoder(z)
    expected = _reference_decoder(tiny_ae.state_dict(), z, TINY)
    assert ours.shape == expected.shape == (2, 3, 32, 48)
    assert expected.abs().max() > 0.1  # the comparison is not against a near-zero output
    assert _rel_err(ours, expected) < 1e-6


def test_fp32_and_bf16_decoding_stay_close_to_fp64(tiny_ae: AutoEncoder) -> None:
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = _reference_decoder(tiny_ae.state_dict(), z, TINY)
    with torch.no_grad():
        fp32 = tiny_ae.decoder(z.float())
        ae_bf16 = AutoEncoder(TINY).eval()
        ae_bf16.load_state_dict(tiny_ae.state_dict())
        bf16 = ae_bf16.to(torch.bfloat16).decoder(z.to(torch.bfloat16))
    assert bf16.dtype == torch.bfloat16
    assert _rel_err(fp32, expected) < 1e-4
    assert _rel_err(bf16, expected) < 0.1


def test_decode_undoes_scale_and_shift_before_the_decoder(tiny_ae: AutoEncoder) -> None:
    z = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        via_decode = tiny_ae.decode(z)
        direct = tiny_ae.decoder(z / 0.3611 + 0.1159)
    torch.testing.assert_close(via_decode, direct, rtol=0, atol=0)


def test_encode_returns_scaled_shifted_posterior_mean(tiny_ae: AutoEncoder) -> None:
    image = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z = tiny_ae.encode(image)
        moments = tiny_ae.encoder(image)
    assert moments.shape == (1, 32, 4, 3)
    assert z.shape == (1, 16, 4, 3)
    torch.testing.assert_close(z, 0.3611 * (moments[:, :16] - 0.1159), rtol=0, atol=0)


def test_encode_sample_draws_from_the_posterior_reproducibly(tiny_ae: AutoEncoder) -> None:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        a = tiny_ae.encode(image, sample=True, generator=torch.Generator().manual_seed(7))
        b = tiny_ae.encode(image, sample=True, generator=torch.Generator().manual_seed(7))
        c = tiny_ae.encode(image, sample=True, generator=torch.Generator().manual_seed(8))
        mean, logvar = tiny_ae.encoder(image).chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = 0.3611 * (mean + torch.exp(0.5 * logvar) * noise - 0.1159)
    torch.testing.assert_close(a, expected)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_to_rgb_maps_minus_one_to_zero_and_one_to_255_clamping_and_truncating_like_bagel() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    pixels = to_rgb(x)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 6, 3)
    assert pixels[0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]


def test_to_rgb_rejects_a_batch() -> None:
    with pytest.raises(ValueError, match="one image"):
        to_rgb(torch.zeros(2, 3, 4, 4))
