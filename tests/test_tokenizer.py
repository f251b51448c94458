"""CLIP tokenizer: packaged vocabulary vs OpenAI's BPE algorithm, truncation report, save/load."""

import functools
import gzip
import json
import unicodedata

import numpy as np
import pytest
import regex

from sd_jax import tokenizer as tk

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a photograph of an astronaut riding a horse, trending on artstation, 8k, highly detailed!!!",
    "Café naïve — crème brûlée, Straße, Ελληνικά, русский, 東京タワー, 😀🐱 ❤️",
    "don't stop: it's 3.14159 (pi) & 1,000,000 + $42 ... #hashtag @user",
    "  multiple   spaces\tand\nnewlines  ",
    "sks dog",
    "",
    " ".join(["masterpiece, best quality, ultra-detailed illustration of a castle"] * 12),  # very long
]


def _bytes_to_unicode():
    """OpenAI CLIP ``simple_tokenizer.bytes_to_unicode`` (written out again, independently)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class OpenAIReference:
    """OpenAI CLIP's ``SimpleTokenizer`` algorithm, read straight from the gz file.

    Differences from the original, none of which the prompts above exercise:
    NFC instead of ``ftfy.fix_text`` (not installed) and no HTML unescaping.
    """

    def __init__(self, path):
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)

    @functools.lru_cache(maxsize=None)
    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids


@pytest.fixture(scope="module")
def packaged():
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return OpenAIReference(tk.PACKAGED_BPE)


def test_converted_vocabulary_facts():
    vocab, merges = tk.clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0  # first printable byte; SD 2.x's pad token
    # "a" is byte 97, the 64th printable byte (97 - 33); "</w>" forms follow the 256 bytes.
    assert vocab["a"] == 64 and vocab["a</w>"] == 256 + 64 == 320
    # Whole-word merges, ids as in openai/clip-vit-large-patch14's vocab.json.
    assert vocab["photo</w>"] == 1125 and vocab["cat</w>"] == 2368
    assert vocab["".join(merges[0])] == 512 and vocab["".join(merges[-1])] == 49405


def test_matches_openai_algorithm(packaged, reference):
    ids, infos = packaged.tokenize(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    for row, prompt, info in zip(ids, PROMPTS, infos):
        content = reference.encode(prompt)
        assert len(content) > 0 or prompt.strip() == ""
        kept = content[:75]
        expected = [49406, *kept, 49407] + [49407] * (75 - len(kept))
        assert row.tolist() == expected, prompt
        assert info.truncated == (len(content) > 75)
        assert info.num_dropped_tokens == max(0, len(content) - 75)
    assert packaged.tokenize(["a photo of a cat"])[0][0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_matches_transformers_truncation(packaged):
    """Same rows as transformers' own ``padding="max_length", truncation=True`` (what diffusers calls)."""
    ids, _ = packaged.tokenize(PROMPTS)
    hf = packaged.hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.array(hf))


def test_truncation_reports_dropped_words(packaged):
    vocab = packaged.hf.get_vocab()
    # 100 distinct words that are each a single token.
    words = [t[:-4] for t, i in sorted(vocab.items(), key=lambda kv: kv[1])
             if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii() and len(t) >= 9 and i > 1000]
    words = [w for w in words[:200] if len(packaged.hf(w, add_special_tokens=False)["input_ids"]) == 1][:100]
    assert len(words) == 100
    ids, (info,) = packaged.tokenize([" ".join(words)])
    assert info.truncated and info.num_dropped_tokens == 25
    assert info.dropped_text == " ".join(words[75:])
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407
    assert ids[0, 1:76].tolist() == [vocab[w + "</w>"] for w in words[:75]]
    _, (short,) = packaged.tokenize([" ".join(words[:75])])  # exactly fits
    assert short == tk.TruncationInfo(False)


def test_save_loads_in_transformers(packaged, tmp_path):
    from transformers import CLIPTokenizer

    folder = packaged.save(tmp_path / "tokenizer")
    assert {p.name for p in folder.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    hf = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ours, _ = packaged.tokenize(PROMPTS)
    theirs = hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours, np.array(theirs))
    assert hf.pad_token_id == 49407 and hf.model_max_length == 77
    # load_tokenizer on the folder and on a diffusers model root holding it
    np.testing.assert_array_equal(tk.load_tokenizer(folder).tokenize(PROMPTS)[0], ours)
    np.testing.assert_array_equal(tk.load_tokenizer(tmp_path).tokenize(PROMPTS)[0], ours)


def test_sd2_pad_token_and_tokenizer_json_only(packaged, tmp_path):
    # stabilityai/stable-diffusion-2-1's tokenizer/ says pad "!" in both files.
    sd2 = packaged.save(tmp_path / "sd2")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((sd2 / name).read_text())
        (sd2 / name).write_text(json.dumps({**config, "pad_token": "!"}))
    tok = tk.load_tokenizer(sd2)
    assert tok.pad_id == 0
    (sd2 / "special_tokens_map.json").unlink()  # tokenizer_config.json alone is honoured too
    assert tk.load_tokenizer(sd2).pad_id == 0
    ids, _ = tok.tokenize(["a photo of a cat"])
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert (ids[0, 7:] == 0).all()
    assert json.loads((tok.save(tmp_path / "sd2_again") / "tokenizer_config.json").read_text())["pad_token"] == "!"

    only_json = tmp_path / "only_json"
    only_json.mkdir()
    packaged.hf.backend_tokenizer.save(str(only_json / "tokenizer.json"))
    tok = tk.load_tokenizer(only_json)
    np.testing.assert_array_equal(tok.tokenize(PROMPTS)[0], packaged.tokenize(PROMPTS)[0])


def test_errors(packaged, tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tk.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="list of prompts"):
        packaged.tokenize("a photo of a cat")
    ids, infos = packaged.tokenize([])
    assert ids.shape == (0, 77) and infos == []
