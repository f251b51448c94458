"""Text -> image with a full-size SD v1.4 (random weights): sd_jax against diffusers, side by side.

Figures (the README's sampling section):

* image       end-to-end wall time per image (prompt in, PIL image out) at ``--size``, CFG 7.5,
              ``--steps`` PNDM steps and ``--dpm-steps`` DPM++ 2M steps; sd_jax ``generate`` against
              diffusers ``StableDiffusionPipeline`` on the same folder, same initial latents
              (``latents=``, NHWC for sd_jax, NCHW for diffusers), same solver and step count.
* compile     sd_jax only: the first call of the jitted sampler for a new shape in a process with a
              fresh persistent compilation cache (``SD_JAX_COMPILATION_CACHE`` = a new temp dir), and
              in a second process reusing that cache: process start -> first denoising step, and
              process start -> first image (diffusers: a fresh process, for comparison). Plus the
              number of sampler compilations over calls that change guidance scale (also mixed per
              image) and seed (``compiled_denoise(...)._cache_size()``, should stay 1 per shape).
* throughput  images/s at batch ``--batches`` (``num_images_per_prompt=b``, one compiled call),
              ``--throughput-steps`` PNDM steps.
* memory      peak resident memory (VmHWM) of every process.

Every measurement runs in a fresh subprocess holding one implementation only (a full-size model
is ~4.3 GB of float32 weights per implementation). The timing rounds alternate the processes,
sd_jax, diffusers, sd_jax, diffusers, ... (``--repeats`` of each); inside a process every
(solver, steps, batch) configuration is warmed up first (sd_jax: its sampler compiled, the text
encoder and VAE decoder run at that shape; diffusers: a 1-step call of that shape), then timed
once. Medians over the rounds are reported; the ratio column is sd_jax time / diffusers time
(< 1: sd_jax is faster; for images/s rows it is the same time ratio).

How sd_jax's "first step" is observed: the whole loop is one jitted ``fori_loop`` whose start index
is a traced value (img2img uses it), so the bench calls the very sampler ``generate`` uses
(``sampling.compiled_denoise``, same arguments, same executable) with the start index at the last
loop index: one UNet call. Its first call is compile (or cache load) + 1 step; a second call gives
the steady 1-step time; the difference is the compile time.

    python bench/sample.py                                    # defaults below: many hours on a 2-core CPU
    python bench/sample.py --size 256 --steps 4 --dpm-steps 4 --batches 1 2 --repeats 1   # ~15 min

A 512x512 batch-2 UNet call takes ~10 s on the 2-core CPU here, so 50 PNDM steps (51 calls) are
~8.5 min per image per implementation, and a batch of 8 about eight times that per call. The model folder is
built once under ``--workdir`` (``diffusers/``, ~4.3 GB) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from common import available_gib, machine, median, peak_rss_hwm_gib, table

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
SOLVERS = {"pndm": "PNDM", "dpm++2m": "DPM++ 2M"}
FIGURES = ("image", "compile", "throughput")


# ---------------------------------------------------------------------------------------- shared
def initial_latents(batch: int, size: int):
    """The unit-variance starting noise both implementations get, NHWC (batch, h, w, 4)."""
    import numpy as np

    return np.random.default_rng(1234).standard_normal((batch, size // 8, size // 8, 4), dtype=np.float32)


def key(config) -> str:
    """'pndm/50/b1' for (solver, steps, batch)."""
    solver, steps, batch = config
    return f"{solver}/{steps}/b{batch}"


def uint8_images(pil_images):
    """PIL images -> (B, H, W, 3) uint8."""
    import numpy as np

    return np.stack([np.asarray(im.convert("RGB")) for im in pil_images])


# ---------------------------------------------------------------------------------------- sd_jax worker
def worker_sd_jax(job: dict, t_spawn: float) -> dict:
    """One sd_jax process: a probe job (compile figures) or a timing round."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sd_jax  # noqa: F401  (XLA:CPU defaults and the persistent cache, before JAX's backend starts)
    from sd_jax import StableDiffusion, sampling, sharding
    from sd_jax.request import image_seeds
    from sd_jax.schedulers import get_scheduler, num_model_calls, pad_schedule, schedule_length

    size, events, out = job["size"], {}, {}
    jax.devices()
    events["imported"] = time.time() - t_spawn
    pipe = StableDiffusion.from_pretrained(job["model"])
    jax.block_until_ready(pipe.params)
    events["loaded"] = time.time() - t_spawn
    mesh = sharding.sampling_mesh()

    def sampler(solver):
        return sampling.compiled_denoise(pipe.unet, get_scheduler(solver), "txt2img", True, mesh)

    def probe(config, guidance, seed):
        """The sampler generate() uses, same arguments, started at its last loop index: 1 UNet call.

        Returns (seconds of the sampler call, latents)."""
        solver, steps, batch = config
        sched = get_scheduler(solver)
        shape = (size // 8, size // 8, 4)
        state = sched.create(pipe.noise_schedule(), steps, (batch, *shape))
        state = state.replace(start_index=jnp.asarray(num_model_calls(state) - 1, jnp.int32))
        # Padded as generate() pads it, so the probe and generate() share one executable.
        state = pad_schedule(sched, state, schedule_length(pipe.noise_schedule()))
        cond = pipe.encode_prompt([PROMPT] * batch)
        uncond = pipe.encode_prompt([""] * batch)
        keys = sampling.seed_keys(image_seeds(seed, batch))
        scales = jnp.asarray(np.broadcast_to(np.asarray(guidance, np.float32), (batch,)))
        start = jnp.asarray(initial_latents(batch, size)) * sched.init_noise_sigma(state)
        jax.block_until_ready((cond, uncond, start))
        t = time.perf_counter()
        latents = sampler(solver)(pipe.params["unet"], state, start, cond, uncond, scales, keys, {})
        latents.block_until_ready()
        return time.perf_counter() - t, latents

    def generate(config, seed):
        solver, steps, batch = config
        return pipe.generate(PROMPT, height=size, width=size, num_inference_steps=steps,
                             guidance_scale=GUIDANCE, scheduler=solver, seed=seed,
                             num_images_per_prompt=batch, latents=initial_latents(batch, size))

    if job["kind"] == "probe":
        config = job["configs"][0]
        first, latents = probe(config, 3.0, 1000)
        events["first_step"] = time.time() - t_spawn
        steady, latents = probe(config, np.linspace(2.0, 9.0, config[2]), 2000)
        np.asarray(pipe.decode_latents(latents))  # so the cache also holds the decoder of this shape
        out.update(first_call=first, steady_step=steady, compiles=sampler(config[0])._cache_size())
    else:
        timings, compiles, finite, probes = {}, {}, {}, {}
        for n, config in enumerate(job["configs"]):
            before = sampler(config[0])._cache_size()
            if job.get("first_image") and n == 0:
                t = time.perf_counter()
                result = generate(config, seed=0)
                events["first_image"] = time.time() - t_spawn
                out["first_image_call"] = time.perf_counter() - t
            # warm-up (compiles this shape), changing guidance (per image too) and seed
            first, latents = probe(config, 3.0, 1000)
            steady, latents = probe(config, np.linspace(2.0, 9.0, config[2]), 2000)
            np.asarray(pipe.decode_latents(latents))
            probes[key(config)] = [first, steady]
            t = time.perf_counter()
            result = generate(config, seed=job["round"])
            timings[key(config)] = time.perf_counter() - t
            compiles[key(config)] = sampler(config[0])._cache_size() - before
            finite[key(config)] = bool(np.isfinite(result.array).all())
            print(f"    sd_jax     {key(config):16s} {timings[key(config)]:9.2f} s  "
                  f"(probe: first {first:.2f} s, 1 step {steady:.2f} s)", flush=True)
            if n == 0 and job.get("save_images"):
                np.save(job["save_images"], uint8_images(result.images))
        out.update(timings=timings, compiles=compiles, finite=finite, probes=probes)
    out["events"] = events
    out["info"] = {"jax": jax.__version__, "devices": len(jax.devices()),
                   "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                   "cache": str(jax.config.jax_compilation_cache_dir),
                   "torch_imported": "torch" in sys.modules}
    return out


# ---------------------------------------------------------------------------------------- diffusers worker
def worker_diffusers(job: dict, t_spawn: float) -> dict:
    """One diffusers process: a timing round (the reference)."""
    import numpy as np
    import torch
    from diffusers import (
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
    )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    size, events, out = job["size"], {}, {}
    events["imported"] = time.time() - t_spawn
    pipe = StableDiffusionPipeline.from_pretrained(job["model"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    events["loaded"] = time.time() - t_spawn
    folder_config = dict(pipe.scheduler.config)

    def set_solver(solver):
        if solver == "pndm":
            pipe.scheduler = PNDMScheduler.from_config(folder_config)
        else:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(
                folder_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)

    def call(config, steps=None, on_first_step=None):
        solver, full_steps, batch = config
        set_solver(solver)
        latents = torch.from_numpy(np.ascontiguousarray(initial_latents(batch, size).transpose(0, 3, 1, 2)))

        def callback(pipeline, i, t, kwargs):
            if i == 0 and on_first_step is not None:
                on_first_step()
            return kwargs

        return pipe(PROMPT, height=size, width=size, num_inference_steps=steps or full_steps,
                    guidance_scale=GUIDANCE, num_images_per_prompt=batch, latents=latents,
                    output_type="pil", callback_on_step_end=callback).images

    timings = {}
    for n, config in enumerate(job["configs"]):
        if job.get("first_image") and n == 0:
            t = time.perf_counter()
            call(config, on_first_step=lambda: events.setdefault("first_step", time.time() - t_spawn))
            events["first_image"] = time.time() - t_spawn
            out["first_image_call"] = time.perf_counter() - t
        else:
            call(config, steps=1)  # warm-up at this shape
        t = time.perf_counter()
        images = call(config)
        timings[key(config)] = time.perf_counter() - t
        print(f"    diffusers  {key(config):16s} {timings[key(config)]:9.2f} s", flush=True)
        if n == 0 and job.get("save_images"):
            np.save(job["save_images"], uint8_images(images))
    out.update(timings=timings, events=events)
    out["info"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "diffusers": __import__("diffusers").__version__}
    return out


def worker_build(job: dict, t_spawn: float) -> dict:
    """Write the random full-size model folder (its own process, so torch's memory goes with it)."""
    from common import write_random_sd_v14

    t = time.perf_counter()
    built = write_random_sd_v14(job["model"])
    return {"built": built, "seconds": time.perf_counter() - t}


WORKERS = {"sd_jax": worker_sd_jax, "diffusers": worker_diffusers, "build": worker_build}


def worker_main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = WORKERS[job["impl"]](job, job["t_spawn"])
    result["peak_rss_gib"] = peak_rss_hwm_gib()
    Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- parent
class Runner:
    """Spawns workers one at a time and collects their JSON results."""

    def __init__(self, tmp: Path, cache: Path):
        self.tmp, self.cache, self.count = tmp, cache, 0

    def run(self, impl: str, **job) -> dict:
        self.count += 1
        job_file, result_file = self.tmp / f"job{self.count}.json", self.tmp / f"result{self.count}.json"
        env = {**os.environ, "SD_JAX_COMPILATION_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error",
               "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        job.update(impl=impl, result=str(result_file), t_spawn=time.time())
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, __file__, "--worker", str(job_file)], env=env, cwd=ROOT, check=False)
        if proc.returncode or not result_file.exists():
            raise SystemExit(f"{impl} worker ({job.get('kind', '')}) failed with exit status {proc.returncode}")
        return json.loads(result_file.read_text())


def fmt_s(x) -> str:
    return "-" if x is None else f"{x:.2f} s"


def ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (multiple of 8)")
    parser.add_argument("--steps", type=int, default=50, help="PNDM steps of the image figure (and compile probe)")
    parser.add_argument("--dpm-steps", type=int, default=25, help="DPM++ 2M steps of the image figure")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="throughput batch sizes")
    parser.add_argument("--throughput-steps", type=int, default=None,
                        help="PNDM steps of the throughput figure (default: --steps)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated timing rounds per implementation")
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sd_jax_bench_model"),
                        help="where the random model folder is built once (WORKDIR/diffusers) and reused")
    parser.add_argument("--model", type=Path, default=None,
                        help="use this existing SD v1 diffusers folder instead of building one")
    parser.add_argument("--keep-cache", action="store_true",
                        help="keep the bench's persistent compilation cache (a fresh temp dir) afterwards")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    if args.size % 8 or args.size <= 0:
        parser.error("--size must be a positive multiple of 8")
    if min(args.steps, args.dpm_steps, args.repeats, *args.batches) < 1:
        parser.error("--steps, --dpm-steps, --repeats and --batches must be >= 1")
    tp_steps = args.throughput_steps or args.steps
    started = time.time()

    configs = []
    if "image" in args.figures or "compile" in args.figures:
        configs.append(("pndm", args.steps, 1))
    if "image" in args.figures:
        configs.append(("dpm++2m", args.dpm_steps, 1))
    if "throughput" in args.figures:
        configs += [("pndm", tp_steps, b) for b in args.batches]
    configs = list(dict.fromkeys(configs))

    tmp = Path(tempfile.mkdtemp(prefix="sd_jax_bench_sample_"))
    cache = tmp / "jax_cache"
    runner = Runner(tmp, cache)
    folder = args.model
    if folder is None:
        folder = args.workdir / "diffusers"
        print(f"model folder {folder} (free memory {available_gib():.1f} GiB)", flush=True)
        built = runner.run("build", model=str(folder))
        print(f"  {'built' if built['built'] else 'reused'}"
              + (f" in {built['seconds']:.0f} s, peak RSS {built['peak_rss_gib']:.1f} GiB" if built["built"] else ""),
              flush=True)
    common_job = {"model": str(folder), "size": args.size}

    probes = {}
    if "compile" in args.figures:
        for name in ("cold", "warm"):
            print(f"compile probe, {name} persistent cache ({cache}) ...", flush=True)
            probes[name] = runner.run("sd_jax", kind="probe", configs=[configs[0]], **common_job)
            p = probes[name]
            print(f"    first sampler call {p['first_call']:.2f} s, steady 1-step call {p['steady_step']:.2f} s, "
                  f"process start -> first step {p['events']['first_step']:.2f} s, "
                  f"peak RSS {p['peak_rss_gib']:.1f} GiB", flush=True)

    rounds = {"sd_jax": [], "diffusers": []}
    for r in range(args.repeats):
        for impl in ("sd_jax", "diffusers"):
            print(f"round {r + 1}/{args.repeats}: {impl} (free memory {available_gib():.1f} GiB) ...", flush=True)
            rounds[impl].append(runner.run(
                impl, kind="round", configs=configs, round=r, first_image=(r == 0 and "compile" in args.figures),
                save_images=str(tmp / f"{impl}_images.npy") if r == 0 else None, **common_job))

    # ------------------------------------------------------------------ report
    def med(impl, config):
        xs = [res["timings"][key(config)] for res in rounds[impl]]
        return median(xs), xs

    rows, samples = [], []
    img = f"{args.size}x{args.size}"
    if "image" in args.figures:
        for config in configs[:2]:
            (a, xa), (b, xb) = med("sd_jax", config), med("diffusers", config)
            rows.append((f"image {img}, {SOLVERS[config[0]]} {config[1]} steps, CFG {GUIDANCE}: s/image",
                         fmt_s(a), fmt_s(b), ratio(a, b)))
            samples.append(f"{key(config)}: sd_jax {[round(x, 2) for x in xa]}, diffusers {[round(x, 2) for x in xb]}")
    if "compile" in args.figures:
        cold, warm = probes["cold"], probes["warm"]
        d0, j0 = rounds["diffusers"][0]["events"], rounds["sd_jax"][0]["events"]
        rows += [
            (f"sampler first call, new {img} shape, fresh cache (compile + 1 UNet call)",
             fmt_s(cold["first_call"]), "- (eager)", "-"),
            ("sampler compile (first call - steady 1-call run)",
             fmt_s(cold["first_call"] - cold["steady_step"]), "- (eager)", "-"),
            ("2nd process: sampler first call with the persistent cache",
             fmt_s(warm["first_call"]), "- (eager)", "-"),
            ("2nd process: start -> model loaded", fmt_s(warm["events"]["loaded"]),
             fmt_s(d0["loaded"]), ratio(warm["events"]["loaded"], d0["loaded"])),
            ("2nd process: start -> first denoising step", fmt_s(warm["events"]["first_step"]),
             fmt_s(d0.get("first_step")), ratio(warm["events"]["first_step"], d0.get("first_step"))),
            ("2nd process: start -> sampler ready (first step - steady 1-call run)",
             fmt_s(warm["events"]["first_step"] - warm["steady_step"]), "-", "-"),
            (f"2nd process: start -> first image (PNDM {args.steps})", fmt_s(j0.get("first_image")),
             fmt_s(d0.get("first_image")), ratio(j0.get("first_image"), d0.get("first_image"))),
        ]
        counts = [n for res in rounds["sd_jax"] for n in res["compiles"].values()]
        rows.append((("sampler compilations per shape over calls changing guidance (3, per-image 2..9, 7.5) "
                      "and seed"), f"{max(counts)} (max over {len(counts)} process x shape)", "-", "-"))
    if "throughput" in args.figures:
        for b in args.batches:
            config = ("pndm", tp_steps, b)
            (a, xa), (c, xc) = med("sd_jax", config), med("diffusers", config)
            rows.append((f"throughput batch {b}, {img}, PNDM {tp_steps} steps: images/s",
                         f"{b / a:.3g}", f"{b / c:.3g}", ratio(a, c)))
            if config not in configs[:2] or "image" not in args.figures:
                samples.append(f"{key(config)}: sd_jax {[round(x, 2) for x in xa]}, "
                               f"diffusers {[round(x, 2) for x in xc]}")
    rss_j = max(res["peak_rss_gib"] for res in rounds["sd_jax"])
    rss_d = max(res["peak_rss_gib"] for res in rounds["diffusers"])
    rows.append(("peak RSS, timing-round process (max over rounds)", f"{rss_j:.2f} GiB", f"{rss_d:.2f} GiB",
                 ratio(rss_j, rss_d)))
    if probes:
        rows.append(("peak RSS, compile-probe process (cold / warm cache)",
                     f"{probes['cold']['peak_rss_gib']:.2f} / {probes['warm']['peak_rss_gib']:.2f} GiB", "-", "-"))

    import numpy as np

    diff = ""
    ours, ref = tmp / "sd_jax_images.npy", tmp / "diffusers_images.npy"
    if ours.exists() and ref.exists():
        a, b = np.load(ours).astype(np.int16), np.load(ref).astype(np.int16)
        diff = (f"max |sd_jax - diffusers| over the {key(configs[0])} image: {np.abs(a - b).max()}/255 "
                f"(mean {np.abs(a - b).mean():.2f}/255)")
    jinfo, dinfo = rounds["sd_jax"][0]["info"], rounds["diffusers"][0]["info"]
    not_finite = [k for res in rounds["sd_jax"] for k, ok in res["finite"].items() if not ok]

    print()
    print(f"machine: {machine()}; sd_jax XLA_FLAGS={jinfo['XLA_FLAGS']!r}, {jinfo['devices']} JAX device(s); "
          f"torch {dinfo['torch']} ({dinfo['threads']} threads), diffusers {dinfo['diffusers']}")
    print(f"settings: SD v1.4 architecture, random float32 weights ({folder}); prompt {PROMPT!r}, "
          f"empty negative prompt, CFG {GUIDANCE}, same NHWC/NCHW initial latents; --size {args.size} "
          f"--steps {args.steps} --dpm-steps {args.dpm_steps} --batches {' '.join(map(str, args.batches))} "
          f"--throughput-steps {tp_steps} --repeats {args.repeats} --figures {' '.join(args.figures)}; "
          f"one process per implementation per round, alternated sd_jax/diffusers, each config warmed up "
          f"then timed once per round; medians over {args.repeats} round(s); ratio = sd_jax time / diffusers "
          f"time (< 1: sd_jax faster; for images/s rows diffusers/sd_jax images/s); '2nd process' rows: "
          f"sd_jax in a process reusing the persistent compilation cache the first probe process filled, "
          f"diffusers in a fresh process (nothing to cache); "
          f"total bench wall time {(time.time() - started) / 60:.1f} min")
    if probes:
        for name, p in probes.items():
            ev = p["events"]
            print(f"sd_jax probe process, {name} cache: start -> imports {ev['imported']:.2f} s -> model loaded "
                  f"{ev['loaded']:.2f} s -> first step {ev['first_step']:.2f} s (sampler call {p['first_call']:.2f} s, "
                  f"steady 1-call run {p['steady_step']:.2f} s)")
        ev = rounds["diffusers"][0]["events"]
        print(f"diffusers fresh process: start -> imports {ev['imported']:.2f} s -> model loaded {ev['loaded']:.2f} s "
              f"-> first step {ev['first_step']:.2f} s -> first image {ev['first_image']:.2f} s")
    if samples:
        print("samples (s): " + "; ".join(samples))
    if diff:
        print(diff)
    if not_finite:
        print(f"WARNING: sd_jax produced non-finite images for {sorted(set(not_finite))}")
    print()
    print(table(rows, header=("figure", "sd_jax", "diffusers", "ratio")))
    if args.keep_cache:
        print(f"\npersistent compilation cache kept in {cache}")
        for p in tmp.glob("*.json"):
            p.unlink()
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
