"""AUTOMATIC1111 prompt syntax: per-token weights and prompts longer than 77 tokens.

``prompt_syntax="a1111"`` (the default of :meth:`StableDiffusion.generate` and
``generate.py``; ``"plain"`` / ``--plain-prompts`` take the text literally and
truncate it to 77 tokens) reads a prompt as AUTOMATIC1111's webui does
(``modules/prompt_parser.py`` and ``modules/sd_hijack_clip.py``), in three steps:

1. :func:`parse_attention`: the text -> ``[(fragment, weight), ...]``.
   ``(a)`` multiplies the weight of ``a`` by 1.1, ``[a]`` divides it by 1.1,
   ``(a:1.3)`` multiplies it by 1.3; brackets nest and multiply. ``\\(``, ``\\)``,
   ``\\[``, ``\\]`` and ``\\\\`` are the literal characters. An opening bracket
   never closed applies to the rest of the prompt; a closing bracket never opened
   is text. ``BREAK`` (upper case, a word of its own, outside brackets) ends the
   chunk. Neighbouring fragments of equal weight are joined.
2. :func:`chunk_tokens`: each fragment is tokenized on its own; tokens go into
   chunks of 75, each chunk framed as ``[BOS, 75 tokens, EOS]`` (77) and padded
   with EOS, every token carrying its fragment's weight (1.0 for BOS, EOS and
   padding). When a chunk is full and a comma lies within its last 20 tokens,
   the tokens after that comma move to the next chunk (A1111's
   ``comma_padding_backtrack``). A textual-inversion embedding's vectors are
   never split across two chunks.
3. :func:`apply_weights`: each chunk goes through the text encoder on its own;
   its hidden states are multiplied per token by the weights and rescaled so
   their mean is the unweighted mean (A1111's "Original" emphasis); the chunks
   are concatenated along the sequence: ``(B, chunks * 77, width)``.

In a batch, every prompt and negative prompt is padded to the largest chunk
count with empty chunks (``[BOS, EOS x 76]``, all weights 1), as A1111 pads the
negative prompt. The chunk count is part of the compiled shape (the UNet's
cross-attention takes any sequence length); the weights are traced values.

One deliberate difference: A1111 restores the mean over the whole batch of a
chunk (so a prompt's conditioning depends on what else is in the batch); here it
is restored per prompt and chunk, so an image does not depend on its batch
neighbours. For a batch of one prompt (A1111's usual case) the two are equal.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

PROMPT_SYNTAXES = ("a1111", "plain")
DEFAULT_SYNTAX = "a1111"
ROUND_MULTIPLIER = 1.1         # (text)
SQUARE_MULTIPLIER = 1 / 1.1    # [text]
CHUNK_TOKENS = 75              # prompt tokens per chunk; +BOS +EOS = 77 text-encoder positions
COMMA_BACKTRACK = 20           # A1111's comma_padding_backtrack default
MAX_CHUNKS = 32                # 2,400 prompt tokens: more is refused (each chunk is 77 keys of every cross-attention)
BREAK = "BREAK"
_BREAK_WEIGHT = -1.0           # A1111 marks BREAK as the fragment ("BREAK", -1)

# One token of the bracket language per match: escapes, brackets, ":weight)", plain text, a lone ':'.
_TOKEN = re.compile(r"""
    \\[()\[\]\\]          # an escaped bracket or backslash
  | \\                    # a lone backslash
  | [(\[]                 # an opening bracket
  | :([+-]?[.\d]+)\)      # ':1.3)' closes a round bracket with an explicit weight
  | [)\]]                 # a closing bracket
  | [^\\()\[\]:]+         # text
  | :                     # a colon that is not a weight
