"""CLIP text encoder: parity with transformers' CLIPTextModel on tiny random configs, full-size mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sd_jax.convert.core import WeightMismatchError, flatten_tree, load_state_dict
from sd_jax.models.clip import (TORCH_BUFFERS, CLIPTextConfig, CLIPTextModel,
                                strip_text_model_prefix)

TINY = {  # name: (hidden, layers, heads, mlp, act, layer_norm_eps)
    "quick_gelu_2x32": (32, 2, 2, 64, "quick_gelu", 1e-5),
    "gelu_3x64": (64, 3, 4, 128, "gelu", 1e-6),
    "quick_gelu_3x48_head16": (48, 3, 3, 96, "quick_gelu", 1e-5),
}
BF16_EPS = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits)


def _hf_config(hidden, layers, heads, mlp, act, eps, vocab=1000):
    # Token ids as in the hf-internal-testing tiny SD pipelines (legacy eos_token_id 2).
    return transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=mlp, hidden_act=act, layer_norm_eps=eps, max_position_embeddings=77,
        projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _randomise(model, seed):
    """Every parameter random, LayerNorm scales/biases and linear biases included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:  # linear (out, in)
                p.copy_(noise / p.shape[1] ** 0.5)
    return model


def _init_shapes(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]


def _build(name):
    """Random transformers reference, its state dict (+ position_ids buffer), our loaded params."""
    hf_config = _hf_config(*TINY[name])
    torch.manual_seed(0)
    reference = _randomise(transformers.CLIPTextModel(hf_config).eval(), seed=len(name))
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5 layout
    state["embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # the buffer older files carry
    config = CLIPTextConfig.from_transformers(hf_config.to_dict())
    model = CLIPTextModel(config)
    params, skipped = load_state_dict(_init_shapes(model), state, what="text encoder",
                                      ignore=TORCH_BUFFERS)
    assert skipped == ["embeddings.position_ids"]
    ids = np.random.RandomState(1).randint(0, hf_config.vocab_size, (2, 77)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    with torch.no_grad():
        out = reference(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    return dict(reference=reference, state=state, config=config, model=model, params=params,
                ids=ids, out=out)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    return _build(request.param)


def _max_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float32) - ref).max())


def test_fp32_parity(tiny):
    ref = tiny["out"].last_hidden_state.numpy()
    ours = tiny["model"].apply({"params": tiny["params"]}, tiny["ids"])
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    # Measured ~2e-6 with max|ref| ~4.
    assert _max_err(ours, ref) <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_parity(tiny, clip_skip):
    """diffusers' encode_prompt: final_layer_norm(hidden_states[-(clip_skip + 1)])."""
    with torch.no_grad():
        ref = tiny["reference"].final_layer_norm(tiny["out"].hidden_states[-(clip_skip + 1)]).numpy()
    ours = tiny["model"].apply({"params": tiny["params"]}, tiny["ids"], clip_skip=clip_skip)
    assert _max_err(ours, ref) <= 1e-4 * max(1.0, np.abs(ref).max())


def test_bf16_compute(tiny):
    """bfloat16 matmuls (float32 LayerNorms, softmax and residual) against the float32 reference.

    Bound: bf16 keeps 8 significant bits (unit roundoff u = 2^-8). Each of the
    ~4 matmuls per layer rounds its inputs and output (relative error <= u/2
    each) and the final output is rounded once more (|y| ~ 4 has a bf16 spacing
    of 2^-5: up to 0.016 from that rounding alone). Pre-LN renormalises every
    branch, so the errors add up as a random walk instead of compounding: rms
    relative error ~ sqrt(#roundings) * u/2, about 0.5-1% for 2-3 layers
    (measured 0.56-0.64%); allowed 4u = 1.6%. The worst of the B*L*C = 5-10k
    elements sits a few sigma above that: measured 0.69-1.26% of max|ref|
    (0.031-0.052 absolute); allowed 8u = 3.1%. A layout, mask or dtype-cast
    bug costs O(1). The bound does not resolve the float32 LayerNorm choice
    (bf16 LayerNorm statistics measured 0.9-1.0% rms here): that is layers.py's.
    """
    ref = tiny["out"].last_hidden_state.numpy()
    model = CLIPTextModel(tiny["config"], dtype=jnp.bfloat16)
    ours = model.apply({"params": tiny["params"]}, tiny["ids"])
    assert ours.dtype == jnp.bfloat16
    err = np.asarray(ours, np.float32) - ref
    rms_rel = np.sqrt(np.mean(err ** 2) / np.mean(ref ** 2))
    assert rms_rel <= 4 * BF16_EPS, rms_rel
    assert np.abs(err).max() <= 8 * BF16_EPS * max(1.0, np.abs(ref).max()), np.abs(err).max()


