"""LoRA files in sd_jax against diffusers/PEFT on the same files: kohya and diffusers/PEFT formats, UNet
attention, transformer proj/ff, convolutions (LoCon), the text encoder, stacking, scales, unloading,
saving in both formats, strict errors, and generate.py --lora."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from sd_jax import StableDiffusion
from sd_jax.lora import LoraFormatError, LoraLayer, kohya_name, read_lora, save_lora, short_hash
from sd_jax.lora import apply as lora_apply

PROMPTS = ["a photo of an astronaut riding a horse", "a cat"]
TIMESTEPS = np.array([10, 981])
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONVS = ["conv1", "conv2", "conv_shortcut", "conv"]  # resnets, downsamplers/upsamplers (3x3 and 1x1: LoCon)
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ---------------------------------------------------------------------------------------------- helpers

def _lora_state(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, seed: int,
                convert: bool) -> dict:
    """A PEFT adapter on ``model`` with random non-zero down and up weights -> its state dict.

    ``convert``: in the names diffusers' training scripts write (``convert_state_dict_to_diffusers``:
    ``<module>.lora.down.weight``), else PEFT's own (``<module>.lora_A.weight``).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    state = get_peft_model_state_dict(model)
    state = convert_state_dict_to_diffusers(state) if convert else state
    return {k: v.detach().clone() for k, v in state.items()}, config


def make_peft_lora(folder: Path, unet_targets: list[str], text_targets: list[str] | None = None, *,
                   rank: int = 4, alpha: float = 8.0, seed: int = 0, convert: bool = True) -> Path:
    """``pytorch_lora_weights.safetensors`` as diffusers' LoRA training scripts write it (alpha in metadata)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny import TINY_CLIP, TINY_UNET

    unet_state, unet_config = _lora_state(UNet2DConditionModel(**TINY_UNET), unet_targets, rank, alpha, seed,
                                          convert)
    kwargs = {"unet_lora_layers": unet_state, "unet_lora_adapter_metadata": unet_config.to_dict()}
    if text_targets:
        text_state, text_config = _lora_state(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), text_targets, rank // 2,
                                              alpha / 2 + 1, seed + 1, convert)
        kwargs.update(text_encoder_lora_layers=text_state, text_encoder_lora_adapter_metadata=text_config.to_dict())
    StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(peft_file: Path, path: Path) -> Path:
    """The same weights in kohya's layout: lora_unet_/lora_te_ names with '.' -> '_', alphas as tensors."""
    from safetensors.numpy import load_file, save_file

    adapter, _ = read_lora(peft_file)  # alphas from diffusers' metadata
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for module, layer in adapter.get(component, {}).items():
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(layer.down)
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(layer.up)
            tensors[f"{name}.alpha"] = np.asarray(layer.alpha, np.float32)
    raw = load_file(peft_file)
    assert len(tensors) == len(raw) // 2 * 3  # every layer of the PEFT file made it across
    save_file(tensors, path)
    return path


def inputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