""", re.X)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A prompt -> ``[(fragment, weight), ...]`` as A1111's ``parse_prompt_attention``.

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    A ``BREAK`` is the fragment ``("BREAK", -1.0)``. An empty prompt is ``[("", 1.0)]``.
    """
    segments: list[list[Any]] = []   # [fragment, weight], weights multiplied in place as brackets close
    open_round: list[int] = []       # index into segments where each open "(" starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for seg in segments[start:]:
            seg[1] *= factor

    for match in _TOKEN.finditer(text):
        piece, explicit = match.group(0), match.group(1)
        if piece.startswith("\\"):
            segments.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(segments))
        elif piece == "[":
            open_square.append(len(segments))
        elif explicit is not None and open_round and _is_float(explicit):
            scale(open_round.pop(), float(explicit))
        elif piece == ")" and open_round:
            scale(open_round.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and open_square:
            scale(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, a stray closing bracket, a lone ':' or an unmatched ':w)'
            for i, part in enumerate(_BREAK_SPLIT.split(piece)):
                if i:
                    segments.append([BREAK, _BREAK_WEIGHT])
                segments.append([part, 1.0])
    for start in open_round:          # brackets never closed reach to the end
        scale(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale(start, SQUARE_MULTIPLIER)
    if not segments:
        return [("", 1.0)]
    merged = [segments[0]]
    for seg in segments[1:]:
        if seg[1] == merged[-1][1]:
            merged[-1] = [merged[-1][0] + seg[0], seg[1]]
        else:
            merged.append(seg)
    return [(t, float(w)) for t, w in merged]


def _is_float(text: str) -> bool:
    """'1.3' yes; '.', '1.2.3' no (A1111 would raise on those; here they stay text)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Chunks:
    """A prompt as text-encoder chunks: ``ids`` (chunks, 77) int32 and ``weights`` (chunks, 77) float32."""

    ids: np.ndarray
    weights: np.ndarray
    token_count: int   # prompt tokens (as A1111 counts them: full chunks count 75)

    @property
    def count(self) -> int:
        return self.ids.shape[0]


def chunk_tokens(fragments: Sequence[tuple[str, float]], token_ids: Sequence[Sequence[int]], *, bos: int, eos: int,
                 pad: int, comma: int | None, expansions: dict[int, tuple[int, ...]] | None = None,
                 backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """Weighted fragments and their token ids -> :class:`Chunks`, as A1111's ``tokenize_line``.

    ``expansions``: token id -> the ids of its embedding's vectors (a textual-inversion
    token), kept in one chunk. ``pad``: the id after the first EOS (SD 2.x pads with '!').
    """
    expansions = expansions or {}
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    token_count = 0

    def close(is_last: bool = False) -> None:
        nonlocal tokens, weights, last_comma, token_count
        token_count += len(tokens) if is_last else CHUNK_TOKENS
        fill = CHUNK_TOKENS - len(tokens)
        row = [bos, *tokens, *[eos] * fill, eos]
        row = row[:row.index(eos) + 1] + [pad] * (len(row) - row.index(eos) - 1)  # A1111: pad after the first EOS
        chunks.append((row, [1.0, *weights, *[1.0] * fill, 1.0]))
        tokens, weights, last_comma = [], [], -1

    for (text, weight), ids in zip(fragments, token_ids):
        if text == BREAK and weight == _BREAK_WEIGHT:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif (backtrack and len(tokens) == CHUNK_TOKENS and last_comma != -1
                  and len(tokens) - last_comma <= backtrack):
                cut = last_comma + 1  # what follows the comma moves on to the next chunk
                moved, moved_w = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved, moved_w
            if len(tokens) == CHUNK_TOKENS:
                close()
            vectors = expansions.get(token, (token,))
            if len(tokens) + len(vectors) > CHUNK_TOKENS:
                close()
            tokens += vectors
            weights += [weight] * len(vectors)
    if tokens or not chunks:
        close(is_last=True)
    ids = np.asarray([c[0] for c in chunks], np.int32)
    return Chunks(ids=ids, weights=np.asarray([c[1] for c in chunks], np.float32), token_count=token_count)


def empty_chunk(bos: int, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunk that pads a shorter prompt: ``[BOS, EOS, pad x 75]``, all weights 1 (A1111's ``empty_chunk``)."""
    ids = np.full(CHUNK_TOKENS + 2, pad, np.int32)
    ids[:2] = bos, eos
    return ids, np.ones(CHUNK_TOKENS + 2, np.float32)


def pad_chunks(prompts: Sequence[Chunks], count: int, bos: int, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts' chunks padded with empty chunks to ``count`` -> ids (B, count, 77), weights (B, count, 77)."""
    blank_ids, blank_w = empty_chunk(bos, eos, pad)
    ids = np.broadcast_to(blank_ids, (len(prompts), count, CHUNK_TOKENS + 2)).copy()
    weights = np.broadcast_to(blank_w, ids.shape).copy()
    for b, chunks in enumerate(prompts):
        ids[b, :chunks.count], weights[b, :chunks.count] = chunks.ids, chunks.weights
    return ids, weights


def apply_weights(z: Any, weights: Any) -> Any:
    """Hidden states (N, 77, C) times per-token weights (N, 77), each row's mean restored (A1111's emphasis).

    ``z * w``, then ``* mean(z) / mean(z * w)`` with the means over each row's (77, C) values.
    """
    import jax.numpy as jnp

    dtype, z = z.dtype, z.astype(jnp.float32)
    original = z.mean(axis=(1, 2), keepdims=True)
    weighted = z * weights[..., None].astype(jnp.float32)
    return (weighted * (original / weighted.mean(axis=(1, 2), keepdims=True))).astype(dtype)


def check_syntax(syntax: str) -> str:
    """A prompt syntax name, or a ValueError naming the valid ones."""
    if syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax {str(syntax)[:40]!r} must be one of {', '.join(PROMPT_SYNTAXES)}")
    return syntax
