"""Textual-inversion embeddings (sd_jax.embeddings) and AUTOMATIC1111's infotext (sd_jax.outputs.a1111_parameters).

Embeddings are checked against diffusers' ``load_textual_inversion`` on the tiny model (text-encoder
outputs), A1111 ``.pt`` files are made with ``torch.save`` and read through sd_jax's restricted
unpickler, and the PNG ``parameters`` text is read back by a parser written below the way A1111's
``parse_generation_parameters`` reads it.
"""

import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd_jax.embeddings import parse_embedding_arg, read_embedding

WIDTH = 32  # tests/tiny.py TINY_CLIP hidden_size


@pytest.fixture(scope="module")
def fresh_pipe(tiny_folder):
    """A pipeline of this module's own (loading an embedding changes the tokenizer and the text encoder; each test
    uses its own tokens)."""
    from sd_jax import StableDiffusion

    return StableDiffusion.from_pretrained(tiny_folder, safety_checker=False)


def _vectors(n, width=WIDTH, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 0.5, (n, width)).astype(np.float32))


def _a1111_pt(path, vectors, name="ignored-name"):
    """What A1111's Embedding.save writes (after training: the vector has requires_grad)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_(True)},
                "name": name, "step": 1500, "sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "v1-5"}, path)
    return path


def _diffusers_cond(folder, files_tokens, prompts):
    """diffusers' text-encoder output for prompts after load_textual_inversion (its maybe_convert_prompt)."""
    from tiny import load_reference

    ref = load_reference(folder)
    for file, token in files_tokens:
        ref.load_textual_inversion(str(file), token=token)
    prompts = [ref.maybe_convert_prompt(p, ref.tokenizer) for p in prompts]
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return ref.text_encoder(ids).last_hidden_state.numpy()


# ----------------------------------------------------------------------------- files


def test_a1111_pt_round_trip_through_the_restricted_unpickler(tmp_path):
    vectors = _vectors(4)
    emb = read_embedding(_a1111_pt(tmp_path / "my-style.pt", vectors))
    assert emb.token == "my-style"  # the file stem, as A1111 names it
    np.testing.assert_array_equal(emb.vectors, vectors.numpy())
    assert emb.short_hash == hashlib.sha256((tmp_path / "my-style.pt").read_bytes()).hexdigest()[:12]
    assert read_embedding(tmp_path / "my-style.pt", token="other").token == "other"


def test_a1111_and_diffusers_safetensors_layouts(tmp_path):
    v = _vectors(2)
    save_file({"emb_params": v}, tmp_path / "bad-hands.safetensors")
    save_file({"string_to_param.*": v}, tmp_path / "style2.safetensors")
    save_file({"<cat-toy>": v[0]}, tmp_path / "learned_embeds.safetensors")
    torch.save({"<dog>": v}, tmp_path / "learned_embeds.bin")
    assert read_embedding(tmp_path / "bad-hands.safetensors").token == "bad-hands"
    assert read_embedding(tmp_path / "style2.safetensors").token == "style2"
    one = read_embedding(tmp_path / "learned_embeds.safetensors")
    assert one.token == "<cat-toy>" and one.vectors.shape == (1, WIDTH)
    assert read_embedding(tmp_path / "learned_embeds.bin").token == "<dog>"
    for dtype in (torch.float16, torch.bfloat16):  # half-precision files come back as float32
        save_file({"emb_params": v.to(dtype)}, tmp_path / "half.safetensors")
        half = read_embedding(tmp_path / "half.safetensors")
        assert half.vectors.dtype == np.float32
        np.testing.assert_array_equal(half.vectors, v.to(dtype).float().numpy())


