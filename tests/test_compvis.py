"""CompVis single files (.ckpt / .safetensors, EMA) against diffusers' from_single_file.

The tiny diffusers folder is written in the CompVis layout twice: by sd_jax's exporter and by a
hand-written rename table in this file (so the exporter is not only checked against itself), with
EMA copies, Lightning-style extras and schedule buffers, as .safetensors and as a torch.save .ckpt.
Architecture detection runs on tiny and on full-size shapes (zero-stride arrays cost nothing).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from parity_helpers import (PROMPTS, assert_outputs_close, assert_same_state, inputs, ours,  # noqa: E402
                            reference, torch_state)
from sd_jax.convert import compvis  # noqa: E402
from sd_jax.convert.compvis import (V1_INFERENCE, UnsupportedCheckpointError, configs_from_ldm_yaml,  # noqa: E402
                                    detect_architecture, diffusers_to_compvis, read_config_override)
from sd_jax.convert.core import WeightMismatchError  # noqa: E402
from sd_jax.convert.files import UnsafeCheckpointError, save_safetensors  # noqa: E402
from sd_jax.convert.source import load_model_files  # noqa: E402
from sd_jax.models.clip import CLIPTextConfig  # noqa: E402
from sd_jax.models.unet import UNetConfig  # noqa: E402
from sd_jax.models.vae import VAEConfig  # noqa: E402
from tiny import make_tiny_sd, tiny_components  # noqa: E402

# ---- the CompVis layout of the tiny model, written out by hand --------------------------------
# UNet: block_out (32, 64), 1 layer per block, CrossAttnDown + Down, Up + CrossAttnUp.
HAND_UNET = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "input_blocks.1.0": "down_blocks.0.resnets.0", "input_blocks.1.1": "down_blocks.0.attentions.0",
    "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.3.0": "down_blocks.1.resnets.0",
    "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
    "output_blocks.0.0": "up_blocks.0.resnets.0", "output_blocks.1.0": "up_blocks.0.resnets.1",
    "output_blocks.1.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.2.0": "up_blocks.1.resnets.0", "output_blocks.2.1": "up_blocks.1.attentions.0",
    "output_blocks.3.0": "up_blocks.1.resnets.1", "output_blocks.3.1": "up_blocks.1.attentions.1",
    "out.0": "conv_norm_out", "out.2": "conv_out",
}
HAND_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# VAE: 4 levels, 1 layer per block (decoder 2); ldm numbers decoder levels bottom-up.
HAND_VAE = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
for _part in ("encoder", "decoder"):
    HAND_VAE.update({f"{_part}.conv_in": f"{_part}.conv_in", f"{_part}.conv_out": f"{_part}.conv_out",
                     f"{_part}.norm_out": f"{_part}.conv_norm_out",
                     f"{_part}.mid.block_1": f"{_part}.mid_block.resnets.0",
                     f"{_part}.mid.block_2": f"{_part}.mid_block.resnets.1"})
for _i in range(4):
    HAND_VAE[f"encoder.down.{_i}.block.0"] = f"encoder.down_blocks.{_i}.resnets.0"
    for _j in range(2):
        HAND_VAE[f"decoder.up.{3 - _i}.block.{_j}"] = f"decoder.up_blocks.{_i}.resnets.{_j}"
    if _i < 3:
        HAND_VAE[f"encoder.down.{_i}.downsample.conv"] = f"encoder.down_blocks.{_i}.downsamplers.0.conv"
        HAND_VAE[f"decoder.up.{3 - _i}.upsample.conv"] = f"decoder.up_blocks.{_i}.upsamplers.0.conv"
HAND_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
SCHEDULE = {"betas": np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2}
SCHEDULE["alphas_cumprod"] = np.cumprod(1 - SCHEDULE["betas"])
SCHEDULE["alphas_cumprod_prev"] = np.append(1.0, SCHEDULE["alphas_cumprod"][:-1])
SCHEDULE["sqrt_alphas_cumprod"] = np.sqrt(SCHEDULE["alphas_cumprod"])
SCHEDULE = {k: v.astype(np.float32) for k, v in SCHEDULE.items()}


def hand_unet_name(name: str) -> str:
    """diffusers UNet name -> CompVis name, by the table above."""
    for cv, df in sorted(HAND_UNET.items(), key=lambda kv: -len(kv[1])):
        if name.startswith(df + "."):
            rest = name[len(df) + 1:]
            if ".resnets." in df:
                module, leaf = rest.rsplit(".", 1)
                rest = f"{HAND_RESNET[module]}.{leaf}"
            return f"model.diffusion_model.{cv}.{rest}"
    raise KeyError(name)


def hand_vae_name(name: str) -> str:
    """diffusers VAE name -> CompVis name."""
    if ".mid_block.attentions.0." in name:
        part, rest = name.split(".mid_block.attentions.0.")
        module, leaf = rest.rsplit(".", 1)
        return f"first_stage_model.{part}.mid.attn_1.{HAND_VAE_ATTN[module]}.{leaf}"
    for cv, df in sorted(HAND_VAE.items(), key=lambda kv: -len(kv[1])):
        if name.startswith(df + "."):
            return f"first_stage_model.{cv}.{name[len(df) + 1:].replace('conv_shortcut', 'nin_shortcut')}"
    raise KeyError(name)


def hand_compvis(unet: dict, vae: dict, text: dict) -> dict[str, np.ndarray]:
    """The CompVis single-file state dict of diffusers-named states, by hand."""
    out = {hand_unet_name(k): v for k, v in unet.items()}
    for k, v in vae.items():
        attn_weight = ".mid_block.attentions.0.to_" in k and k.endswith("weight")
        out[hand_vae_name(k)] = v.reshape(*v.shape, 1, 1) if attn_weight else v  # 1x1 convs in ldm
    out.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()})
    return out


def hand_ema_name(compvis_name: str) -> str:
    """ldm's LitEma: model_ema.<name inside LatentDiffusion.model, dots removed>."""
    return "model_ema." + compvis_name.removeprefix("model.").replace(".", "")


