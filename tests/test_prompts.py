"""AUTOMATIC1111 prompt syntax (sd_jax.prompts): parser, chunking, weighted and chunked conditioning.

The parser is checked against the examples of A1111's ``parse_prompt_attention`` docstring and wiki
(written out by hand here). The conditioning is checked against a reference written below in PyTorch on
transformers' CLIPTextModel, following A1111's ``sd_hijack_clip`` (``tokenize_line``, ``process_tokens``,
the "Original" emphasis) and its sampler's padding of the shorter of cond/uncond with the empty prompt.
"""

import logging

import numpy as np
import pytest
import torch

from sd_jax import prompts as P
from sd_jax.request import GenerationRequest, RequestError

BOS, EOS = 49406, 49407


# ----------------------------------------------------------------------------- parser

@pytest.mark.parametrize("text,expected", [
    # A1111 modules/prompt_parser.py, parse_prompt_attention's docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    # the wiki's "Attention/emphasis" examples
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.21)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("a [[word]]", [("a ", 1.0), ("word", 1 / 1.21)]),
    # unbalanced: a stray closer is text, an opener never closed reaches the end
    ("a) b] c", [("a) b] c", 1.0)]),
    ("a [b", [("a ", 1.0), ("b", 1 / 1.1)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("", [("", 1.0)]),
    # BREAK: its own word, upper case, outside brackets
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("BREAKfast break", [("BREAKfast break", 1.0)]),
])
def test_parser_matches_a1111_examples(text, expected):
    got = P.parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_break_inside_brackets_is_text_as_in_a1111():
    assert P.parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    chunks = P.chunk_tokens([("a", 1.1), ("BREAK", -1.1)], [[1], [2]], bos=BOS, eos=EOS, pad=EOS, comma=None)
    assert chunks.count == 1 and list(chunks.ids[0, :4]) == [BOS, 1, 2, EOS]


# ----------------------------------------------------------------------------- chunking

def _chunks(ids, weights=None, **kw):
    frags = [("x", 1.0 if weights is None else weights)]
    return P.chunk_tokens(frags, [ids], bos=BOS, eos=EOS, pad=EOS, comma=kw.pop("comma", 267), **kw)


def test_short_prompt_is_one_chunk_in_the_plain_layout():
    c = _chunks([10, 11, 12], 1.5)
    assert c.ids.shape == (1, 77) and c.ids.dtype == np.int32 and c.token_count == 3
    assert list(c.ids[0, :5]) == [BOS, 10, 11, 12, EOS] and (c.ids[0, 5:] == EOS).all()
    assert list(c.weights[0, :5]) == [1.0, 1.5, 1.5, 1.5, 1.0] and (c.weights[0, 5:] == 1.0).all()


def test_long_prompt_is_split_every_75_tokens():
    c = _chunks(list(range(100, 260)))  # 160 tokens, no comma
    assert c.count == 3
    assert list(c.ids[0, 1:76]) == list(range(100, 175)) and c.ids[0, 76] == EOS
    assert list(c.ids[1, 1:76]) == list(range(175, 250))
    assert list(c.ids[2, 1:12]) == list(range(250, 260)) + [EOS]


def test_comma_within_20_tokens_moves_the_rest_to_the_next_chunk():
    ids = list(range(100, 160)) + [267] + list(range(200, 230))  # comma at position 60: 15 tokens from the end
    c = _chunks(ids)
    assert c.count == 2
    assert list(c.ids[0, 1:62]) == ids[:61] and (c.ids[0, 62:] == EOS).all()  # the chunk ends after the comma
    assert list(c.ids[1, 1:31]) == ids[61:] and c.ids[1, 31] == EOS


def test_comma_further_back_than_20_tokens_does_not_move_anything():
    ids = list(range(100, 150)) + [267] + list(range(200, 240))  # comma at position 50: 25 from the end
    c = _chunks(ids)
    assert list(c.ids[0, 1:76]) == ids[:75] and list(c.ids[1, 1:17]) == ids[75:]
    assert list(_chunks(ids, backtrack=0).ids[0, 1:76]) == ids[:75]
    near = list(range(100, 160)) + [267] + list(range(200, 230))
    assert list(_chunks(near, backtrack=0).ids[0, 1:76]) == near[:75]  # A1111's setting 0: never


def test_break_closes_the_chunk_and_weights_follow_their_tokens():
    frags = [("a", 1.0), ("BREAK", -1.0), ("b", 1.3)]
    c = P.chunk_tokens(frags, [[10, 11], [99], [12]], bos=BOS, eos=EOS, pad=EOS, comma=None)
    assert c.count == 2
    assert list(c.ids[0, :4]) == [BOS, 10, 11, EOS] and list(c.ids[1, :3]) == [BOS, 12, EOS]
    np.testing.assert_array_equal(c.weights[1, :3], np.float32([1.0, 1.3, 1.0]))
    assert c.token_count == 75 + 1  # A1111 counts a closed chunk as 75


def test_embedding_vectors_stay_in_one_chunk():
    c = _chunks(list(range(100, 173)) + [500], expansions={500: (500, 501, 502)})
    assert list(c.ids[0, 73:76]) == [172, EOS, EOS]  # 73 tokens, then no room for 3 vectors
    assert list(c.ids[1, :5]) == [BOS, 500, 501, 502, EOS]


def test_sd2_pads_with_its_pad_token_after_the_first_end_token():
    c = P.chunk_tokens([("x", 1.0)], [[10, 11]], bos=BOS, eos=EOS, pad=0, comma=None)
    assert list(c.ids[0, :5]) == [BOS, 10, 11, EOS, 0] and (c.ids[0, 4:] == 0).all()
    ids, w = P.pad_chunks([c], 2, BOS, EOS, 0)
    assert list(ids[0, 1, :3]) == [BOS, EOS, 0] and (ids[0, 1, 2:] == 0).all() and (w == 1).all()


# ----------------------------------------------------------------------------- conditioning vs A1111 in PyTorch

LONG = ", ".join(f"a (red:1.2) cat number {i} on a [blue] mat" for i in range(12))  # ~130 tokens, commas


@pytest.fixture(scope="module")
def torch_clip(tiny_folder):
    from transformers import CLIPTextModel, CLIPTokenizer

    return (CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").eval(),
            CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer"))


def a1111_tokenize_line(tokenizer, line):
    """A1111's tokenize_line (comma_padding_backtrack 20, no embeddings): [(tokens (77), multipliers (77))]."""
    parsed = P.parse_attention(line)
    tokenized = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    comma, bos, eos = tokenizer.get_vocab()[",</w>"], tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks, state = [], {"tokens": [], "mults": [], "last_comma": -1}

    def next_chunk():
        tokens, mults = state["tokens"], state["mults"]
        fill = 75 - len(tokens)
        chunks.append(([bos] + tokens + [eos] * fill + [eos], [1.0] + mults + [1.0] * fill + [1.0]))
        state.update(tokens=[], mults=[], last_comma=-1)

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tokens:
            if token == comma:
                state["last_comma"] = len(state["tokens"])
            elif len(state["tokens"]) == 75 and state["last_comma"] != -1 and 75 - state["last_comma"] <= 20:
                cut = state["last_comma"] + 1
                moved = state["tokens"][cut:], state["mults"][cut:]
                state["tokens"], state["mults"] = state["tokens"][:cut], state["mults"][:cut]
                next_chunk()
                state["tokens"], state["mults"] = list(moved[0]), list(moved[1])
            if len(state["tokens"]) == 75:
                next_chunk()
            state["tokens"].append(token)
            state["mults"].append(weight)
    if state["tokens"] or not chunks:
        next_chunk()
    return chunks


def a1111_cond(torch_clip, prompt, chunks=1, clip_stop_at_last_layers=1):
    """A1111's conditioning of one prompt (a batch of one), padded with the empty prompt's encoding to ``chunks``."""
    model, tokenizer = torch_clip
    zs = []
    line = a1111_tokenize_line(tokenizer, prompt)
    empty = a1111_tokenize_line(tokenizer, "")[0]
    for tokens, mults in line + [empty] * (chunks - len(line)):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
            if clip_stop_at_last_layers > 1:
                z = getattr(model, "text_model", model).final_layer_norm(out.hidden_states[-clip_stop_at_last_layers])
            else:
                z = out.last_hidden_state
            original_mean = z.mean()
            z = z * torch.tensor(mults)[None, :, None]
            z = z * (original_mean / z.mean())
        zs.append(z)
    return torch.hstack(zs)[0].numpy()


@pytest.mark.parametrize("prompt", [
    "a (photo:1.4) of a [[cat]], (((masterpiece)))",
    LONG,
    "a castle on a hill BREAK (stormy sky:0.8), lightning",
])
def test_conditioning_equals_a1111_reference(tiny_pipe, torch_clip, prompt):
    got = np.asarray(tiny_pipe.encode_prompt(prompt))[0]
    want = a1111_cond(torch_clip, prompt)
    assert got.shape == want.shape and got.shape[0] % 77 == 0
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_clip_skip_is_a1111_clip_skip_plus_one(tiny_pipe, torch_clip):
    """sd_jax clip_skip=1 is A1111's "Clip skip: 2" (CLIP_stop_at_last_layers)."""
    prompt = "a (photo:1.3) of a cat"
    got = np.asarray(tiny_pipe.encode_prompt(prompt, clip_skip=1))[0]
    np.testing.assert_allclose(got, a1111_cond(torch_clip, prompt, clip_stop_at_last_layers=2), atol=2e-5, rtol=1e-5)
    assert not np.allclose(got, a1111_cond(torch_clip, prompt), atol=1e-3)


def test_weights_change_the_conditioning_and_are_traced(tiny_pipe):
    from sd_jax.pipeline import _encode_weighted

    a = np.asarray(tiny_pipe.encode_prompt("a (cat:1.2) on a mat"))
    size = _encode_weighted._cache_size()
    b = np.asarray(tiny_pipe.encode_prompt("a (cat:1.5) on a mat"))
    assert _encode_weighted._cache_size() == size  # a new weight: no new compilation
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_allclose(a.mean(), b.mean(), rtol=1e-4)  # the mean is restored


def test_batch_pads_every_prompt_to_the_longest(tiny_pipe, torch_clip):
    prompts = ["a cat", LONG]
    got = np.asarray(tiny_pipe.encode_prompt(prompts))
    count = len(a1111_tokenize_line(torch_clip[1], LONG))
    assert count == 2 and got.shape[:2] == (2, 77 * count)
    np.testing.assert_allclose(got[0], a1111_cond(torch_clip, "a cat", chunks=count), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1], a1111_cond(torch_clip, LONG), atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- plain and defaults

def test_plain_is_todays_truncated_encoding(tiny_pipe, torch_clip, caplog):
    model, tokenizer = torch_clip
    prompts = ["a (photo:1.4) of a cat", LONG]
    with caplog.at_level(logging.WARNING, logger="sd_jax"):
        got = np.asarray(tiny_pipe.encode_prompt(prompts, prompt_syntax="plain"))
    assert "prompt truncated to 77 tokens" in caplog.text
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state.numpy()
    assert got.shape == (2, 77, want.shape[-1])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # a short prompt without brackets is the same in both syntaxes
    np.testing.assert_array_equal(np.asarray(tiny_pipe.encode_prompt("a cat on a mat")),
                                  np.asarray(tiny_pipe.encode_prompt("a cat on a mat", prompt_syntax="plain")))


def test_a1111_is_the_default_and_bad_syntax_is_refused():
    assert GenerationRequest.build("a").prompt_syntax == "a1111"
    with pytest.raises(RequestError, match="prompt_syntax='x' must be one of a1111, plain"):
        GenerationRequest.build("a", prompt_syntax="x")


def test_too_long_prompt_is_refused_before_sampling(tiny_pipe):
    words = "a " * (P.MAX_CHUNKS * 75 + 10)  # one token each
    with pytest.raises(RequestError, match=f"must fit in {P.MAX_CHUNKS} chunks of 75 tokens; one has 2410 tokens"):
        tiny_pipe.check_request(GenerationRequest.build(words, height=32, width=32))


# ----------------------------------------------------------------------------- end to end

def test_long_prompt_end_to_end_uses_the_chunk_reference(tiny_pipe, torch_clip, monkeypatch):
    from sd_jax import pipeline, sampling

    seen = {}
    real = sampling.compiled_denoise

    def spy(*args, **kwargs):
        run = real(*args, **kwargs)

        def wrapped(*inputs):
            seen["cond"], seen["uncond"] = np.asarray(inputs[3]), np.asarray(inputs[4])
            return run(*inputs)
        return wrapped

    monkeypatch.setattr(pipeline.sampling, "compiled_denoise", spy)
    result = tiny_pipe.generate(LONG, "blurry, (ugly:1.3)", num_inference_steps=2, height=32, width=32, seed=3)
    assert np.isfinite(result.array).all() and result.array.std() > 0
    np.testing.assert_allclose(seen["cond"][0], a1111_cond(torch_clip, LONG), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(seen["uncond"][0], a1111_cond(torch_clip, "blurry, (ugly:1.3)", chunks=2),
                               atol=2e-5, rtol=1e-5)
    assert seen["cond"].shape[1] == seen["uncond"].shape[1] == 2 * 77
