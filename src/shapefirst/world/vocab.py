"""A CLIP-format BPE tokenizer for the shapes world, built offline and deterministically.

Why not the real CLIP vocabulary: its 49,408 entries would make the text encoder's embedding
table alone 6.3M parameters at width 128, more than the whole UNet, for a world of ~40 words.
This tokenizer keeps CLIP's exact format and conventions (byte-level base alphabet with
"</w>" word ends, lower-casing, <|startoftext|> / <|endoftext|>, padding with EOS to 77), so
any text still tokenizes (unknown words fall back to sub-words and bytes), and every world
word is a single token. `transformers.CLIPTokenizer.from_pretrained(folder)` loads it.
"""
from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

from .render import TEMPLATES, VALUES, WHERE

# Words beyond the world's own, so everyday prompts tokenize into whole words too.
EXTRA_WORDS = (
    "a an the of on in at and with to is there one image picture photo drawing object shape "
    "big tiny little middle corner up down side background gray grey white black orange pink "
    "brown star heart ring oval rectangle diamond spotted checkered smooth solid dots stripes "
    "no not two three"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character map used by GPT-2 and CLIP byte-level BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def world_word_counts() -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    words = [w for vals in VALUES.values() for w in vals] + EXTRA_WORDS
    words += (" ".join(WHERE.values()).split()
              + " ".join(TEMPLATES).replace("{", " ").replace("}", " ").replace(",", " ").split())
    for w in words:
        counts[w.lower()] += 1
    return counts


def train_bpe(counts: collections.Counter) -> list[tuple[str, str]]:
    """Plain BPE over words (CLIP style: the last symbol carries '</w>'), until every word is one token.

    Ties break by the pair's text, so the result is the same on every machine."""
    enc = bytes_to_unicode()
    words = {tuple(enc[b] for b in w.encode("utf-8")[:-1]) + (enc[w.encode("utf-8")[-1]] + "</w>",): c
             for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for sym, c in words.items():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += c
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = {}
        for sym, c in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new


def write_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json + merges.txt + a tokenizer config for CLIPTokenizer.from_pretrained(folder).

    pad_token="!" gives the SD 2.x convention (a single [EOS], then "!" padding)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = train_bpe(world_word_counts())
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def t5_vocab(extra_words: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """A SentencePiece-style unigram vocabulary for the shapes world, built deterministically (extra_words: more
    whole-word pieces, e.g. the moving world's "moving", "standing", "still", after the image world's).

    T5's layout: <pad>=0, </s>=1, <unk>=2, then pieces with log-probability scores: "▁" + every
    world word (one piece per word), then "▁"-initial and inner single characters (ASCII letters,
    digits, punctuation), so any ASCII text tokenizes; other characters become <unk>."""
    import string

    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    words = sorted(world_word_counts())
    words += sorted(w for w in set(extra_words) if w not in words)
    vocab += [("▁" + w, -5.0 - 0.001 * i) for i, w in enumerate(words)]
    vocab += [("▁" + c, -9.0) for c in chars] + [(c, -10.0) for c in chars]
    return vocab


def world_t5_tokenizer(folder: str | Path | None = None, model_max_length: int = 120,
                       extra_words: tuple[str, ...] = ()):
    """A T5 tokenizer (Unigram, Metaspace, "</s>" appended, "<pad>" padding, no BOS) over t5_vocab(),
    saved to `folder` (tokenizer.json) and loaded back from it. Nothing is downloaded.

    Built from the vocabulary list directly (transformers 5: T5Tokenizer(vocab=[(piece, score)])),
    not from a spiece.model file: no sentencepiece needed, and no keyword that a tokenizer class
    might silently ignore (T5Tokenizer(vocab_file=...) without `vocab` gives a 4-piece vocabulary)."""
    from transformers import T5Tokenizer

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="shapefirst-t5tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    vocab = t5_vocab(extra_words)
    try:
        tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    except TypeError:  # transformers 4.x: a fast tokenizer from a `tokenizers` object
        tok = _t5_fast_tokenizer(vocab, model_max_length)
    if len(tok) != len(vocab) or tok.pad_token_id != 0 or tok.eos_token_id != 1:
        raise RuntimeError(f"the tiny T5 tokenizer came out wrong: {len(tok)} pieces, pad {tok.pad_token_id}, "
                           f"eos {tok.eos_token_id}")
    tok.save_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _t5_fast_tokenizer(vocab, model_max_length: int):
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    tk = Tokenizer(Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                      special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