def numpy_states(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """The tiny folder's weights, read with the safetensors package (not sd_jax's reader)."""
    from safetensors.numpy import load_file

    return {"unet": load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
            "vae": load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
            "text_encoder": {k.removeprefix("text_model."): v
                             for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}}


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def states(tiny_dir):
    return numpy_states(tiny_dir)


@pytest.fixture(scope="module")
def ema_unet(states):
    """A second random UNet, as the EMA copy (different values, same names)."""
    unet = tiny_components(seed=7)[0]
    return {k: v.numpy() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, states, ema_unet):
    """full-EMA .safetensors and .ckpt, and a .safetensors without EMA."""
    root = tmp_path_factory.mktemp("compvis")
    base = hand_compvis(states["unet"], states["vae"], states["text_encoder"])
    base["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]  # as sd-v1-4
    base.update(SCHEDULE)
    ema = {hand_ema_name(hand_unet_name(k)): v for k, v in ema_unet.items()}
    full = {**base, **ema, "model_ema.decay": np.array(0.9999, np.float32),
            "model_ema.num_updates": np.array(5, np.int32)}
    save_safetensors(root / "full_ema.safetensors", full)
    save_safetensors(root / "no_ema.safetensors", base)
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in full.items()},
                "global_step": 5, "epoch": 1, "pytorch-lightning_version": "1.4.2",
                "callbacks": {"ModelCheckpoint": {"best_model_path": "x.ckpt"}}},
               root / "full_ema.ckpt")
    return {"safetensors": root / "full_ema.safetensors", "ckpt": root / "full_ema.ckpt",
            "no_ema": root / "no_ema.safetensors", "dict": full}


def diffusers_single_file(path: Path, config: Path, extract_ema: bool):
    """diffusers' loader, offline: the config folder is local, no hub access."""
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, extract_ema=extract_ema, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- layout -----------------------------------------------------------------------------------

