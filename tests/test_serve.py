"""sd_jax.serve through real HTTP clients: webuiapi (AUTOMATIC1111's), openai, and raw HTTP.

ONE server process per module (it compiles one batch size, 8, at 64x64 "Euler a" while
starting: every batch is padded to 8); the SIGTERM test runs last and ends it. The batcher's
policies (fairness, splitting, cancelling, failure isolation) are tested directly with a fake
sampler, in milliseconds.
"""

import base64
import concurrent.futures
import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_jax.request import GenerationRequest

REPO = Path(__file__).resolve().parents[1]
SIZE, STEPS = 64, 3
KEY, USER, PASSWORD = "test-key", "alice", "s3cret"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``python -m sd_jax.serve`` and raw HTTP helpers."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    def request(self, method: str, path: str, body=None, headers=None, auth=True, timeout=300):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {KEY}"} if auth else {}),
                **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        return resp.status, payload, {k.lower(): v for k, v in resp.getheaders()}

    def metric(self, name: str) -> float:
        _, text, _ = self.request("GET", "/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#") and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def webui(self):
        import webuiapi

        return webuiapi.WebUIApi(host="127.0.0.1", port=self.port, username=USER, password=PASSWORD)


def _start(args, env=None, log=None):
    return subprocess.Popen([sys.executable, "-m", "sd_jax.serve", *args], cwd=REPO, env=env,
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w")
    proc = _start(["--model", str(tiny_folder), "--port", str(port), "--devices", "1", "--max-batch", "8",
                   "--batch-sizes", "8", "--warmup", f"{SIZE}x{SIZE}:euler_a", "--max-wait-ms", "1500",
                   "--queue-size", "16", "--max-images", "16", "--max-body-mb", "1", "--api-key", KEY,
                   "--api-auth", f"{USER}:{PASSWORD}", "--timeout-s", "300"], log=log)
    srv = Server(proc, port, log_path)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if srv.request("GET", "/health", auth=False, timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the server did not become healthy: {log_path.read_text()[-3000:]}")
    yield srv
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.float32) / 255.0


def _txt2img(prompt, seed, **extra):
    return {"prompt": prompt, "seed": seed, "steps": STEPS, "width": SIZE, "height": SIZE, "sampler_name": "Euler a",
            **extra}


# ----------------------------------------------------------------------------- catalog and health


def test_health_catalog_and_auth(server):
    status, body, _ = server.request("GET", "/health", auth=False)
    assert (status, body["status"]) == (200, "ready")
    status, samplers, _ = server.request("GET", "/sdapi/v1/samplers")
    names = [s["name"] for s in samplers]
    assert status == 200 and {"Euler a", "Euler", "LMS", "DDIM", "PLMS", "DPM++ 2M", "DPM++ 2M Karras"} <= set(names)
    status, models, _ = server.request("GET", "/sdapi/v1/sd-models")
    assert status == 200 and models[0]["model_name"]
    status, progress, _ = server.request("GET", "/sdapi/v1/progress")
    assert status == 200 and {"progress", "eta_relative", "state"} <= set(progress)
    # 401 without or with wrong credentials (Bearer key; HTTP Basic as A1111's --api-auth)
    assert server.request("GET", "/sdapi/v1/samplers", auth=False)[0] == 401
    assert server.request("GET", "/sdapi/v1/samplers", headers={"Authorization": "Bearer nope"})[0] == 401
    wrong = "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode()
    assert server.request("GET", "/sdapi/v1/samplers", auth=False, headers={"Authorization": wrong})[0] == 401
    status, _, headers = server.request("POST", "/sdapi/v1/txt2img", _txt2img("x", 1), auth=False)
    assert status == 401 and "www-authenticate" in headers
    assert server.request("GET", "/sdapi/v1/samplers", auth=False, headers={"Authorization": BASIC})[0] == 200


# ----------------------------------------------------------------------------- the A1111 client


def test_webuiapi_txt2img_with_its_defaults(server):
    """webuiapi's own defaults (eta 1.0 with Euler a, enable_hr false, denoising_strength 0.7, scheduler
    'automatic', ...) are accepted; info is A1111's JSON: seed + i per image, prompts, infotexts."""
    api = server.webui()
    result = api.txt2img(prompt="a red cube", negative_prompt="blurry", seed=1234, steps=STEPS, width=SIZE,
                         height=SIZE, batch_size=2, n_iter=1, cfg_scale=6.5)
    assert len(result.images) == 2 and result.images[0].size == (SIZE, SIZE)
    info = result.info
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["all_prompts"] == ["a red cube"] * 2 and info["all_negative_prompts"] == ["blurry"] * 2
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (SIZE, SIZE, STEPS, 6.5)
    assert info["sampler_name"] == "Euler a" and info["batch_size"] == 2
    assert "Seed: 1235" in info["infotexts"][1] and info["infotexts"][0].startswith("a red cube\nNegative prompt:")
    assert result.parameters["prompt"] == "a red cube"
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_webuiapi_img2img(server):
    api = server.webui()
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    out = api.img2img(images=[init], prompt="a blue sphere", seed=77, steps=STEPS, width=SIZE, height=SIZE,
                      denoising_strength=0.5)
    assert len(out.images) == 1 and out.images[0].size == (SIZE, SIZE)
    assert out.info["all_seeds"] == [77] and out.info["denoising_strength"] == 0.5
    txt = api.txt2img(prompt="a blue sphere", seed=77, steps=STEPS, width=SIZE, height=SIZE)
    assert np.abs(np.asarray(out.images[0], float) - np.asarray(txt.images[0], float)).mean() > 2


def test_img2img_mask_options_we_do_not_implement_are_422(server):
    init = base64.b64encode(Image.new("RGB", (SIZE, SIZE), (200, 10, 10))._repr_png_()).decode()
    mask = base64.b64encode(Image.new("L", (SIZE, SIZE), 255)._repr_png_()).decode()
    body = {**_txt2img("x", 1), "init_images": [init], "mask": mask}
    status, answer, _ = server.request("POST", "/sdapi/v1/img2img", {**body, "inpaint_full_res": True})
    assert status == 422 and answer["field"] == "inpaint_full_res"
    status, answer, _ = server.request("POST", "/sdapi/v1/img2img", {**body, "inpaint_full_res": False,
                                                                     "inpainting_fill": 0})
    assert status == 422 and answer["field"] == "inpainting_fill"
    status, answer, _ = server.request("POST", "/sdapi/v1/img2img", {**body, "init_images": [init] * 3,
                                                                     "batch_size": 2})
    assert status == 422 and answer["field"] == "init_images"


@pytest.mark.slow  # compiles the masked ("blend") sampling loop: a minute on a loaded CPU
def test_webuiapi_inpainting_keeps_the_unmasked_area(server):
    api = server.webui()
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255  # repaint the right half
    out = api.img2img(images=[init], mask_image=Image.fromarray(mask), prompt="a wall", seed=5, steps=STEPS,
                      width=SIZE, height=SIZE, denoising_strength=1.0, inpainting_fill=1, inpaint_full_res=False,
                      mask_blur=0)
    got, want = np.asarray(out.images[0], np.float32), np.asarray(init, np.float32)
    assert np.abs(got[:, : SIZE // 2] - want[:, : SIZE // 2]).max() <= 1  # A1111's overlay: the init image kept
    assert np.abs(got[:, SIZE // 2:] - want[:, SIZE // 2:]).mean() > 10


# ----------------------------------------------------------------------------- batching


def test_concurrent_requests_share_batches_and_match_generate(server, tiny_pipe):
    """8 concurrent single-image requests run in at most 2 batches; an image made in a batch equals the same
    request sent alone and StableDiffusion.generate (batch 1) with the same arguments, within 1/255."""
    batches = server.metric("sd_jax_serve_batches_total")
    bodies = [_txt2img(f"prompt number {i}", 100 + i, cfg_scale=5.0 + i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: server.request("POST", "/sdapi/v1/txt2img", b), bodies))
    assert [a[0] for a in answers] == [200] * 8, [a[1] for a in answers if a[0] != 200]
    ran = server.metric("sd_jax_serve_batches_total") - batches
    assert 1 <= ran <= 2, f"8 concurrent requests ran in {ran} batches"
    batched = _png(answers[3][1]["images"][0])
    status, alone, _ = server.request("POST", "/sdapi/v1/txt2img", bodies[3])
    assert status == 200
    alone = _png(alone["images"][0])
    assert np.abs(batched - alone).max() <= 1 / 255 + 1e-6
    import jax

    ref = tiny_pipe.generate("prompt number 3", seed=103, num_inference_steps=STEPS, guidance_scale=8.0,
                             scheduler="euler_a", height=SIZE, width=SIZE, devices=jax.devices()[:1])
    ref_png = np.asarray(ref.images[0], np.float32) / 255.0
    # PNGs are 8-bit: the same float image rounds to the same bytes unless XLA's batch-size-dependent
    # summation order moves a value across a rounding edge (at most one level).
    assert np.abs(batched - ref_png).max() <= 1 / 255 + 1e-6
    assert np.abs(batched - _png(answers[4][1]["images"][0])).max() > 0.05  # other prompt/seed: another image


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY)
    out = client.images.generate(prompt="a green cone", n=2, size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                 extra_body={"steps": STEPS, "sampler": "Euler a", "seed": 9})
    assert len(out.data) == 2 and out.created > 0
    images = [_png(d.b64_json) for d in out.data]
    assert images[0].shape == (SIZE, SIZE, 3) and np.abs(images[0] - images[1]).max() > 0.05
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="x", size="64x60", extra_body={"steps": STEPS})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong").images.generate(prompt="x")


# ----------------------------------------------------------------------------- bad input and load


@pytest.mark.parametrize("body, field, words", [
    (b'{"prompt": "x",', "body", "not valid JSON"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": "x", "steps": "many"}, "steps", "must be an integer"),
    ({"prompt": "x", "steps": 0}, "steps", "[1, 1000]"),
    ({"prompt": "x", "width": 60}, "width", "multiple of 8"),
    ({"prompt": "x", "cfg_scale": -1}, "cfg_scale", "[0, 100]"),
    ({"prompt": "x", "sampler_name": "Heun"}, "sampler_name", "DPM++ 2M Karras"),
    ({"prompt": "x", "sampler_name": "Euler", "scheduler": "Karras"}, "scheduler", "Karras"),
    ({"prompt": "x", "enable_hr": True}, "enable_hr", "not supported"),
    ({"prompt": "x", "restore_faces": True}, "restore_faces", "not supported"),
    ({"prompt": "x", "sampler_name": "Euler a", "eta": 0.5}, "eta", "eta 1"),
    ({"prompt": "x", "samplr": "Euler"}, "samplr", "not a field"),
    ({"prompt": "x", "batch_size": 9, "n_iter": 2}, "n_iter", "at most 16"),
    ({"prompt": "x", "seed": 2 ** 40}, "seed", "integer"),
    ({"prompt": "x", "override_settings": {"sd_vae": "x"}}, "override_settings.sd_vae", "not supported"),
])
def test_a1111_bad_fields_are_422_naming_the_field(server, body, field, words):
    status, answer, _ = server.request("POST", "/sdapi/v1/txt2img", body)
    assert status == 422 and answer["field"] == field and words in answer["detail"], answer


def test_bad_images_size_limit_and_service_survives(server):
    status, answer, _ = server.request("POST", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["bm90IGFu"]})
    assert status == 422 and answer["field"] == "init_images[0]"
    # 413: declared too large (nothing read) and actually too large (counted as it arrives)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/sdapi/v1/txt2img")
    for k, v in {"Authorization": f"Bearer {KEY}", "Content-Length": str(10 ** 9)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    assert server.request("POST", "/sdapi/v1/txt2img", big)[0] == 413
    assert server.request("POST", "/v1/images/generations", {"prompt": "x", "quality": "hd"})[0] == 400
    status, answer, _ = server.request("POST", "/sdapi/v1/txt2img", _txt2img("still fine", 5))
    assert status == 200 and len(answer["images"]) == 1


def test_queue_full_is_429_with_retry_after(server):
    first = concurrent.futures.ThreadPoolExecutor(1).submit(
        server.request, "POST", "/sdapi/v1/txt2img", _txt2img("fill", 1, batch_size=16, steps=80))
    time.sleep(0.5)  # the first 8 images run (80 steps: seconds), 8 wait: 16 more do not fit the queue of 16
    status, answer, headers = server.request("POST", "/sdapi/v1/txt2img", _txt2img("more", 2, batch_size=16))
    assert status == 429 and int(headers["retry-after"]) >= 1, answer
    assert first.result()[0] == 200


def test_client_that_leaves_is_dropped_from_the_queue(server):
    dropped = server.metric("sd_jax_serve_dropped_requests_total")
    images = server.metric("sd_jax_serve_images_total")
    busy = concurrent.futures.ThreadPoolExecutor(1).submit(
        server.request, "POST", "/sdapi/v1/txt2img", _txt2img("busy", 3, steps=60))
    time.sleep(2.0)  # that batch (60 steps) runs; the next request waits behind it
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
    conn.request("POST", "/sdapi/v1/txt2img", body=json.dumps(_txt2img("leaves", 4, steps=4)),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(OSError):
        conn.getresponse()
    conn.close()
    assert busy.result()[0] == 200
    deadline = time.monotonic() + 30
    while server.metric("sd_jax_serve_dropped_requests_total") == dropped and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("sd_jax_serve_dropped_requests_total") == dropped + 1
    assert server.metric("sd_jax_serve_images_total") == images + 1  # only "busy" was made


@pytest.mark.slow
def test_soak_500_mixed_requests(server):
    """500 mixed requests (txt2img, img2img, OpenAI, bad ones): no error, resident memory growth < 10 %."""

    def rss_kb():
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    init = base64.b64encode(Image.new("RGB", (SIZE, SIZE), (120, 30, 200))._repr_png_()).decode()
    kinds = [
        lambda i: ("/sdapi/v1/txt2img", _txt2img(f"soak {i}", i), 200),
        lambda i: ("/sdapi/v1/img2img", {**_txt2img(f"soak {i}", i), "init_images": [init],
                                         "denoising_strength": 0.6}, 200),
        lambda i: ("/v1/images/generations", {"prompt": f"soak {i}", "size": f"{SIZE}x{SIZE}", "steps": STEPS,
                                              "sampler": "Euler a", "seed": i}, 200),
        lambda i: ("/sdapi/v1/txt2img", {"prompt": "x", "steps": -1}, 422),
    ]

    def one(i):
        path, body, expected = kinds[i % len(kinds)](i)
        for _ in range(50):
            status, answer, headers = server.request("POST", path, body)
            if status != 429:
                break
            time.sleep(float(headers.get("retry-after", 1)))
        assert status == expected, (path, status, answer)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(100)))  # warm: every shape compiled, allocator settled
        before = rss_kb()
        list(pool.map(one, range(100, 500)))
    after = rss_kb()
    assert after < before * 1.10, f"resident memory grew from {before} kB to {after} kB"


def test_sigterm_drains_then_exits_0(server):
    """SIGTERM: /health and new work get 503, queued and running requests finish (200), exit status 0."""
    bodies = [_txt2img(f"drain {i}", i, steps=30 + i) for i in range(3)]  # different step counts: 3 batches
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = [pool.submit(server.request, "POST", "/sdapi/v1/txt2img", b) for b in bodies]
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.request("GET", "/health", auth=False)[0] == 503
        assert server.request("POST", "/sdapi/v1/txt2img", _txt2img("late", 1))[0] == 503
        assert [f.result()[0] for f in running] == [200] * 3
    assert server.proc.wait(timeout=60) == 0


def test_non_loopback_without_auth_refuses_to_start(tiny_folder):
    proc = _start(["--model", str(tiny_folder), "--host", "0.0.0.0", "--port", str(_free_port())])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--api-key" in out and "--insecure-no-auth" in out and "Traceback" not in out


# ----------------------------------------------------------------------------- the batcher alone


class _Result:
    def __init__(self, req):
        self.array = np.asarray(req.seeds, np.float32)[:, None, None, None] * np.ones((1, 1, 1, 3), np.float32)
        self.nsfw = None
        self.scheduler = req.scheduler or "pndm"


def _fake_batcher(**kw):
    from sd_jax.serve.batcher import Batcher

    calls = []
    gate = threading.Event()

    def run(req, progress):
        gate.wait(5)
        if any(p == "boom" for p in req.prompts):
            raise ValueError("bad image")
        calls.append((req.steps, req.total, req.batch_size))
        return _Result(req)

    batcher = Batcher(run, max_batch=kw.get("max_batch", 4), max_wait_s=kw.get("wait", 0.05), queue_size=64,
                      sizes=kw.get("sizes"))
    batcher.accept(True)
    return batcher, calls, gate


def _req(prompt, seed, steps=2, n=1):
    return GenerationRequest.build(prompt, num_inference_steps=steps, seed=seed, num_images_per_prompt=n,
                                   height=16, width=16)


def test_batcher_groups_splits_and_takes_turns():
    batcher, calls, gate = _fake_batcher()
    jobs = [batcher.submit(_req("a", 10, steps=2, n=6), 30), batcher.submit(_req("b", 20, steps=3), 30),
            batcher.submit(_req("c", 30, steps=2), 30)]
    gate.set()
    results = [j.future.result(10) for j in jobs]
    # 6 + 1 images of steps 2 (max 4 a batch) and 1 of steps 3: the steps-3 job runs after ONE batch, not two
    assert calls[0] == (2, 4, 4) and calls[1][0] == 3 and calls[2] == (2, 3, 4)
    assert [float(v) for v in results[0].array[:, 0, 0, 0]] == [10, 11, 12, 13, 14, 15]
    assert float(results[2].array[0, 0, 0, 0]) == 30
    batcher.stop(5)


def test_batcher_bad_request_fails_alone_and_cancel_drops():
    from sd_jax.serve.batcher import JobCancelled

    batcher, calls, gate = _fake_batcher(wait=0.2)
    good, bad, gone = (batcher.submit(_req("fine", 1), 30), batcher.submit(_req("boom", 2), 30),
                       batcher.submit(_req("gone", 3), 30))
    batcher.cancel(gone, "disconnected")
    assert batcher.queued == 2
    gate.set()
    assert float(good.future.result(10).array[0, 0, 0, 0]) == 1
    with pytest.raises(ValueError, match="bad image"):
        bad.future.result(10)
    with pytest.raises(JobCancelled):
        gone.future.result(10)
    assert all(total == 1 for _, total, _ in calls[-1:])  # the batch was rerun job by job
    batcher.stop(5)


def test_batcher_times_out_queued_jobs():
    from sd_jax.serve.batcher import JobCancelled

    batcher, calls, gate = _fake_batcher(wait=0.0)
    first = batcher.submit(_req("first", 1), 30)
    time.sleep(0.2)  # running, held by the gate
    late = batcher.submit(_req("late", 2, steps=3), 0.05)
    time.sleep(0.2)
    gate.set()
    assert float(first.future.result(10).array[0, 0, 0, 0]) == 1
    with pytest.raises(JobCancelled, match="timed out"):
        late.future.result(10)
    assert batcher.queued == 0 and len(calls) == 1
    batcher.stop(5)


def test_batcher_buckets():
    from sd_jax.serve.batcher import bucket_for, buckets

    assert buckets(8) == (1, 2, 4, 8) and buckets(6, 4) == (4, 8) and buckets(8, 8) == (8,)
    assert bucket_for(3, (1, 8)) == 8
    with pytest.raises(ValueError):
        bucket_for(9, (1, 8))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))


# ----------------------------------------------------------------------------- mapping and configuration


@pytest.mark.parametrize("sampler, schedule, solver", [
    ("DPM++ 2M", None, "dpm++2m"),                 # a client older than A1111 1.9: the name says it all
    ("DPM++ 2M Karras", None, "dpm++2m-karras"),
    ("DPM++ 2M", "automatic", "dpm++2m-karras"),   # A1111 1.9+: "Automatic" is DPM++ 2M's own, Karras
    ("DPM++ 2M", "Uniform", "dpm++2m"),
    ("DPM++ 2M", "Karras", "dpm++2m-karras"),
    ("Euler a", "automatic", "euler_a"),
    ("DDIM", "Karras", "ddim"),                    # A1111's timestep samplers take no schedule
    ("euler", None, "euler"),
])
def test_a1111_sampler_and_schedule(sampler, schedule, solver):
    from sd_jax.serve.a1111 import resolve_sampler

    body = {"sampler_name": sampler, **({"scheduler": schedule} if schedule else {})}
    assert resolve_sampler(body)[0] == solver


def test_serve_config_errors_name_the_flag():
    from sd_jax.serve.app import ServeConfig

    for kwargs, words in [({"host": "0.0.0.0"}, "--insecure-no-auth"), ({"max_batch": 0}, "--max-batch"),
                          ({"api_auth": "alice"}, "--api-auth"), ({"warmup": ("64y64",)}, "--warmup"),
                          ({"queue_size": 4}, "--queue-size"), ({"batch_sizes": (1, 4)}, "--batch-sizes")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            ServeConfig(model="m", **kwargs)
    assert ServeConfig(model="m", host="0.0.0.0", api_key="k").host == "0.0.0.0"
