"""CLIP tokenizer: prompts -> fixed-length token ids, with a report of what was cut.

A thin wrapper around transformers' ``CLIPTokenizerFast`` (the tokenizers-
backed CLIP BPE; transformers 5 calls the same class ``CLIPTokenizer``). It is
loaded from a diffusers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``,
or ``tokenizer.json``), or, for checkpoints that carry no tokenizer (CompVis
single files), built offline from the packaged OpenAI BPE vocabulary
``sd_jax/assets/bpe_simple_vocab_16e6.txt.gz`` (see ``CLIP_VOCAB_README.md``),
which gives the ids of ``openai/clip-vit-large-patch14``.

SD v1.x pads with ``<|endoftext|>`` (49407); SD 2.x tokenizers pad with ``!``
(id 0): the pad token is whatever the folder says (``tokenizer_config.json``;
where ``special_tokens_map.json`` also names one, it wins, as in transformers).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PACKAGED_BPE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD_V1_MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges: lines 1..48894 of the packaged file
_HUGE_LENGTH = 10**6  # transformers' model_max_length when unset is ~1e30


@dataclasses.dataclass(frozen=True)
class TruncationInfo:
    """Whether a prompt was cut to fit, and the text that was dropped."""

    truncated: bool
    dropped_text: str = ""
    num_dropped_tokens: int = 0


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the 256 base symbols, in vocab order)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=2)
def clip_vocab_and_merges(path: str | os.PathLike = PACKAGED_BPE,
                          ) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Convert OpenAI's gzipped BPE file to HuggingFace's (vocab, merges) pair.

    Line 0 is a header, lines 1..48894 the merges; the vocabulary is the 256
    byte symbols, the same with ``</w>``, each merge joined, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
    """
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:NUM_MERGES + 1])
    bad = [m for m in merges if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ValueError(f"{path}: not a CLIP BPE vocabulary ({len(merges)} merges, "
                         f"{len(bad)} malformed, e.g. {bad[:1]})")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: the converted vocabulary has duplicate tokens")
    return vocab, merges


def write_vocab_files(folder: str | os.PathLike, vocab: dict[str, int],
                      merges: Sequence[Sequence[str]], pad_token: str = EOS_TOKEN,
                      max_length: int = SD_V1_MAX_LENGTH) -> None:
    """Write a diffusers/transformers ``tokenizer/`` folder: vocab, merges, configs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
               "pad_token": pad_token}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


class Tokenizer:
    """Fixed-length CLIP tokenization: ``tokenize(prompts) -> (ids (B, L) int32, [TruncationInfo])``."""

    def __init__(self, hf_tokenizer, max_length: int | None = None):
        self.hf = hf_tokenizer
        if max_length is None:
            model_max = getattr(hf_tokenizer, "model_max_length", None) or _HUGE_LENGTH
            max_length = model_max if model_max < _HUGE_LENGTH else SD_V1_MAX_LENGTH
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for the start and end tokens")
        self.max_length = int(max_length)
        vocab = hf_tokenizer.get_vocab()
        missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the CLIP special tokens {missing}")
        self.bos_id, self.eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        pad_id = hf_tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.comma_id = vocab.get(",</w>")
        # Textual-inversion tokens: the id a prompt's token gets -> the ids of its embedding's vectors.
        self.expansions: dict[int, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[TruncationInfo]]:
        """Prompts -> ``(ids (B, max_length) int32, per-prompt truncation info)``.

        Each row is ``[bos, tokens..., eos, pad...]``; a prompt with more than
        ``max_length - 2`` tokens keeps the first ones (as diffusers does) and
        reports the dropped tokens decoded back to text.
        """
        if isinstance(prompts, str):
            raise ValueError("tokenize expects a list of prompts, got a single string; wrap it in a list")
        prompts = list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {bad[0]!r}")
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        infos = []
        if not prompts:
            return ids, infos
        room = self.max_length - 2
        for row, tokens in enumerate(self.token_ids(prompts)):
            tokens = [t for token in tokens for t in self.expansions.get(token, (token,))]
            kept, dropped = tokens[:room], tokens[room:]
            ids[row, :len(kept) + 2] = [self.bos_id, *kept, self.eos_id]
            if dropped:
                text = self.hf.decode(dropped, skip_special_tokens=True).strip()
                infos.append(TruncationInfo(True, text, len(dropped)))
            else:
                infos.append(TruncationInfo(False))
        return ids, infos

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, without start/end tokens and untruncated (embedding tokens not expanded)."""
        if not texts:
            return []
        return list(self.hf(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def add_embedding_tokens(self, token: str, vectors: int) -> list[int]:
        """Make ``token`` one token of ``vectors`` placeholder ids (``token``, ``token_1``, ... as diffusers'
        ``load_textual_inversion`` names them); returns the ids. Loading the same token again with as
        many vectors reuses its ids; a word the vocabulary already has is refused."""
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ValueError(f"embedding token {str(token)[:40]!r} must be a non-empty word without spaces")
        names = [token] + [f"{token}_{i}" for i in range(1, vectors)]
        vocab = self.hf.get_vocab()
        first = vocab.get(token)
        if first is not None:
            if first in self.expansions and len(self.expansions[first]) == vectors:
                return list(self.expansions[first])
            what = (f"an embedding of {len(self.expansions[first])} vector(s)" if first in self.expansions
                    else "a word of the tokenizer's vocabulary")
            raise ValueError(f"embedding token {token[:40]!r} is already {what}; load it under another token")
        taken = [name for name in names[1:] if name in vocab]
        if taken:
            raise ValueError(f"embedding token {token[:40]!r} needs the placeholder {taken[0][:48]!r}, which the "
                             "tokenizer already has; load it under another token")
        self.hf.add_tokens(names)
        ids = [int(i) for i in self.hf.convert_tokens_to_ids(names)]
        check = self.hf(token, add_special_tokens=False)["input_ids"]
        if check != ids[:1]:
            raise ValueError(f"embedding token {token[:40]!r} is not read back as one token (got {len(check)}); "
                             "pick a token without spaces")
        self.expansions[ids[0]] = tuple(ids)
        return ids

    def save(self, folder: str | os.PathLike) -> Path:
        """Write a diffusers ``tokenizer/`` folder (vocab.json, merges.txt, configs)."""
        vocab, merges = _vocab_and_merges_of(self.hf)
        write_vocab_files(folder, vocab, merges, pad_token=self.hf.convert_ids_to_tokens(self.pad_id),
                          max_length=self.max_length)
        return Path(folder)


def _vocab_and_merges_of(hf_tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges inside a tokenizers-backed tokenizer."""
    model = json.loads(hf_tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, found a {model.get('type')!r} model")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    vocab.update(hf_tokenizer.get_vocab())  # added tokens, if any
    return vocab, merges


def _find_tokenizer_folder(folder: Path) -> Path:
    """``folder`` itself, or its ``tokenizer/`` subfolder (a diffusers model root)."""
    for candidate in (folder, folder / "tokenizer"):
        if (candidate / "tokenizer.json").is_file() or (
                (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file()):
            return candidate
    raise FileNotFoundError(f"no tokenizer in {folder}: expected vocab.json + merges.txt or "
                            f"tokenizer.json there or in {folder / 'tokenizer'}")


def load_tokenizer(folder: str | os.PathLike | None = None,
                   max_length: int | None = None, pad_token: str | None = None) -> Tokenizer:
    """Load a CLIP tokenizer from a folder, or (``None``) from the packaged vocabulary.

    ``max_length`` defaults to the folder's ``model_max_length`` (77 for SD).
    ``pad_token`` applies to the packaged vocabulary only: ``<|endoftext|>`` (SD 1.x,
    the default) or ``!`` (SD 2.x). Never touches the network.
    """
    from transformers import CLIPTokenizerFast, PreTrainedTokenizerFast

    if folder is None:
        vocab, merges = clip_vocab_and_merges(PACKAGED_BPE)
        with tempfile.TemporaryDirectory(prefix="sd_jax_clip_vocab_") as tmp:
            write_vocab_files(tmp, vocab, merges, pad_token=pad_token or EOS_TOKEN)
            hf = CLIPTokenizerFast.from_pretrained(tmp, local_files_only=True)
        return Tokenizer(hf, max_length)
    path = _find_tokenizer_folder(Path(folder))
    try:
        hf = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as clip_error:
        if not (path / "tokenizer.json").is_file():
            raise
        try:
            hf = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        except Exception as error:
            raise ValueError(f"cannot load the tokenizer in {path}: {clip_error}; {error}") from error
    return Tokenizer(hf, max_length)
