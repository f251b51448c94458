"""The on-disk cache of traced parameter shapes, and the aligned one-pass weight copy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import shape_cache
from sd_jax.convert import core
from sd_jax.models.clip import CLIPTextConfig, CLIPTextModel

TINY_TEXT = dict(vocab_size=99, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=8)


def _module(**over):
    return CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, **over}))


def _shapes(tree):
    return jax.tree.map(lambda s: (tuple(s.shape), str(s.dtype)), tree)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_JAX_COMPILATION_CACHE", str(tmp_path / "jax"))
    return tmp_path / "shapes"


def test_traced_once_then_read_back_equal(cache_root, monkeypatch):
    ids = jnp.zeros((1, 8), jnp.int32)
    first = shape_cache.param_shapes(_module(), ids)
    assert len(list(cache_root.glob("*.json"))) == 1
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: pytest.fail("traced again instead of reading the cache"))
    again = shape_cache.param_shapes(_module(), ids)
    assert _shapes(again) == _shapes(first)


def test_key_follows_config_dtype_and_inputs(cache_root):
    ids = jnp.zeros((1, 8), jnp.int32)
    keys = {shape_cache.cache_key(_module(), (ids,)), shape_cache.cache_key(_module(hidden_size=32), (ids,)),
            shape_cache.cache_key(CLIPTextModel(CLIPTextConfig(**TINY_TEXT), dtype=jnp.bfloat16), (ids,)),
            shape_cache.cache_key(_module(), (jnp.zeros((1, 4), jnp.int32),))}
    assert len(keys) == 4
    wide = shape_cache.param_shapes(_module(hidden_size=32), ids)
    assert wide["final_layer_norm"]["scale"].shape == (32,)


def test_corrupt_entry_is_retraced_and_rewritten(cache_root):
    ids = jnp.zeros((1, 8), jnp.int32)
    good = shape_cache.param_shapes(_module(), ids)
    (entry,) = cache_root.glob("*.json")
    entry.write_text("{ not json")
    assert _shapes(shape_cache.param_shapes(_module(), ids)) == _shapes(good)
    assert entry.read_text().startswith("[")


def test_off_with_the_compilation_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_JAX_COMPILATION_CACHE", "0")
    assert shape_cache.cache_dir() is None
    shape_cache.param_shapes(_module(), jnp.zeros((1, 8), jnp.int32))
    assert not list(tmp_path.rglob("*.json"))


def test_loaded_weights_are_aligned_and_adopted_without_copy():
    conv = np.arange(4 * 3 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 3)  # (O, I, kh, kw)
    target = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32),
                       "bias": jax.ShapeDtypeStruct((4,), jnp.bfloat16)}}
    params, _ = core.load_state_dict(target, {"conv.weight": conv, "conv.bias": np.ones(4, np.float32)}, what="x")
    kernel = params["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, conv.transpose(2, 3, 1, 0))
    assert kernel.flags.c_contiguous and kernel.ctypes.data % core.ALIGNMENT == 0
    assert params["conv"]["bias"].dtype == jnp.bfloat16
    if jax.default_backend() == "cpu":  # the point of the alignment: no second copy
        assert jax.device_put(kernel).unsafe_buffer_pointer() == kernel.ctypes.data


@pytest.mark.parametrize("shape,perm", [((37, 5, 3, 3), (2, 3, 1, 0)), ((50, 17), (1, 0)), ((7,), (0,))])
def test_blocked_relayout_copy_equals_the_transpose(shape, perm):
    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    view = src.transpose(perm)
    for dtype in (np.float32, jnp.bfloat16):
        out = core.aligned_empty(view.shape, dtype)
        core._copy_relayout(out, view)
        np.testing.assert_array_equal(out, view.astype(dtype))