def test_prefixed_state_dict_and_strictness(tiny):
    prefixed = {"text_model." + k: v for k, v in tiny["state"].items()}
    params, skipped = load_state_dict(_init_shapes(tiny["model"]), strip_text_model_prefix(prefixed),
                                      what="text encoder", ignore=TORCH_BUFFERS)
    assert skipped == ["embeddings.position_ids"]
    jax.tree.map(np.testing.assert_array_equal, params, tiny["params"])
    with pytest.raises(WeightMismatchError, match="embeddings.position_ids"):  # not silently ignored
        load_state_dict(_init_shapes(tiny["model"]), tiny["state"], what="text encoder")
    with pytest.raises(ValueError, match="both with and without"):
        strip_text_model_prefix({"final_layer_norm.bias": 0, "text_model.final_layer_norm.bias": 0})


def test_short_sequence_parity():
    hf_config = _hf_config(*TINY["quick_gelu_2x32"])
    reference = _randomise(transformers.CLIPTextModel(hf_config).eval(), seed=7)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = CLIPTextModel(CLIPTextConfig.from_transformers(hf_config.to_dict()))
    params, _ = load_state_dict(_init_shapes(model), state, what="text encoder")
    ids = np.random.RandomState(2).randint(0, 1000, (3, 16)).astype(np.int32)
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    ours = model.apply({"params": params}, ids)
    assert _max_err(ours, ref) <= 1e-4 * max(1.0, np.abs(ref).max())


def test_config_from_transformers():
    text = transformers.CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                       num_hidden_layers=23, hidden_act="gelu", projection_dim=512)
    cfg = CLIPTextConfig.from_transformers(text.to_dict())  # SD 2.x-like tower
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
            cfg.hidden_act, cfg.head_dim) == (1024, 4096, 16, 23, "gelu", 64)
    full = transformers.CLIPConfig(text_config=text.to_dict(), projection_dim=512).to_dict()
    assert CLIPTextConfig.from_transformers(full) == cfg
    # config.json files may leave out keys equal to transformers' defaults
    assert CLIPTextConfig.from_transformers({"hidden_size": 64, "num_attention_heads": 4}).intermediate_size == 2048
    sd = CLIPTextConfig.from_transformers(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768).to_dict())
    v1 = CLIPTextConfig.sd_v1()
    assert sd == CLIPTextConfig(**{**v1.__dict__, "pad_token_id": 1})  # transformers' pad id default
    assert (v1.pad_token_id, v1.bos_token_id, v1.eos_token_id) == (49407, 49406, 49407)


@pytest.mark.parametrize("bad, match", [
    ({"hidden_act": "relu"}, "'relu'"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "30 is not divisible by num_attention_heads 4"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers=0 is not valid; expected an integer in \[1, 128\]"),
    ({"layer_norm_eps": -1.0}, "-1.0"),
    ({"model_type": "t5"}, "'t5'"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig.from_transformers(bad)


def test_call_errors():
    model = CLIPTextModel(CLIPTextConfig.from_transformers(
        {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 2,
         "vocab_size": 100}))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _init_shapes(model))
    with pytest.raises(ValueError, match="clip_skip"):
        model.apply({"params": params}, jnp.zeros((1, 77), jnp.int32), clip_skip=3)
    with pytest.raises(ValueError, match=r"\(1, 78\)"):
        model.apply({"params": params}, jnp.zeros((1, 78), jnp.int32))


def test_full_size_mapping():
    """SD v1 text encoder: every transformers key <-> exactly one parameter, 123,060,480 in all."""
    hf_config = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_attention_heads=12, num_hidden_layers=12,
                                            projection_dim=768)
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(hf_config)
    # Zero-stride arrays: the right shapes at no memory cost.
    state = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
             for k, v in reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.broadcast_to(np.zeros((), np.int64), (1, 77))
    shapes = _init_shapes(CLIPTextModel(CLIPTextConfig.sd_v1()))
    params, skipped = load_state_dict(shapes, strip_text_model_prefix(state), what="text encoder",
                                      ignore=TORCH_BUFFERS)
    assert skipped == ["embeddings.position_ids"]
    assert len(flatten_tree(params)) == len(flatten_tree(shapes)) == len(state) - 1 == 12 * 16 + 4
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == sum(int(np.prod(v.shape)) for v in reference.state_dict().values()) == 123_060_480
