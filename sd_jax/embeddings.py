"""Textual-inversion embeddings: AUTOMATIC1111 and diffusers files, loaded as new tokens of the text encoder.

    pipe.load_embedding("embeddings/my-style.pt")                 # prompt token "my-style" (the file stem)
    pipe.load_embedding("learned_embeds.safetensors")             # its key, e.g. "<cat-toy>"
    pipe.load_embedding("bad-hands.safetensors", token="bad_hands")
    pipe("a portrait, my-style", negative_prompt="bad_hands")

Formats (:func:`read_embedding`):

* AUTOMATIC1111 ``.pt``: a pickle ``{"string_to_param": {"*": tensor (n, width)}, "name", "step", ...}``,
  read with sd_jax's restricted unpickler (nothing in the file runs); token: the file stem, as A1111.
* AUTOMATIC1111 ``.safetensors``: one tensor ``emb_params`` or ``string_to_param.*``; token: the file stem.
* diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: tensor (width,) or (n, width)}``; token: the key.

An embedding of n vectors becomes the token plus placeholders ``token_1`` .. ``token_{n-1}``
(diffusers' names) in the tokenizer, and n new rows of the text encoder's token-embedding
table; the token in a prompt stands for its n vectors, with the weight of its fragment in the
A1111 syntax and never split across 75-token chunks. The table's new size recompiles the text
encoder once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from sd_jax.limits import short, short_path

MAX_EMBEDDING_BYTES = 64 << 20   # a 75-vector 1024-wide float32 embedding is 300 KB
MAX_VECTORS = 75                 # one A1111 chunk
A1111_KEYS = ("emb_params", "string_to_param.*")
SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One embedding file: the token it is written as by default and its vectors (n, width) float32."""

    token: str
    vectors: np.ndarray
    path: str
    sha256: str

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's short hash of an embedding file (the first 12 hex digits of its SHA-256)."""
        return self.sha256[:12]


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """Read an embedding file (see the module docstring for the formats); ``token`` overrides its default."""
    path = Path(path).expanduser()
    name = short(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"embedding {name} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"embedding {name}: unknown file type {short(path.suffix)}; expected one of "
                         f"{', '.join(SUFFIXES)}")
    size = path.stat().st_size
    if size > MAX_EMBEDDING_BYTES:
        raise ValueError(f"embedding {name} is {size / 2**20:.0f} MiB; an embedding file is at most "
                         f"{MAX_EMBEDDING_BYTES >> 20} MiB (is it a model or a LoRA?)")
    if path.suffix.lower() == ".safetensors":
        from sd_jax.convert.safetensors_io import load_safetensors

        data, _ = load_safetensors(path, copy=True)
    else:
        from sd_jax.convert.torch_pickle import load_torch_checkpoint

        data = load_torch_checkpoint(path, strict=True)
    default, tensor = _find_vectors(data, path)
    vectors = np.asarray(tensor)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise ValueError(f"embedding {name}: expected vectors of shape (n, width) with n in [1, {MAX_VECTORS}], "
                         f"got {tuple(vectors.shape)}")
    if not np.issubdtype(vectors.dtype, np.floating) and vectors.dtype.name != "bfloat16":
        raise ValueError(f"embedding {name}: vectors must be floating point, got {vectors.dtype}")
    vectors = vectors.astype(np.float32)
    if not np.isfinite(vectors).all():
        raise ValueError(f"embedding {name}: the vectors hold NaN or inf")
    return Embedding(token=token if token is not None else default, vectors=vectors, path=str(path),
                     sha256=_sha256(path))


def _find_vectors(data: Any, path: Path) -> tuple[str, Any]:
    """(default token, tensor) of a loaded file."""
    name = short(str(path))
    if not isinstance(data, dict) or not data:
        raise ValueError(f"embedding {name}: expected a dict of tensors, got {type(data).__name__}")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"embedding {name}: 'string_to_param' must hold exactly one tensor, got "
                             f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        return path.stem, next(iter(params.values()))
    tensors = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if "clip_l" in tensors and "clip_g" in tensors:
        raise ValueError(f"embedding {name} is an SDXL embedding (clip_l + clip_g); this is an SD 1.x/2.x model")
    if len(tensors) != 1:
        keys = ", ".join(short(k) for k in list(data)[:4])
        raise ValueError(f"embedding {name}: expected one tensor ({', '.join(A1111_KEYS)} or a token), found "
                         f"{len(tensors)} (keys: {keys}{', ...' if len(data) > 4 else ''})")
    key, tensor = next(iter(tensors.items()))
    return (path.stem if key in A1111_KEYS else key), tensor


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def add_embedding(pipe: Any, embedding: Embedding) -> list[int]:
    """Give ``pipe`` the embedding's token: tokenizer placeholders plus rows of the token-embedding table.

    Returns the token's ids. The text encoder's width is checked first (one line naming the file
    and both widths).
    """
    import jax.numpy as jnp

    width = pipe.text_encoder.config.hidden_size
    n, got = embedding.vectors.shape
    if got != width:
        raise ValueError(f"embedding {short_path(embedding.path)} has {got}-wide vectors but this model's text "
                         f"encoder is {width} wide (an embedding for {_family(got)} on {_family(width)})")
    ids = pipe.tokenizer.add_embedding_tokens(embedding.token, n)
    table_params = pipe.params["text_encoder"]["embeddings"]["token_embedding"]
    table = table_params["embedding"]  # (vocab, width)
    rows = max(table.shape[0], max(ids) + 1)
    if rows > table.shape[0]:
        table = jnp.concatenate([table, jnp.zeros((rows - table.shape[0], width), table.dtype)])
    table = table.at[jnp.asarray(ids)].set(jnp.asarray(embedding.vectors, table.dtype))
    config = pipe.text_encoder.config
    if config.vocab_size != rows:
        pipe.text_encoder = pipe.text_encoder.clone(config=dataclasses.replace(config, vocab_size=rows))
    text = pipe.params["text_encoder"]
    embeddings = {**text["embeddings"], "token_embedding": {**table_params, "embedding": table}}
    pipe.params = {**pipe.params, "text_encoder": {**text, "embeddings": embeddings}}  # a new tree, nothing mutated
    return ids


def _family(width: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"a {width}-wide text encoder")


def parse_embedding_arg(value: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:TOKEN`` (generate.py ``--embedding``) -> (file, token or None).

    A value that names an existing file is a file even if it holds ':'; a part after the last
    ':' that looks like a path (has '/' or '\\\\') belongs to the file.
    """
    if Path(value).expanduser().is_file() or ":" not in value:
        return value, None
    file, token = value.rsplit(":", 1)
    if not file or "/" in token or "\\" in token:
        return value, None
    return file, token or None
