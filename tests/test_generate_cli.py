"""generate.py end to end on a tiny random model: files, PNG metadata, numbering, grid, progress, seeds,
init-image defaults, offline start, bounds and errors (one line naming the flag)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_jax.cli import common
from sd_jax.cli.generate import main
from sd_jax.outputs import next_index
from tiny import make_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          check=False, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _text(path: Path) -> dict[str, str]:
    with Image.open(path) as img:
        return dict(img.text)


@pytest.fixture(scope="module")
def first_run(model, tmp_path_factory):
    """One real command-line run: 2 prompts x 2 images, batches of 2, a grid."""
    outdir = tmp_path_factory.mktemp("out")
    proc = _cli("--model", str(model), "--prompt", "a cat", "--prompt", "a dog", "--n-images", "2",
                "--batch-size", "2", "--seed", "5", "--negative-prompt", "blurry", "--scheduler", "ddim",
                "--guidance-scale", "6.5", "--grid", "--outdir", str(outdir), *SMALL)
    assert proc.returncode == 0, proc.stderr
    return outdir, proc


def test_subprocess_run_writes_numbered_pngs_with_metadata(first_run, model):
    outdir, proc = first_run
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["00000-5.png", "00001-6.png", "00002-7.png", "00003-8.png", "grid-00000.png"]
    meta = _text(outdir / "00002-7.png")
    assert meta["prompt"] == "a dog" and meta["seed"] == "7" and meta["negative_prompt"] == "blurry"
    assert (meta["steps"], meta["scheduler"], meta["guidance_scale"]) == ("2", "ddim", "6.5")
    assert (meta["width"], meta["height"], meta["model"], meta["dtype"]) == ("32", "32", str(model), "float32")
    assert meta["batch_size"] == "2" and meta["sd_jax_version"]
    assert "strength" not in meta and "init_image" not in meta
    assert [_text(outdir / f"0000{i}-{5 + i}.png")["prompt"] for i in range(4)] == ["a cat"] * 2 + ["a dog"] * 2
    with Image.open(outdir / "grid-00000.png") as grid:
        assert grid.size == (64, 64)
    assert np.array_equal(_pixels(outdir / "grid-00000.png")[32:, :32], _pixels(outdir / "00002-7.png"))
    for needle in ("compile time", "time to first image", "images/s after compilation", "wrote 4 image(s)"):
        assert needle in proc.stdout
    # One bar over every denoising step (2 batches x 2 DDIM steps), after a visible compile phase.
    assert "compiling the sampler for batches of 2 at 32x32" in proc.stderr and "compiled in" in proc.stderr
    assert "denoising: 100%" in proc.stderr and "4/4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_second_run_continues_numbering_and_reads_prompt_file(first_run, model, tmp_path, capsys):
    outdir, _ = first_run
    (outdir / "00006-mine.txt").write_text("a user's file")  # numbering goes past it, never over it
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\n\na red car\n   \n  a blue boat  \n")
    assert main(["--model", str(model), "--from-file", str(prompts), "--seed", "100", "--grid",
                 "--outdir", str(outdir), *SMALL]) == 0
    assert (outdir / "00006-mine.txt").read_text() == "a user's file"
    assert _text(outdir / "00007-100.png")["prompt"] == "a red car"
    assert _text(outdir / "00008-101.png")["prompt"] == "a blue boat"
    assert _text(outdir / "00008-101.png")["batch_size"] == "2"  # default: min(total, 8)
    assert _text(outdir / "00008-101.png")["scheduler"] == "pndm"  # the folder's own
    assert (outdir / "grid-00001.png").is_file()
    assert "Traceback" not in capsys.readouterr().err


def test_png_metadata_regenerates_that_image_alone(first_run, model, tmp_path):
    outdir, _ = first_run
    original = outdir / "00003-8.png"
    meta = _text(original)
    assert main(["--model", meta["model"], "--prompt", meta["prompt"], "--negative-prompt", meta["negative_prompt"],
                 "--steps", meta["steps"], "--scheduler", meta["scheduler"],
                 "--guidance-scale", meta["guidance_scale"], "--seed", meta["seed"], "--n-images", "1",
                 "--width", meta["width"], "--height", meta["height"], "--dtype", meta["dtype"],
                 "--outdir", str(tmp_path)]) == 0
    # Another batch position on 8 devices: equal to ~1e-6 before rounding, so at most one 8-bit level apart.
    diff = np.abs(_pixels(tmp_path / "00000-8.png").astype(int) - _pixels(original).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_regenerates_pixel_exact_on_one_device_with_recorded_batch_size(model, tmp_path):
    """On one device the batch shape is not padded: the recorded --batch-size reproduces it."""
    script = (
        "import sys; from PIL import Image; from sd_jax.cli.generate import main\n"
        "model, out = sys.argv[1], sys.argv[2]\n"
        f"small = {SMALL!r}\n"
        "assert main(['--model', model, '--prompt', 'a cat', '--prompt', 'a dog', '--seed', '40',"
        " '--scheduler', 'euler_a', '--outdir', out + '/a', *small]) == 0\n"
        "m = Image.open(out + '/a/00001-41.png').text\n"
        "assert main(['--model', model, '--prompt', m['prompt'], '--seed', m['seed'], '--n-images', '1',"
        " '--batch-size', m['batch_size'], '--scheduler', m['scheduler'], '--outdir', out + '/b', *small]) == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path)], capture_output=True,
                          text=True, check=False, cwd=ROOT, timeout=300,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(_pixels(tmp_path / "b" / "00000-41.png"), _pixels(tmp_path / "a" / "00001-41.png"))


def test_img2img_and_inpainting_record_their_inputs(model, tmp_path, capsys):
    init = tmp_path / "sketch.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(mask)
    out = tmp_path / "out"
    assert main(["--model", str(model), "--prompt", "a cat", "--init-image", str(init), "--strength", "0.5",
                 "--seed", "0", "--outdir", str(out), *SMALL]) == 0
    assert main(["--model", str(model), "--prompt", "a cat", "--init-image", str(init), "--mask-image", str(mask),
                 "--seed", "0", "--outdir", str(out), *SMALL]) == 0
    img2img, inpaint = _text(out / "00000-0.png"), _text(out / "00001-0.png")
    assert (img2img["strength"], img2img["init_image"]) == ("0.5", "sketch.png") and "mask_image" not in img2img
    assert (inpaint["strength"], inpaint["mask_image"]) == ("1.0", "mask.png")  # diffusers' inpainting default
    assert "Traceback" not in capsys.readouterr().err


def test_init_image_size_is_the_default_rounded_down_to_8(model, tmp_path):
    init = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 63, 3), np.uint8)).save(init)  # 63x45
    assert main(["--model", str(model), "--prompt", "a cat", "--init-image", str(init), "--steps", "2",
                 "--seed", "3", "--outdir", str(tmp_path / "out")]) == 0
    meta = _text(tmp_path / "out" / "00000-3.png")
    assert (meta["width"], meta["height"], meta["strength"]) == ("56", "40", "0.8")
    with Image.open(tmp_path / "out" / "00000-3.png") as img:
        assert img.size == (56, 40)


def test_seed_is_random_by_default_and_with_minus_1_printed_and_recorded(model, tmp_path, capsys):
    seeds = []
    for extra in ([], ["--seed", "-1"]):
        out = tmp_path / f"out{len(seeds)}"
        assert main(["--model", str(model), "--prompt", "a cat", "--n-images", "2", "--outdir", str(out),
                     *SMALL, *extra]) == 0
        printed = capsys.readouterr().out
        files = sorted(out.glob("*.png"))
        seed = int(_text(files[0])["seed"])
        assert [int(_text(f)["seed"]) for f in files] == [seed, seed + 1]
        assert files[0].name == f"00000-{seed}.png" and f"seed: {seed} (random" in printed
        seeds.append(seed)
    assert seeds[0] != seeds[1]


def test_flagged_images_are_reported_not_altered(model, tmp_path, capsys, monkeypatch):
    from sd_jax.pipeline import StableDiffusion

    run = StableDiffusion.run  # what generate() and the CLI's batch loop call

    def flag_seed_3(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        result.nsfw = [s == 3 for s in result.seeds]
        return result

    args = ["--model", str(model), "--prompt", "a cat", "--n-images", "3", "--seed", "2", *SMALL]
    assert main([*args, "--outdir", str(tmp_path / "plain")]) == 0
    monkeypatch.setattr(StableDiffusion, "run", flag_seed_3)
    capsys.readouterr()
    assert main([*args, "--outdir", str(tmp_path / "flagged")]) == 0
    err = capsys.readouterr().err
    assert "flagged 1 of 3" in err and str(tmp_path / "flagged" / "00001-3.png") in err
    assert "00000-2.png" not in err and "00002-4.png" not in err
    for name in ("00000-2.png", "00001-3.png", "00002-4.png"):
        assert np.array_equal(_pixels(tmp_path / "flagged" / name), _pixels(tmp_path / "plain" / name))


def test_no_safety_checker_is_passed_to_the_loader(model, tmp_path, monkeypatch):
    from sd_jax.pipeline import StableDiffusion

    load, calls = StableDiffusion.from_pretrained, []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(StableDiffusion, "from_pretrained", recording)
    args = ["--model", str(model), "--prompt", "a cat", "--outdir", str(tmp_path), *SMALL]
    assert main(args) == 0 and main([*args, "--no-safety-checker"]) == 0
    assert [c["safety_checker"] for c in calls] == [True, False]
    assert calls[1]["dtype"] == "float32"


def _bad_cases(model: Path, tmp: Path) -> list[tuple[list[str], str]]:
    not_an_image = tmp / "notes.png"
    not_an_image.write_text("not a PNG")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    empty = tmp / "empty.txt"
    empty.write_text("# only a comment\n\n")
    init = tmp / "init.png"
    Image.new("RGB", (32, 32)).save(init)
    _png_header_only(tmp / "bomb.png", 30000, 30000)
    m, p = ["--model", str(model)], ["--prompt", "a cat"]
    return [
        ([*m, *p, "--height", "60"], "--height 60 must be a positive multiple of 8"),
        ([*m, *p, "--width", "30"], "--width 30"),
        ([*m, *p, "--height", "800000"], "--height 800000 must be a positive multiple of 8 up to 8192"),
        ([*m, *p, "--n-images", "1000000000"], "make fewer images"),  # disk: streamed, but 1e9 PNGs do not fit
        ([*m, *p, "--n-images", "0"], "--n-images 0"),
        ([*m, *p, "--steps", "0"], "--steps 0"),
        ([*m, *p, "--steps", "-3"], "--steps -3"),
        ([*m, *p, "--steps", "many"], "'many'"),
        ([*m, *p, "--scheduler", "heun"], "'heun'"),
        ([*m, *p, "--dtype", "float64"], "'float64'"),
        ([*m, *p, "--guidance-scale", "nan"], "--guidance-scale nan"),
        ([*m, *p, "--strength", "0.5"], "--strength 0.5 needs --init-image"),
        ([*m, *p, "--init-image", str(init), "--strength", "1.5"], "--strength 1.5 must be in (0, 1]"),
        ([*m, *p, "--seed", "-2"], "--seed -2"),
        ([*m, *p, "--seed", str(2**32)], "--seed 4294967296"),
        (["--model", str(tmp / "no_such_model"), *p], "no_such_model"),
        ([*m], "no prompt"),
        ([*m, "--from-file", str(empty)], "empty.txt"),
        ([*m, "--from-file", str(tmp / "missing.txt")], "missing.txt"),
        ([*m, *p, "--init-image", str(not_an_image)], "notes.png"),
        ([*m, *p, "--init-image", str(tmp / "nowhere.png")], "nowhere.png"),
        ([*m, *p, "--mask-image", str(init)], "--mask-image needs --init-image"),
        ([*m, *p, "--init-image", str(tmp / "bomb.png")], "megapixels"),
        ([*m, *p, "--outdir", str(a_file / "out")], "a_file"),
        ([*m, *p, "--outdir", str(a_file)], "a_file"),
    ]


def test_bad_values_give_one_line_and_exit_2(model, tmp_path, capsys, monkeypatch):
    from sd_jax.pipeline import StableDiffusion

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before a cheap check failed")

    monkeypatch.setattr(StableDiffusion, "from_pretrained", no_loading)
    for argv, needle in _bad_cases(model, tmp_path):
        outdir = [] if "--outdir" in argv else ["--outdir", str(tmp_path / "ok")]
        rc = _exit_status([*SMALL, *argv, *outdir])  # argv last: its values win
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2, (argv, err)
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("generate.py: error: "), (argv, err)
        assert "Traceback" not in err


def _exit_status(argv: list[str]) -> int:
    """main's return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (900 megapixels for 30000x30000) with a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("argv,needle", [
    (["--eta", "0.5"], "--eta 0.5 only applies to the ddim"),   # raised by the pipeline (folder scheduler: pndm)
    (["--clip-skip", "5"], "--clip-skip 5 must be below"),       # the text encoder has 2 layers
])
def test_library_errors_after_loading_are_one_line(model, tmp_path, capsys, argv, needle):
    rc = main(["--model", str(model), "--prompt", "a cat", "--outdir", str(tmp_path), *SMALL, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


def test_bad_value_from_the_shell_has_no_traceback(model):
    proc = _cli("--model", str(model), "--prompt", "a cat", "--height", "100")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "generate.py: error: --height 100 must be a positive multiple of 8 up to 8192"


def test_help_lists_every_flag_and_says_progress_is_per_step(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--from-file", "--negative-prompt", "--steps", "--scheduler",
                 "--guidance-scale", "--height", "--width", "--seed", "--n-images", "--batch-size", "--outdir",
                 "--grid", "--dtype", "--init-image", "--strength", "--mask-image", "--no-safety-checker",
                 "--eta", "--clip-skip", "--no-progress", "dpm++2m-karras", "CompVis/stable-diffusion-v1-4"):
        assert flag in text
    assert "per denoising step" in " ".join(text.split())


def test_next_index_counts_past_any_numbered_file(tmp_path):
    assert next_index(tmp_path) == 0
    for name in ("00002-7.png", "00010-notes.txt", "grid-00042.png", "readme.md", "7.png"):
        (tmp_path / name).write_text("")
    assert next_index(tmp_path) == 11


def test_dtype_choices_match_the_pipeline():
    from sd_jax.generation import DTYPES as RUN_DTYPES
    from sd_jax.pipeline import DTYPES

    assert set(common.DTYPE_CHOICES) == set(DTYPES) == set(RUN_DTYPES)


def test_cli_pixels_equal_pipe_generate_with_the_same_arguments(model, tmp_path, tiny_pipe_of):
    """Every flag reaches the pipeline: the CLI's PNGs equal pipe.generate's images for the same values."""
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)).save(init)
    argv = ["--model", str(model), "--prompt", "a red cat", "--negative-prompt", "blurry", "--n-images", "2",
            "--steps", "3", "--scheduler", "ddim", "--eta", "0.3", "--guidance-scale", "5.5", "--seed", "9",
            "--init-image", str(init), "--strength", "0.7", "--outdir", str(tmp_path / "out")]
    assert main(argv) == 0
    pipe = tiny_pipe_of(model)
    want = pipe.generate("a red cat", negative_prompt="blurry", num_images_per_prompt=2, num_inference_steps=3,
                         scheduler="ddim", eta=0.3, guidance_scale=5.5, seed=9, init_image=Image.open(init),
                         strength=0.7)
    for i, image in enumerate(want.images):
        assert np.array_equal(_pixels(tmp_path / "out" / f"0000{i}-{9 + i}.png"), np.asarray(image))
    other = pipe.generate("a red cat", negative_prompt="blurry", num_images_per_prompt=2, num_inference_steps=3,
                          scheduler="ddim", eta=0.3, guidance_scale=5.5, seed=9, init_image=Image.open(init),
                          strength=0.5)
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(want.images[0]))  # strength matters