def test_exporter_layout_equals_hand_written_table(tiny_dir, states):
    files = load_model_files(tiny_dir)
    written = diffusers_to_compvis(states, files.configs["unet"], files.configs["vae"], files.configs["text_encoder"])
    by_hand = hand_compvis(states["unet"], states["vae"], states["text_encoder"])
    assert set(written) == set(by_hand)
    for k, v in by_hand.items():
        assert written[k].shape == v.shape and np.array_equal(written[k], v), k
    assert written["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in written  # upsampler after no attention


# ---- loading against diffusers ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("use_ema", [True, False])
def test_weights_equal_diffusers_from_single_file(fmt, use_ema, ckpts, tiny_dir, states, ema_unet):
    files = load_model_files(ckpts[fmt], use_ema=use_ema, config=tiny_dir)
    ref = diffusers_single_file(ckpts[fmt], tiny_dir, extract_ema=use_ema)
    for name in ("unet", "vae", "text_encoder"):
        got = {k: v for k, v in files.states[name].items() if not k.endswith("position_ids")}
        assert_same_state(got, torch_state(getattr(ref, name)), f"{fmt}/{name}")
    expected_unet = ema_unet if use_ema else states["unet"]
    assert_same_state(files.states["unet"], expected_unet, "unet source")
    assert any("EMA" in note for note in files.notes)
    assert any("ignored" in note and "betas" in note for note in files.notes)


@pytest.mark.parametrize("fmt,use_ema", [("ckpt", True), ("safetensors", False)])
def test_outputs_equal_diffusers_from_single_file(fmt, use_ema, ckpts, tiny_dir):
    from sd_jax import StableDiffusion

    pipe = StableDiffusion.from_pretrained(ckpts[fmt], use_ema=use_ema, config=tiny_dir)
    ref = diffusers_single_file(ckpts[fmt], tiny_dir, extract_ema=use_ema)
    x = inputs()
    want = reference(ref, pipe.tokenize(PROMPTS), x)
    assert_outputs_close(ours(pipe, x, text_emb=want["text"]), want, rel=1e-4)


def test_file_without_ema_warns_and_uses_raw_weights(ckpts, tiny_dir, states, caplog):
    with caplog.at_level(logging.WARNING, logger="sd_jax"):
        files = load_model_files(ckpts["no_ema"], use_ema=True, config=tiny_dir)
    assert "no EMA weights" in caplog.text
    assert_same_state(files.states["unet"], states["unet"], "unet")


def test_incomplete_ema_is_an_error(ckpts, tmp_path, tiny_dir):
    state = dict(ckpts["dict"])
    missing = hand_ema_name("model.diffusion_model.out.2.weight")
    del state[missing]
    save_safetensors(tmp_path / "partial.safetensors", state)
    with pytest.raises(WeightMismatchError, match="use_ema=False") as err:
        load_model_files(tmp_path / "partial.safetensors", config=tiny_dir)
    assert "model.diffusion_model.out.2.weight" in str(err.value)
    files = load_model_files(tmp_path / "partial.safetensors", use_ema=False, config=tiny_dir)
    assert "conv_out.weight" in files.states["unet"]


def test_text_encoder_keys_with_or_without_text_model_prefix(ckpts, tmp_path, tiny_dir):
    state = {k.replace("transformer.text_model.", "transformer."): v for k, v in ckpts["dict"].items()}
    save_safetensors(tmp_path / "no_prefix.safetensors", state)
    a = load_model_files(tmp_path / "no_prefix.safetensors", config=tiny_dir).states["text_encoder"]
    b = load_model_files(ckpts["safetensors"], config=tiny_dir).states["text_encoder"]
    assert_same_state(a, b, "text")


def test_unknown_entries_are_listed(ckpts, tmp_path, tiny_dir):
    state = {**ckpts["dict"], "control_net_adapter.weight": np.zeros(3, np.float32)}
    save_safetensors(tmp_path / "extra.safetensors", state)
    with pytest.raises(WeightMismatchError, match="control_net_adapter.weight"):
        load_model_files(tmp_path / "extra.safetensors", config=tiny_dir)


def test_wrong_config_folder_is_a_clear_error(ckpts, tmp_path):
    other = make_tiny_sd(tmp_path / "other", in_channels=9)
    from sd_jax import StableDiffusion

    with pytest.raises(WeightMismatchError, match="conv_in.weight: file has"):
        StableDiffusion.from_pretrained(ckpts["safetensors"], config=other)


def test_detection_without_config_loads_and_says_what_it_guessed(ckpts):
    files = load_model_files(ckpts["safetensors"])
    assert files.notes[0] == "detected a v1 checkpoint"
    assert any("32-wide text context" in n for n in files.notes)
    assert any("GroupNorm" in n for n in files.notes)
    assert files.configs["unet"].block_out_channels == (32, 64)
    assert files.configs["vae"].block_out_channels == (8, 16, 16, 16)
    assert files.configs["text_encoder"].num_hidden_layers == 2


def test_malicious_ckpt_is_refused_through_from_pretrained(tmp_path):
    from sd_jax import StableDiffusion

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callbacks": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        StableDiffusion.from_pretrained(path)
    assert not marker.exists()


# ---- architecture detection ---------------------------------------------------------------------

def zeros(shape) -> np.ndarray:
    """A full-size array that costs nothing (zero strides)."""
    return np.broadcast_to(np.zeros((), np.float32), tuple(shape))


def full_size_compvis(unet_kwargs: dict, open_clip: bool = False) -> dict[str, np.ndarray]:
    """The CompVis key set with full-size shapes of an SD model (built on the meta device)."""
    from transformers import CLIPTextConfig as HFCLIPConfig, CLIPTextModel

    from sd_jax.convert.compvis import unet_prefix_table, vae_prefix_table, rename_keys

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_kwargs)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
    shapes = lambda m: {k: zeros(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    unet_cfg = UNetConfig.from_diffusers(dict(unet.config))
    out = {"model.diffusion_model." + k: v for k, v in rename_keys(
        shapes(unet), unet_prefix_table(unet_cfg), to_diffusers=False, what="UNet").items()}
    out.update({"first_stage_model." + k: v for k, v in rename_keys(
        shapes(vae), vae_prefix_table(VAEConfig.sd_v1()), to_diffusers=False, what="VAE").items()})
    if open_clip:  # OpenCLIP ViT-H/14 text tower, 24 layers, fused q/k/v
        p = "cond_stage_model.model."
        out.update({p + "token_embedding.weight": zeros((49408, 1024)), p + "positional_embedding": zeros((77, 1024)),
                    p + "ln_final.weight": zeros((1024,)), p + "ln_final.bias": zeros((1024,)),
                    p + "text_projection": zeros((1024, 1024)), p + "logit_scale": zeros(())})
        for i in range(24):
            b = f"{p}transformer.resblocks.{i}."
            out.update({b + "attn.in_proj_weight": zeros((3072, 1024)), b + "attn.in_proj_bias": zeros((3072,)),
                        b + "attn.out_proj.weight": zeros((1024, 1024)), b + "attn.out_proj.bias": zeros((1024,)),
                        b + "ln_1.weight": zeros((1024,)), b + "ln_1.bias": zeros((1024,)),
                        b + "ln_2.weight": zeros((1024,)), b + "ln_2.bias": zeros((1024,)),
                        b + "mlp.c_fc.weight": zeros((4096, 1024)), b + "mlp.c_fc.bias": zeros((4096,)),
                        b + "mlp.c_proj.weight": zeros((1024, 4096)), b + "mlp.c_proj.bias": zeros((1024,))})
    else:
        with torch.device("meta"):
            text = CLIPTextModel(HFCLIPConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu"))
        out.update({"cond_stage_model.transformer.text_model." + k: v for k, v in shapes(text).items()})
    return out | {k: zeros(v.shape) for k, v in SCHEDULE.items()}


V14 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
           cross_attention_dim=768)
SD2 = dict(V14, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)


@pytest.mark.parametrize("name,unet_kwargs,open_clip,family,diffusers_type", [
    ("v1", V14, False, "v1", "v1"),
    ("inpainting", dict(V14, in_channels=9), False, "v1-inpainting", "inpainting"),
    ("v2", SD2, True, "v2", "v2"),
    ("v2-inpainting", dict(SD2, in_channels=9), True, "v2-inpainting", "inpainting_v2"),
])
def test_full_size_detection(name, unet_kwargs, open_clip, family, diffusers_type):
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     infer_diffusers_model_type)

    state = full_size_compvis(unet_kwargs, open_clip)
    arch = detect_architecture(state)
    assert arch.family == family
    assert infer_diffusers_model_type(state) == diffusers_type  # diffusers agrees on the family
    expected_unet = UNetConfig.sd_v2() if family.startswith("v2") else UNetConfig.sd_v1()
    if family.endswith("inpainting"):
        expected_unet = dataclasses.replace(expected_unet, in_channels=9)
    assert arch.unet == expected_unet
    assert arch.vae == VAEConfig.sd_v1()
    if open_clip:
        assert arch.text_encoder == CLIPTextConfig(**compvis.OPEN_CLIP_H_TEXT)
    else:
        assert arch.text_encoder == CLIPTextConfig.sd_v1()
    # our renaming gives exactly the names diffusers' own converter gives
    _, converted = compvis.compvis_to_diffusers(state, arch)
    diffusers_unet = convert_ldm_unet_checkpoint(state, {"layers_per_block": 2})
    assert set(converted["unet"]) == set(diffusers_unet)
    diffusers_vae = convert_ldm_vae_checkpoint(state, {"down_block_types": [0] * 4, "up_block_types": [0] * 4})
    assert set(converted["vae"]) == set(diffusers_vae)
    assert all(converted["vae"][k].shape == diffusers_vae[k].shape for k in diffusers_vae)
    if family.startswith("v1"):  # the SPEC's count, plus 5 more input channels of conv_in for inpainting
        n_params = sum(int(np.prod(v.shape)) for v in converted["unet"].values())
        assert n_params == 859_520_964 + (320 * 5 * 3 * 3 if family.endswith("inpainting") else 0)


def test_tiny_detection_families(states):
    base = hand_compvis(states["unet"], states["vae"], states["text_encoder"])
    assert detect_architecture(base).family == "v1"
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = {**base, conv_in: zeros((32, 9, 3, 3))}
    arch = detect_architecture(inpaint)
    assert arch.family == "v1-inpainting" and arch.unet.in_channels == 9
    with pytest.raises(UnsupportedCheckpointError, match="8 input channels .*instruct-pix2pix"):
        detect_architecture({**base, conv_in: zeros((32, 8, 3, 3))})


@pytest.mark.parametrize("keys,what", [
    (["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
      "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
      "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight",
      "first_stage_model.encoder.conv_in.weight"], "SDXL"),
    (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"], "Stable Diffusion 3"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], "standalone VAE"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
])
def test_other_families_are_refused_by_name(keys, what):
    state = {k: zeros((4, 4)) for k in keys}
    with pytest.raises(UnsupportedCheckpointError, match=what) as err:
        detect_architecture(state, "model.safetensors")
    assert "sd_jax loads Stable Diffusion 1.x/2.x-style" in str(err.value)


def test_open_clip_conversion_equals_diffusers():
    """A tiny 24-layer OpenCLIP tower: our split of the fused q/k/v equals diffusers' (layer 24 dropped)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    rng = np.random.default_rng(0)
    c, p = 8, "cond_stage_model.model."
    state = {p + "token_embedding.weight": rng.standard_normal((49408, c)), p + "positional_embedding":
             rng.standard_normal((77, c)), p + "ln_final.weight": rng.standard_normal(c),
             p + "ln_final.bias": rng.standard_normal(c), p + "text_projection": rng.standard_normal((c, c))}
    for i in range(24):
        b = f"{p}transformer.resblocks.{i}."
        for name, shape in (("attn.in_proj_weight", (3 * c, c)), ("attn.in_proj_bias", (3 * c,)),
                            ("attn.out_proj.weight", (c, c)), ("attn.out_proj.bias", (c,)), ("ln_1.weight", (c,)),
                            ("ln_1.bias", (c,)), ("ln_2.weight", (c,)), ("ln_2.bias", (c,)),
                            ("mlp.c_fc.weight", (4 * c, c)), ("mlp.c_fc.bias", (4 * c,)),
                            ("mlp.c_proj.weight", (c, 4 * c)), ("mlp.c_proj.bias", (c,))):
            state[b + name] = rng.standard_normal(shape)
    state = {k: v.astype(np.float32) for k, v in state.items()}
    got, dropped = compvis.open_clip_from_compvis(state, num_layers=23)
    assert len(dropped) == 13 and all(".resblocks.23." in k or k.endswith("text_projection") for k in dropped)
    want = convert_open_clip_checkpoint(None, {k: torch.from_numpy(v) for k, v in state.items()}, prefix=p)
    want = {k.removeprefix("text_model."): v.numpy() for k, v in want.items() if k != "text_projection.weight"}
    assert_same_state(got, want, "open_clip")


# ---- config= ------------------------------------------------------------------------------------

V1_INFERENCE_YAML = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def test_v1_inference_yaml_is_the_v1_preset(tmp_path):
    (tmp_path / "v1-inference.yaml").write_text(V1_INFERENCE_YAML)
    arch, tokenizer_dir = read_config_override(tmp_path / "v1-inference.yaml")
    assert tokenizer_dir is None and arch == configs_from_ldm_yaml(V1_INFERENCE)
    assert arch.family == "v1"
    assert arch.unet == UNetConfig.sd_v1() and arch.vae == VAEConfig.sd_v1()
    assert arch.text_encoder == CLIPTextConfig.sd_v1()
    assert arch.scheduler["beta_start"] == 0.00085 and arch.scheduler["beta_end"] == 0.012
    assert arch.scheduler["prediction_type"] == "epsilon"


def test_v2_v_and_inpainting_yaml():
    v2 = {"model": {"params": {
        **V1_INFERENCE["model"]["params"], "parameterization": "v",
        "unet_config": {"params": {**V1_INFERENCE["model"]["params"]["unet_config"]["params"], "num_heads": -1,
                                   "num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}}}}}
    arch = configs_from_ldm_yaml(v2)
    assert arch.family == "v2" and arch.scheduler["prediction_type"] == "v_prediction"
    assert arch.unet.num_attention_heads == (5, 10, 20, 20) and arch.unet.use_linear_projection
    assert arch.text_encoder.num_hidden_layers == 23 and arch.text_encoder.hidden_size == 1024
    inpaint = {"model": {"params": {**V1_INFERENCE["model"]["params"], "conditioning_key": "hybrid",
                                    "unet_config": {"params": {**V1_INFERENCE["model"]["params"]["unet_config"][
                                        "params"], "in_channels": 9}}}}}
    assert configs_from_ldm_yaml(inpaint).family == "v1-inpainting"


def test_yaml_mapping_equals_diffusers(tmp_path):
    """A non-default ldm config maps to the same UNet/VAE configs as diffusers' converter gives."""
    from diffusers.loaders.single_file_utils import (create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    params = V1_INFERENCE["model"]["params"]
    data = {"model": {"params": {
        **params, "scale_factor": 0.13025,
        "unet_config": {"params": {**params["unet_config"]["params"], "model_channels": 64,
                                   "channel_mult": [1, 2, 3], "attention_resolutions": [2, 4], "num_res_blocks": 1,
                                   "num_heads": 4, "transformer_depth": 2, "context_dim": 768}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            **params["first_stage_config"]["params"]["ddconfig"], "ch": 64, "ch_mult": [1, 2, 4],
            "num_res_blocks": 1}}}}}}
    ours_arch = configs_from_ldm_yaml(data)
    state = {"model.diffusion_model.input_blocks.0.0.weight": zeros((64, 4, 3, 3))}
    unet_ref = UNetConfig.from_diffusers(create_unet_diffusers_config_from_ldm(data, state))
    vae_ref = VAEConfig.from_diffusers(create_vae_diffusers_config_from_ldm(data, state))
    assert ours_arch.unet == dataclasses.replace(unet_ref, sample_size=64)
    assert ours_arch.vae == dataclasses.replace(vae_ref, sample_size=256)
    assert ours_arch.unet.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")


def test_yaml_config_is_applied_to_a_single_file(ckpts, tmp_path):
    """config=v1-inference.yaml means full-size v1: the tiny file then fails the strict shape check."""
    (tmp_path / "v1-inference.yaml").write_text(V1_INFERENCE_YAML)
    with pytest.raises(WeightMismatchError, match="UNet"):
        load_model_files(ckpts["safetensors"], config=tmp_path / "v1-inference.yaml")


@pytest.mark.parametrize("bad,match", [
    ("not_a_config.json", "must be a diffusers model folder"),
    ("broken.yaml", "not an ldm model config|missing model"),
])
def test_bad_config_arguments(bad, match, tmp_path, ckpts):
    (tmp_path / bad).write_text("foo: [1, 2]\n" if bad.endswith("yaml") else "{}")
    with pytest.raises(ValueError, match=match):
        load_model_files(ckpts["safetensors"], config=tmp_path / bad)


# ---- full size (slow) -----------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_full_ema_file_equals_diffusers(tmp_path):
    """A full-size v1 full-EMA file (random weights, float16 on disk), loaded by shape detection alone,
    gives diffusers' from_single_file(extract_ema=True) outputs. ~10 GB of memory, a few minutes."""
    import dataclasses as dc

    from transformers import CLIPTextConfig as HFCLIPConfig, CLIPTextModel

    from sd_jax import StableDiffusion
    from sd_jax.convert import export
    from sd_jax.convert.compvis import SD_V1_SCHEDULER, ema_name
    from sd_jax.tokenizer import load_tokenizer

    torch.manual_seed(0)
    modules = {"unet": diffusers.UNet2DConditionModel(**V14), "vae": diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4), "text_encoder": CLIPTextModel(HFCLIPConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu"))}
    states = {name: {k: v.detach().half().numpy() for k, v in m.state_dict().items()} for name, m in modules.items()}
    del modules
    configs = {"unet": UNetConfig.sd_v1(), "vae": VAEConfig.sd_v1(), "text_encoder": CLIPTextConfig.sd_v1()}
    state = diffusers_to_compvis(states, configs["unet"], configs["vae"], configs["text_encoder"])
    state.update({ema_name(k): (v * 0.5).astype(np.float16) for k, v in state.items()
                  if k.startswith("model.diffusion_model.")})  # EMA weights that differ from the raw ones
    state.update(SCHEDULE)
    del states
    save_safetensors(tmp_path / "sd-full-ema.safetensors", state)
    del state
    # a weightless diffusers config folder, so that diffusers runs offline
    cfg_dir = tmp_path / "config"
    for name in ("unet", "vae"):
        export._write_json(cfg_dir / name / "config.json", configs[name].to_diffusers())
    export._write_json(cfg_dir / "text_encoder" / "config.json",
                       export.text_encoder_config(configs["text_encoder"], np.dtype(np.float32)))
    export._write_json(cfg_dir / "scheduler" / "scheduler_config.json", SD_V1_SCHEDULER)
    export._write_json(cfg_dir / "model_index.json", export.model_index(configs, "PNDMScheduler"))
    load_tokenizer(None).save(cfg_dir / "tokenizer")

    pipe = StableDiffusion.from_pretrained(tmp_path / "sd-full-ema.safetensors")  # detection, EMA by default
    assert (pipe.unet.config, pipe.vae.config) == (configs["unet"], configs["vae"])
    assert dc.asdict(pipe.text_encoder.config) == dc.asdict(configs["text_encoder"])
    ref = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "sd-full-ema.safetensors"), config=str(cfg_dir), local_files_only=True, extract_ema=True,
        safety_checker=None, torch_dtype=torch.float32)
    x = inputs(hw=(8, 8))
    want = reference(ref, pipe.tokenize(PROMPTS), x)
    assert_outputs_close(ours(pipe, x, text_emb=want["text"]), want, rel=1e-4)


