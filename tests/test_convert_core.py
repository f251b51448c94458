"""The strict torch <-> flax parameter mapping."""

import jax
import numpy as np
import pytest

from sd_jax.convert import core


@pytest.mark.parametrize("path,name", [
    (("down_blocks_0", "resnets_1", "conv1", "kernel"), "down_blocks.0.resnets.1.conv1.weight"),
    (("time_embedding", "linear_1", "bias"), "time_embedding.linear_1.bias"),
    (("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0", "kernel"),
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"),
    (("x", "ff", "net_0", "proj", "kernel"), "x.ff.net.0.proj.weight"),
    (("encoder", "layers_11", "layer_norm1", "scale"), "encoder.layers.11.layer_norm1.weight"),
    (("embeddings", "token_embedding", "embedding"), "embeddings.token_embedding.weight"),
    (("conv_norm_out", "scale"), "conv_norm_out.weight"),
])
def test_names(path, name):
    assert core.flax_path_to_torch_name(path) == name


def _target():
    sds = jax.ShapeDtypeStruct
    return {"conv": {"kernel": sds((3, 3, 4, 8), np.float32), "bias": sds((8,), np.float32)},
            "dense": {"kernel": sds((5, 6), np.float32)},
            "as_dense": {"kernel": sds((8, 8), np.float32)},
            "as_conv": {"kernel": sds((1, 1, 8, 8), np.float32)},
            "norm": {"scale": sds((8,), np.float32)}}


def _state(rng):
    return {k: v.astype(np.float32) for k, v in _state64(rng).items()}


def _state64(rng):
    return {"conv.weight": rng.standard_normal((8, 4, 3, 3)), "conv.bias": rng.standard_normal(8),
            "dense.weight": rng.standard_normal((6, 5)),
            "as_dense.weight": rng.standard_normal((8, 8, 1, 1)),  # a 1x1 conv feeding a Dense
            "as_conv.weight": rng.standard_normal((8, 8)),          # a linear feeding a 1x1 conv
            "norm.weight": rng.standard_normal(8)}


def test_layouts_and_roundtrip():
    rng = np.random.default_rng(0)
    state = _state(rng)
    params, skipped = core.load_state_dict(_target(), state, what="toy")
    assert skipped == []
    np.testing.assert_array_equal(params["conv"]["kernel"], state["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["dense"]["kernel"], state["dense.weight"].T)
    np.testing.assert_array_equal(params["as_dense"]["kernel"], state["as_dense.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(params["as_conv"]["kernel"][0, 0], state["as_conv.weight"].T)
    assert params["conv"]["kernel"].dtype == np.float32
    back = core.export_state_dict(params)
    for name in ("conv.weight", "conv.bias", "dense.weight", "norm.weight"):
        np.testing.assert_allclose(back[name], state[name], rtol=1e-6)


def test_strict_errors_list_every_name():
    rng = np.random.default_rng(0)
    state = _state(rng)
    state["conv.weight"] = rng.standard_normal((8, 4, 1, 1))
    del state["norm.weight"]
    state["extra.weight"] = rng.standard_normal(3)
    state["pos.position_ids"] = np.arange(3)
    with pytest.raises(core.WeightMismatchError) as err:
        core.load_state_dict(_target(), state, what="toy", ignore=[r".*position_ids"])
    msg = str(err.value)
    assert "conv.weight: file has (8, 4, 1, 1), model expects (8, 4, 3, 3)" in msg
    assert "norm.weight" in msg and "missing from the file" in msg
    assert "extra.weight" in msg and "position_ids" not in msg


def test_ignored_buffers_reported():
    rng = np.random.default_rng(0)
    state = _state(rng) | {"pos.position_ids": np.arange(3)}
    _, skipped = core.load_state_dict(_target(), state, what="toy", ignore=[r".*position_ids"])
    assert skipped == ["pos.position_ids"]


def test_unknown_leaf_is_an_error():
    with pytest.raises(ValueError, match="leaf 'weights'"):
        core.flax_path_to_torch_name(("a", "weights"))


# --- non-finite weights are an error at load (issue 11) --------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named(bad):
    """One NaN/inf in a bias and one in a transposed kernel: one error naming both tensors."""
    state = _state(np.random.default_rng(0))
    state["conv.bias"][3] = bad
    state["dense.weight"][5, 4] = bad  # the last element of a blocked (transposing) copy
    with pytest.raises(core.NonFiniteWeightsError) as err:
        core.load_state_dict(_target(), state, what="toy")
    msg = str(err.value)
    assert "toy weights hold NaN or infinite values in 2 tensor(s): conv.bias, dense.weight" in msg
    assert "\n" not in msg


def test_values_past_float16_range_are_refused_when_cast():
    state = _state(np.random.default_rng(0))
    state["norm.weight"][0] = 1e6  # finite in float32, infinite in float16
    core.load_state_dict(_target(), state, what="toy")  # float32: fine
    with pytest.raises(core.NonFiniteWeightsError, match="norm.weight"):
        core.load_state_dict(_target(), state, what="toy", dtype=np.float16)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, "bfloat16"])
def test_all_finite(dtype):
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    big = np.full(1000, ml_dtypes.finfo(dtype).max, dtype)  # its sum overflows, yet every value is finite
    assert core.all_finite(big)
    for bad in (np.nan, np.inf):
        arr = np.ones(300_000, dtype)
        arr[-1] = bad
        assert not core.all_finite(arr)
    assert core.all_finite(np.arange(5))


def test_nan_at_the_end_of_a_big_tensor_is_found():
    sds = jax.ShapeDtypeStruct
    state = {"norm.weight": np.ones(1_000_003, np.float32)}
    state["norm.weight"][-1] = np.nan
    with pytest.raises(core.NonFiniteWeightsError, match="norm.weight"):
        core.load_state_dict({"norm": {"scale": sds((1_000_003,), np.float32)}}, state, what="toy")