def test_hostile_and_malformed_files_are_refused(tmp_path):
    from sd_jax.convert.torch_pickle import UnsafeCheckpointError

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"string_to_param": {"*": Boom()}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_embedding(tmp_path / "evil.pt")
    save_file({"a": _vectors(1), "b": _vectors(1)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="expected one tensor"):
        read_embedding(tmp_path / "two.safetensors")
    save_file({"clip_l": _vectors(1), "clip_g": _vectors(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors")
    save_file({"emb_params": torch.full((1, WIDTH), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="NaN or inf"):
        read_embedding(tmp_path / "nan.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown file type"):
        read_embedding(tmp_path / "x.txt")


def test_embedding_arg_file_and_token(tmp_path):
    assert parse_embedding_arg("a/b.pt") == ("a/b.pt", None)
    assert parse_embedding_arg("a/b.pt:tok") == ("a/b.pt", "tok")
    assert parse_embedding_arg("C:\\emb\\b.pt") == ("C:\\emb\\b.pt", None)
    odd = tmp_path / "x:y.pt"
    odd.write_bytes(b"")
    assert parse_embedding_arg(str(odd)) == (str(odd), None)


# ----------------------------------------------------------------------------- against diffusers


def test_embeddings_match_diffusers_load_textual_inversion(fresh_pipe, tiny_folder, tmp_path):
    """A multi-vector A1111 .pt and a one-vector diffusers file: text-encoder outputs equal diffusers'."""
    pt = _a1111_pt(tmp_path / "my-style.pt", _vectors(3, seed=1))
    single = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": _vectors(1, seed=2)[0]}, single)
    assert fresh_pipe.load_embedding(pt) == "my-style"
    assert fresh_pipe.load_embedding(single) == "<cat-toy>"
    prompts = ["a painting of a <cat-toy> in my-style", "my-style", "a photo of a dog"]
    want = _diffusers_cond(tiny_folder, [(pt, "my-style"), (single, None)], prompts)
    for syntax in ("plain", "a1111"):
        got = np.asarray(fresh_pipe.encode_prompt(prompts, prompt_syntax=syntax))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # the vectors are used: without them the prompt reads differently
    assert np.abs(want[0] - _diffusers_cond(tiny_folder, [], prompts[:1])[0]).max() > 1e-3
    # loading again is harmless; a real word or another vector count is refused
    assert fresh_pipe.load_embedding(pt) == "my-style"
    with pytest.raises(ValueError, match="'cat' is already a word of the tokenizer's vocabulary"):
        fresh_pipe.load_embedding(pt, token="cat")
    with pytest.raises(ValueError, match="'my-style' is already an embedding of 3 vector"):
        fresh_pipe.load_embedding(_a1111_pt(tmp_path / "four.pt", _vectors(4)), token="my-style")


def test_weighted_embedding_in_a1111_syntax(fresh_pipe, tmp_path):
    fresh_pipe.load_embedding(_a1111_pt(tmp_path / "sty-x.pt", _vectors(2, seed=3)))
    plain = np.asarray(fresh_pipe.encode_prompt("a dog, sty-x"))
    weighted = np.asarray(fresh_pipe.encode_prompt("a dog, (sty-x:1.4)"))
    chunks = fresh_pipe.prompt_chunks(["a dog, (sty-x:1.4)"])[0]
    assert list(chunks.weights[0, 4:6]) == pytest.approx([1.4, 1.4])  # both vectors carry the weight
    assert np.abs(plain - weighted).max() > 1e-3


def test_width_mismatch_is_one_line_naming_the_file_and_widths(fresh_pipe, tmp_path):
    before = len(fresh_pipe.tokenizer.hf)
    path = _a1111_pt(tmp_path / "sd2-style.pt", _vectors(1, width=1024))
    with pytest.raises(ValueError) as info:
        fresh_pipe.load_embedding(path)
    message = str(info.value)
    assert "\n" not in message and "sd2-style.pt" in message and "1024" in message and f"{WIDTH} wide" in message
    assert len(fresh_pipe.tokenizer.hf) == before  # nothing was added


# ----------------------------------------------------------------------------- A1111 infotext

def parse_infotext(text):
    """A1111's parse_generation_parameters, reduced: prompt lines, 'Negative prompt:' lines, the last line's fields."""
    *lines, last = text.strip().split("\n")
    fields = {}
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        fields[key] = json.loads(value) if value.startswith('"') and value.endswith('"') else value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), fields


def test_infotext_reads_back_as_a1111_reads_it(tmp_path):
    from sd_jax.outputs import a1111_parameters

    text = a1111_parameters("a (cat:1.2), sitting\non a mat", "blurry, ugly", steps=20, sampler="dpm++2m-karras",
                            cfg_scale=7.0, seed=1234, width=512, height=768, model="v1-5-pruned.safetensors",
                            model_hash="6ce0161689", clip_skip=1, denoising_strength=0.75,
                            loras=[{"name": "add_detail", "hash": "7c6bad76eb54"}, {"name": "x:y", "hash": "0a1b"}],
                            embeddings={"bad-hands": "aabbccddeeff"})
    prompt, negative, fields = parse_infotext(text)
    assert (prompt, negative) == ("a (cat:1.2), sitting\non a mat", "blurry, ugly")
    assert fields == {"Steps": "20", "Sampler": "DPM++ 2M Karras", "CFG scale": "7", "Seed": "1234",
                      "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned.safetensors",
                      "Denoising strength": "0.75", "Clip skip": "2",
                      "Lora hashes": "add_detail: 7c6bad76eb54, xy: 0a1b", "TI hashes": "bad-hands: aabbccddeeff"}
    bare = a1111_parameters("a cat", steps=4, sampler="Euler a", cfg_scale=7.5, seed=1, width=64, height=64)
    assert bare == "a cat\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64"


def test_written_png_carries_the_infotext_beside_the_metadata(tmp_path):
    from sd_jax.outputs import ImageWriter
    from sd_jax.pipeline import GenerationResult
    from sd_jax.request import GenerationRequest

    model = tmp_path / "my-model.safetensors"
    model.write_bytes(b"not really a model" * 100)
    req = GenerationRequest.build("a (red:1.3) cat, sty", "blurry", num_inference_steps=12, scheduler="euler_a",
                                  guidance_scale=6.5, seed=42, height=64, width=48, clip_skip=1)
    result = GenerationResult.of(req, "euler_a", np.zeros((1, 64, 48, 3), np.float32), None)
    result.loras = [{"name": "add_detail", "scale": 0.7, "hash": "7c6bad76eb54", "source": "x"}]
    writer = ImageWriter(tmp_path / "out", model=str(model), dtype="float32",
                         embeddings={"sty": "0123456789ab", "unused": "ffffffffffff"})
    (path,) = writer.write(result)
    with Image.open(path) as img:
        text = dict(img.text)
    assert text["prompt"] == "a (red:1.3) cat, sty" and text["seed"] == "42" and text["prompt_syntax"] == "a1111"
    prompt, negative, fields = parse_infotext(text["parameters"])
    assert (prompt, negative) == ("a (red:1.3) cat, sty", "blurry")
    assert fields["Sampler"] == "Euler a" and fields["Steps"] == "12" and fields["CFG scale"] == "6.5"
    assert fields["Seed"] == "42" and fields["Size"] == "48x64" and fields["Clip skip"] == "2"
    assert fields["Model"] == "my-model"
    assert fields["Model hash"] == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert fields["Lora hashes"] == "add_detail: 7c6bad76eb54" and text["lora_hashes"] == fields["Lora hashes"]
    assert fields["TI hashes"] == "sty: 0123456789ab" and "Denoising strength" not in fields


def test_generate_cli_embedding_flag(tiny_folder, tmp_path):
    """--embedding FILE:TOKEN through generate.py's main: loaded, used and recorded (its effect on the text
    encoder: test_embeddings_match_diffusers_load_textual_inversion)."""
    from sd_jax.cli.generate import main

    pt = _a1111_pt(tmp_path / "style.pt", _vectors(2, seed=5) * 4)
    args = ["--model", str(tiny_folder), "--steps", "2", "--height", "32", "--width", "32", "--seed", "4",
            "--no-progress", "--no-safety-checker"]
    assert main([*args, "--prompt", "a cat in (zz-emb:1.1)", "--outdir", str(tmp_path / "a"),
                 "--embedding", f"{pt}:zz-emb"]) == 0
    (png,) = (tmp_path / "a").glob("*.png")
    with Image.open(png) as img:
        text = dict(img.text)
        assert np.isfinite(np.asarray(img.convert("RGB"), np.float32)).all()
    assert text["embeddings"] == f"zz-emb: {read_embedding(pt).short_hash}"
    assert parse_infotext(text["parameters"])[2]["TI hashes"] == f"zz-emb: {read_embedding(pt).short_hash}"
    with pytest.raises(SystemExit):
        main([*args, "--prompt", "x", "--plain-prompts", "--embedding"])