# ---- bounded and finite (issue 11) --------------------------------------------------------------

@pytest.mark.parametrize("scale", [np.nan, np.inf])
def test_non_finite_scale_factor_buffer_is_refused(ckpts, tmp_path, scale):
    """A single file's scale_factor buffer becomes the VAE scaling_factor: NaN/inf is refused by name."""
    save_safetensors(tmp_path / "bad.safetensors", {**ckpts["dict"], "scale_factor": np.array(scale, np.float32)})
    with pytest.raises(ValueError, match=r"scaling_factor=(nan|inf)\b.*finite"):
        load_model_files(tmp_path / "bad.safetensors")


def test_scale_factor_buffer_of_many_values_is_one_line(ckpts, tmp_path):
    save_safetensors(tmp_path / "bad.safetensors", {**ckpts["dict"], "scale_factor": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"scale_factor buffer of shape \(3,\)"):
        load_model_files(tmp_path / "bad.safetensors")


_LAUGHS = "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


@pytest.mark.parametrize(("yaml_text", "message"), [
    (_LAUGHS + yaml.safe_dump({"model": {**V1_INFERENCE["model"], "params": {
        **V1_INFERENCE["model"]["params"], "beta_schedule": "LAUGHS"}}}).replace("LAUGHS", "*a9"),
     "aliases .* are expanded"),  # the old reader echoed the 9**9-item beta_schedule into its error
    ("model:\n  params: " + "[" * 5000 + "]" * 5000 + "\n", "nesting depth"),
    ("x: &x [*x]\n", "refers to a value that contains it"),
], ids=["billion-laughs", "deep", "recursive"])
def test_hostile_ldm_yaml_is_refused(ckpts, tmp_path, yaml_text, message):
    """A 383-byte billion-laughs YAML, a 5000-deep one and a recursive one: one line, before anything is built."""
    config = tmp_path / "v1-inference.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ValueError, match=message) as err:
        load_model_files(ckpts["safetensors"], config=config)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