def test_offline_hub_id_fails_at_once_with_one_line(tmp_path):
    """The default model without network: one line in seconds (no retries), with or without HF_HUB_OFFLINE."""
    import time

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}):
        t0 = time.perf_counter()
        proc = _cli("--prompt", "a cat", "--outdir", str(tmp_path / "out"), env={**env, **extra})
        took = time.perf_counter() - t0
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "CompVis/stable-diffusion-v1-4" in lines[0] and "not in the local Hugging Face cache" in lines[0]
        assert took < 60, took  # the interpreter and JAX start included; the hub client alone retried for ~40 s


def test_non_finite_output_is_an_error_and_writes_nothing(model, tmp_path, capsys, monkeypatch):
    import jax

    from sd_jax.pipeline import StableDiffusion

    load = StableDiffusion.from_pretrained

    def nan_bias(*args, **kwargs):
        pipe = load(*args, **kwargs)
        unet = jax.tree_util.tree_map_with_path(
            lambda path, x: x * np.nan if "conv_out" in jax.tree_util.keystr(path) else x, pipe.params["unet"])
        pipe.params = {**pipe.params, "unet": unet}
        return pipe

    monkeypatch.setattr(StableDiffusion, "from_pretrained", nan_bias)
    rc = main(["--model", str(model), "--prompt", "a cat", "--seed", "4", "--outdir", str(tmp_path), *SMALL])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]  # the progress bar shares stderr
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("generate.py: error: ") and "NaN/inf" in lines[0] and "seeds 4" in lines[0]
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture(scope="module")
def tiny_pipe_of():
    from sd_jax.pipeline import StableDiffusion

    cache = {}
    return lambda folder: cache.setdefault(folder, StableDiffusion.from_pretrained(folder))
