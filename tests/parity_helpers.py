"""Shared checks for the weight-format tests: run the three models of an sd_jax pipeline and of a
diffusers StableDiffusionPipeline on the same inputs and compare, and compare state dicts."""

from __future__ import annotations

import numpy as np
import torch

PROMPTS = ["a photo of an astronaut riding a horse", ""]
TIMESTEPS = np.array([10, 981])


def inputs(seed: int = 0, hw: tuple[int, int] = (8, 8)) -> dict[str, np.ndarray]:
    """Latents (B, h, w, 4) and images (B, 8h, 8w, 3) in [0, 1] for a batch of 2."""
    rng = np.random.default_rng(seed)
    h, w = hw
    return {"latents": rng.standard_normal((2, h, w, 4)).astype(np.float32),
            "images": rng.uniform(0, 1, (2, 8 * h, 8 * w, 3)).astype(np.float32)}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy().transpose(0, 2, 3, 1)


def ours(pipe, x: dict[str, np.ndarray], text_emb: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """sd_jax: text embeddings, UNet noise prediction (on ``text_emb`` if given), VAE decode and encode."""
    emb = np.asarray(pipe.encode_prompt(PROMPTS))
    return {
        "text": emb,
        "unet": np.asarray(pipe.predict_noise(x["latents"], TIMESTEPS, emb if text_emb is None else text_emb)),
        "decode": np.asarray(pipe.decode_latents(x["latents"])),
        "encode": np.asarray(pipe.encode_image(x["images"])),
    }


@torch.no_grad()
def reference(ref, ids: np.ndarray, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers/transformers on the same token ids and inputs (float32 math)."""
    scale = ref.vae.config.scaling_factor
    dtype = ref.unet.dtype
    emb = ref.text_encoder(torch.from_numpy(np.asarray(ids, np.int64)))[0]
    eps = ref.unet(nchw(x["latents"]).to(dtype), torch.from_numpy(TIMESTEPS),
                   encoder_hidden_states=emb.to(dtype)).sample
    decoded = ref.vae.decode(nchw(x["latents"]).to(dtype) / scale).sample
    posterior = ref.vae.encode(nchw(x["images"]).to(dtype) * 2 - 1).latent_dist
    return {"text": emb.float().numpy(), "unet": nhwc(eps),
            "decode": np.clip(nhwc(decoded) / 2 + 0.5, 0, 1), "encode": nhwc(posterior.mean) * scale}


def max_rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (the error in units of the output's scale)."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


def assert_outputs_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rel: float = 1e-4) -> None:
    """Every output within ``rel`` x its scale (max |want|)."""
    errors = {k: max_rel_error(got[k], want[k]) for k in want}
    bad = {k: e for k, e in errors.items() if not e <= rel}
    assert not bad, f"outputs differ by more than {rel:g} x scale: {bad} (all: {errors})"


def assert_each_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str, rel: float = 1e-4,
                      atol: float = 0.0) -> None:
    """The same names, and every tensor within ``rel`` x its own scale (max |want| of that tensor)
    + ``atol``: a small tensor is held to its own size, not to the largest tensor's, and a missing one
    fails. ``atol`` is for tensors that are zero up to rounding."""
    assert set(got) == set(want), (f"{what}: missing {sorted(set(want) - set(got))[:5]}, "
                                   f"unexpected {sorted(set(got) - set(want))[:5]}")
    bad = {}
    for k in want:
        a, b = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
        err, scale = float(np.abs(a - b).max(initial=0)), float(np.abs(b).max(initial=0))
        if not err <= rel * scale + atol:
            bad[k] = f"|diff| {err:.2e}, scale {scale:.2e}"
    worst = dict(list(bad.items())[:5])
    assert not bad, f"{what}: {len(bad)} tensors differ by more than {rel:g} x their scale + {atol:.2e}: {worst}"


def torch_state(module) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str, atol: float = 0.0):
    """Same names, shapes and values (exactly by default)."""
    assert set(got) == set(want), f"{what}: {sorted(set(got) ^ set(want))[:10]}"
    for k in want:
        a, b = np.asarray(got[k], np.float32), np.asarray(want[k], np.float32)
        assert a.shape == b.shape, f"{what}.{k}: {a.shape} vs {b.shape}"
        assert np.abs(a - b).max(initial=0) <= atol, f"{what}.{k} differs"
