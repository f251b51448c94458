"""``python -m sd_jax.serve``: an image service with dynamic batching across requests.

AUTOMATIC1111-compatible (``/sdapi/v1/txt2img``, ``img2img``, ``samplers``, ``sd-models``,
``progress``) and OpenAI-compatible (``/v1/images/generations``) JSON APIs, Prometheus
``/metrics`` and ``/health``. Concurrent requests that can share one compiled sampling call
are grouped into one :class:`~sd_jax.request.GenerationRequest` (:mod:`sd_jax.serve.batcher`)
and run through ``StableDiffusion.run``, the path every sd_jax caller uses.

Layout: ``__main__`` (command line), ``app`` (config, service, routes), ``batcher``,
``a1111`` / ``openai_api`` (the two APIs' fields), ``fields`` (typed field reading), ``metrics``.
Needs ``pip install 'sd_jax[serve]'`` (FastAPI, uvicorn, prometheus-client).
"""