def ours(pipe: StableDiffusion, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(text embeddings, UNet eps on them)."""
    emb = np.asarray(pipe.encode_prompt(PROMPTS))
    return emb, np.asarray(pipe.predict_noise(latents, TIMESTEPS, emb))


@torch.no_grad()
def theirs(ref, pipe: StableDiffusion, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = torch.from_numpy(np.asarray(pipe.tokenize(PROMPTS), np.int64))
    emb = ref.text_encoder(ids)[0]
    eps = ref.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), torch.from_numpy(TIMESTEPS),
                   encoder_hidden_states=emb).sample
    return emb.numpy(), eps.numpy().transpose(0, 2, 3, 1)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def assert_parity(pipe, ref, latents, base: tuple[np.ndarray, np.ndarray], text: bool = True) -> None:
    """sd_jax == diffusers within 1e-4 relative, and the LoRA changed what it should (so the check can fail)."""
    got, want = ours(pipe, latents), theirs(ref, pipe, latents)
    assert rel(got[1], want[1]) <= 1e-4, rel(got[1], want[1])
    assert rel(got[0], want[0]) <= 1e-4, rel(got[0], want[0])
    assert rel(got[1], base[1]) > 1e-2  # the LoRA moved the UNet's output far beyond the tolerance
    if text:
        assert rel(got[0], base[0]) > 1e-2


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def _transformers_peft_gate():
    """transformers 5.24 refuses PEFT below 0.22.0, newer than any release (0.21.2 is the newest on PyPI);
    its text-encoder adapter code runs with 0.21.2, so the reference is allowed to use it."""
    import transformers.integrations.peft as transformers_peft

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)
        yield


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    """A pipeline of this module's own (LoRAs change its parameters); every test leaves it unloaded."""
    p = StableDiffusion.from_pretrained(tiny_folder)
    yield p


@pytest.fixture
def clean(pipe):
    """``pipe`` with no LoRA, restored after the test."""
    yield pipe
    pipe.unload_lora()


@pytest.fixture(scope="module")
def base(pipe):
    """seed -> the base model's outputs on inputs(seed); call it before loading a LoRA."""
    cache = {}

    def outputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
        assert not pipe.loras
        if seed not in cache:
            cache[seed] = ours(pipe, inputs(seed))
        return cache[seed]

    return outputs


@pytest.fixture
def ref(tiny_folder):
    from tiny import load_reference

    return load_reference(tiny_folder)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def attn_lora(lora_dir) -> Path:
    """UNet attention + text encoder attention and MLP, alpha != rank (from diffusers' metadata)."""
    return make_peft_lora(lora_dir / "attn", ATTENTION, TEXT, seed=1)


@pytest.fixture(scope="module")
def conv_lora(lora_dir) -> Path:
    """Transformer proj/ff and every convolution (3x3 LoCon with 1x1 up), UNet only."""
    return make_peft_lora(lora_dir / "conv", TRANSFORMER + CONVS, rank=2, alpha=3.0, seed=2, convert=False)


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_unet_and_text_encoder_match_diffusers(clean, ref, base, attn_lora, lora_dir, fmt):
    base_out = base(0)
    path = attn_lora if fmt == "peft" else to_kohya(attn_lora, lora_dir / "attn_kohya.safetensors")
    entry = clean.load_lora(path, scale=0.7)
    assert entry.layers == 4 * 2 * 4 + 2 * 6  # 4 transformer blocks x (attn1, attn2) x 4 projections; CLIP: 2 x 6
    ref.load_lora_weights(str(path), adapter_name="a")
    ref.set_adapters(["a"], [0.7])
    assert_parity(clean, ref, inputs(), base_out)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_conv_locon_and_transformer_layers_match_diffusers(clean, ref, base, conv_lora, lora_dir, fmt):
    base_out = base(1)
    path = conv_lora if fmt == "peft" else to_kohya(conv_lora, lora_dir / "conv_kohya.safetensors")
    adapter, _ = read_lora(path)
    shapes = {layer.down.shape[2:] for layer in adapter["unet"].values() if layer.down.ndim == 4}
    assert (3, 3) in shapes  # 3x3 LoCon (down 3x3, up 1x1) is exercised
    assert any(m.endswith("ff.net.0.proj") for m in adapter["unet"])
    clean.load_lora(path, scale=1.3)
    ref.load_lora_weights(str(path), adapter_name="c")
    ref.set_adapters(["c"], [1.3])
    assert_parity(clean, ref, inputs(1), base_out, text=False)


def test_two_stacked_adapters_match_set_adapters(clean, ref, base, attn_lora, conv_lora):
    base_out = base(2)
    clean.load_lora(attn_lora, scale=0.6, name="a")
    clean.load_lora(conv_lora, scale=-0.8, name="b")
    assert [(lo["name"], lo["scale"]) for lo in clean.loras] == [("a", 0.6), ("b", -0.8)]
    ref.load_lora_weights(str(attn_lora), adapter_name="a")
    ref.load_lora_weights(str(conv_lora), adapter_name="b")
    ref.set_adapters(["a", "b"], [0.6, -0.8])
    assert_parity(clean, ref, inputs(2), base_out)
    clean.set_lora_scale("b", 0.4)  # a new scale for one adapter: same as diffusers with that weight
    ref.set_adapters(["a", "b"], [0.6, 0.4])
    assert_parity(clean, ref, inputs(2), base_out)


# ---------------------------------------------------------------------------------------------- behaviour

def test_unload_restores_bit_exact_params(clean, attn_lora, conv_lora):
    before = jax.tree.map(np.asarray, clean.params)
    clean.load_lora(attn_lora, name="a")
    clean.load_lora(conv_lora, name="b", scale=0.5)
    changed = jax.tree.map(lambda x, y: not np.array_equal(np.asarray(x), y), clean.params, before)
    assert sum(jax.tree.leaves(changed)) > 20
    clean.unload_lora("a")  # one of two: a's layers back to base, b's still merged
    clean.unload_lora()
    after = jax.tree.map(np.asarray, clean.params)
    assert jax.tree.all(jax.tree.map(lambda x, y: x.dtype == y.dtype and np.array_equal(x, y), after, before))
    assert clean.loras == [] and clean.lora_stack.base == {}


def test_changing_a_scale_does_not_recompile(clean, attn_lora):
    clean.load_lora(attn_lora, scale=0.5, name="a")
    compiled = lora_apply.merge._cache_size()
    first = np.asarray(clean.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
                       ["to_q"]["kernel"])
    for scale in (0.1, 2.0, -1.0):
        clean.set_lora_scale("a", scale)
    assert lora_apply.merge._cache_size() == compiled
    last = np.asarray(clean.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
                      ["to_q"]["kernel"])
    assert not np.array_equal(first, last)


def test_a_key_matching_no_layer_is_an_error_naming_it(clean, lora_dir):
    from safetensors.numpy import save_file

    r = np.random.default_rng(0)
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {}
    for name in (good, bad):
        tensors.update({f"{name}.lora_down.weight": r.standard_normal((2, 32)).astype(np.float32),
                        f"{name}.lora_up.weight": r.standard_normal((32, 2)).astype(np.float32),
                        f"{name}.alpha": np.asarray(2.0, np.float32)})
    path = lora_dir / "bad.safetensors"
    save_file(tensors, path)
    before = clean.params
    with pytest.raises(LoraFormatError, match=bad) as err:
        clean.load_lora(path)
    assert good not in str(err.value)
    assert clean.params is before and clean.loras == []
    peft = lora_dir / "bad_peft.safetensors"  # the same in diffusers' names: the missing module is named
    save_file({"unet.mid_block.attentions.3.proj_in.lora_A.weight": np.ones((2, 64), np.float32),
               "unet.mid_block.attentions.3.proj_in.lora_B.weight": np.ones((64, 2), np.float32)}, peft)
    with pytest.raises(LoraFormatError, match=r"unet\.mid_block\.attentions\.3\.proj_in"):
        clean.load_lora(peft)
    loha = lora_dir / "loha.safetensors"  # an unsupported network type is named, not ignored
    save_file({f"{good}.hada_w1_a": np.ones((2, 2), np.float32)}, loha)
    with pytest.raises(LoraFormatError, match="hada_w1_a"):
        clean.load_lora(loha)


def test_old_diffusers_processor_names_read_as_peft(attn_lora, lora_dir):
    """diffusers' attention-processor names (to_q_lora.down) and lora.down/up give the same layers."""
    from safetensors.numpy import save_file

    adapter, _ = read_lora(attn_lora)
    tensors = {}
    for module, layer in adapter["unet"].items():
        attn, proj = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
        tensors[f"{attn}.processor.{proj}_lora.down.weight"] = layer.down
        tensors[f"{attn}.processor.{proj}_lora.up.weight"] = layer.up
    for module, layer in adapter["text_encoder"].items():
        tensors[f"text_encoder.{module}.lora_linear_layer.down.weight"] = layer.down
        tensors[f"text_encoder.{module}.lora_linear_layer.up.weight"] = layer.up
        tensors[f"text_encoder.{module}.alpha"] = np.asarray(layer.alpha, np.float32)
    save_file(tensors, lora_dir / "old.safetensors")
    old, _ = read_lora(lora_dir / "old.safetensors")
    assert set(old["unet"]) == set(adapter["unet"]) and set(old["text_encoder"]) == set(adapter["text_encoder"])
    for component in old:
        for module, layer in old[component].items():
            want = adapter[component][module]
            if component == "unet":  # the UNet's old names carry no alpha: alpha = rank, as diffusers reads them
                assert layer.alpha == layer.rank
                np.testing.assert_allclose(layer.delta(), want.delta() * want.rank / want.alpha, rtol=1e-6)
            else:
                assert layer.alpha == want.alpha
                np.testing.assert_allclose(layer.delta(), want.delta(), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_saved_by_sd_jax_loads_in_diffusers_with_the_same_outputs(clean, ref, base, attn_lora, conv_lora,
                                                                  tmp_path, fmt):
    base_out = base(3)
    a, _ = read_lora(attn_lora)
    c, _ = read_lora(conv_lora)
    adapter = {"unet": {**a["unet"], **c["unet"]}, "text_encoder": a["text_encoder"]}
    name = "pytorch_lora_weights.safetensors" if fmt == "peft" else "mine.safetensors"
    path = save_lora(adapter, tmp_path / name, format=fmt)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_lora(adapter, path, format=fmt)
    if fmt == "kohya":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata()
            assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())
        assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
        assert meta["ss_network_dim"] in ("2", "4")
    clean.load_lora(path, scale=0.9)
    ref.load_lora_weights(str(path), adapter_name="s")
    ref.set_adapters(["s"], [0.9])
    assert_parity(clean, ref, inputs(3), base_out)
    # and it holds what was saved: the same weight changes as the adapter it was written from
    back, _ = read_lora(path, {comp: set(adapter[comp]) for comp in adapter})
    for component in adapter:
        for module, layer in adapter[component].items():
            np.testing.assert_allclose(back[component][module].delta(), layer.delta(), rtol=1e-5, atol=1e-7)


def test_kohya_names_resolve_against_the_model_and_without_it(attn_lora, lora_dir, pipe):
    path = to_kohya(attn_lora, lora_dir / "names_kohya.safetensors")
    from sd_jax.lora import module_names

    names = {c: module_names(pipe.params[c], c) for c in ("unet", "text_encoder")}
    with_model, _ = read_lora(path, names)
    without, _ = read_lora(path)
    want, _ = read_lora(attn_lora)
    for adapter in (with_model, without):
        assert {c: set(m) for c, m in adapter.items()} == {c: set(m) for c, m in want.items()}
    assert kohya_name("text_model.encoder.layers.0.self_attn.q_proj") == "text_model_encoder_layers_0_self_attn_q_proj"


def test_lora_layer_and_saving_refuse_bad_values(tmp_path):
    with pytest.raises(LoraFormatError, match="down"):
        LoraLayer(np.ones((2, 4)), np.ones((4, 3)), 1.0)
    with pytest.raises(LoraFormatError, match="alpha"):
        LoraLayer(np.ones((2, 4)), np.ones((4, 2)), float("nan"))
    layer = LoraLayer(np.ones((2, 4), np.float32), np.ones((4, 2), np.float32), 2.0)
    with pytest.raises(ValueError, match="format"):
        save_lora({"unet": {"x": layer}}, tmp_path / "a.safetensors", format="lycoris")
    with pytest.raises(ValueError, match=".safetensors"):
        save_lora({"unet": {"x": layer}}, tmp_path / "a.ckpt")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- requests and CLI

def test_request_loras_apply_for_that_request_only(clean, attn_lora, tmp_path):
    from sd_jax.request import GenerationRequest, LoraRef

    params = clean.params
    kw = dict(height=32, width=32, num_inference_steps=2, seed=3, scheduler="ddim")  # compiled as the image test
    plain = clean.generate("a cat", **kw)
    with_lora = clean.generate("a cat", loras=[LoraRef(str(attn_lora), 0.8)], **kw)
    assert clean.params is params and clean.loras == []
    assert np.abs(with_lora.array - plain.array).max() > 1e-3
    assert with_lora.loras == [{"name": "pytorch_lora_weights", "scale": 0.8, "hash": short_hash(attn_lora),
                                "source": str(attn_lora)}]
    clean.load_lora(attn_lora, scale=0.8)  # the same LoRA loaded into the pipeline: the same images
    np.testing.assert_allclose(clean.generate("a cat", **kw).array, with_lora.array, atol=1e-6)
    missing = GenerationRequest.build("a", loras=[LoraRef(str(tmp_path / "nope.safetensors"))], **kw)
    with pytest.raises(Exception, match="nope.safetensors"):
        clean.run(missing)


def test_short_hash_is_a1111s_addnet_hash(attn_lora):
    import hashlib

    data = attn_lora.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert short_hash(attn_lora) == hashlib.sha256(data[8 + header:]).hexdigest()[:12]


def test_generate_cli_lora_flag_records_the_hash(tiny_folder, attn_lora, tmp_path):
    from sd_jax.cli.generate import main

    out = tmp_path / "out"
    args = ["--model", str(tiny_folder), "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32",
            "--seed", "4", "--scheduler", "ddim", "--no-progress"]
    assert main([*args, "--outdir", str(out), "--lora", f"{attn_lora}:0.7"]) == 0
    (png,) = out.glob("*.png")
    with Image.open(png) as img:
        text = dict(img.text)
    assert f"pytorch_lora_weights: {short_hash(attn_lora)}" in text["lora_hashes"]
    assert json.loads(text["loras"]) == [{"name": "pytorch_lora_weights", "scale": 0.7,
                                          "hash": short_hash(attn_lora), "source": str(attn_lora)}]
    assert f"Lora hashes: \"pytorch_lora_weights: {short_hash(attn_lora)}\"" in text["parameters"]
    with pytest.raises(SystemExit):  # argparse: a scale that is not a number
        main([*args, "--outdir", str(out), "--lora", f"{attn_lora}:lots"])
    assert main([*args, "--outdir", str(out), "--lora", str(tmp_path / "none.safetensors")]) == 2
    assert len(list(out.glob("*.png"))) == 1


def test_images_match_diffusers_with_a_stacked_kohya_and_peft_lora(clean, ref, attn_lora, conv_lora, lora_dir):
    from tiny import nchw

    kohya = to_kohya(attn_lora, lora_dir / "image_kohya.safetensors")
    latents = np.random.default_rng(5).standard_normal((1, 4, 4, 4)).astype(np.float32)
    kw = dict(height=32, width=32, num_inference_steps=3, guidance_scale=7.5)
    plain = clean.generate("a cat", scheduler="ddim", latents=latents, **kw).array
    clean.load_lora(kohya, scale=0.7, name="k")
    clean.load_lora(conv_lora, scale=0.5, name="c")
    ours_images = clean.generate("a cat", scheduler="ddim", latents=latents, **kw).array
    from diffusers import DDIMScheduler

    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(str(kohya), adapter_name="k")
    ref.load_lora_weights(str(conv_lora), adapter_name="c")
    ref.set_adapters(["k", "c"], [0.7, 0.5])
    want = ref("a cat", latents=nchw(latents), output_type="np", **kw).images
    assert np.abs(ours_images - want).max() <= 2 / 255
    assert np.abs(ours_images - plain).max() > 20 / 255  # the LoRAs change the image far beyond the tolerance


def test_torch_pickle_lora_reads_like_safetensors(attn_lora, lora_dir):
    """A .pt LoRA (kohya keys, torch zip) goes through sd_jax's restricted unpickler: the same adapter."""
    kohya = to_kohya(attn_lora, lora_dir / "pickled.safetensors")
    from safetensors.torch import load_file

    torch.save(load_file(kohya), lora_dir / "pickled.pt")
    want, _ = read_lora(kohya)
    got, _ = read_lora(lora_dir / "pickled.pt")
    for component in want:
        for module, layer in want[component].items():
            np.testing.assert_array_equal(got[component][module].delta(), layer.delta())


def test_hub_ids_offline_without_cache_say_how_to_pass_a_file(monkeypatch, tmp_path):
    from sd_jax.convert.hub import HubDownloadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubDownloadError, match="not in the local cache"):
        lora_apply.resolve("someone/some-lora", cache_dir=tmp_path)
    assert lora_apply.pick_file(["README.md", "pytorch_lora_weights.safetensors", "x.safetensors"], "r") == \
        "pytorch_lora_weights.safetensors"
    assert lora_apply.pick_file(["style.safetensors", "sub/y.safetensors"], "r") == "style.safetensors"
    with pytest.raises(HubDownloadError, match="several"):
        lora_apply.pick_file(["a.safetensors", "b.safetensors"], "r")


def test_merged_weights_are_base_plus_scaled_delta_in_pytorch_layout(clean, conv_lora, tiny_folder):
    """What save_pretrained/save_single_file write after load_lora: W + scale * alpha/rank * up @ down, per layer
    (linear, 1x1 conv stored as linear, 3x3 conv), against the diffusers folder's own weights."""
    from safetensors.numpy import load_file

    from sd_jax.convert import core

    base = load_file(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
    adapter, _ = read_lora(conv_lora)
    clean.load_lora(conv_lora, scale=-1.5)
    merged = core.export_state_dict(clean.params["unet"])
    kinds = set()
    for module, layer in adapter["unet"].items():
        want = base[f"{module}.weight"] + (-1.5) * layer.delta().reshape(base[f"{module}.weight"].shape)
        np.testing.assert_allclose(merged[f"{module}.weight"].reshape(want.shape), want, rtol=1e-5, atol=1e-6)
        kinds.add((base[f"{module}.weight"].ndim, layer.down.shape[2:] if layer.down.ndim == 4 else ()))
    assert {(2, ()), (4, (3, 3)), (4, (1, 1))} <= kinds
