"""Token classes of a prompt ([SOS], semantic, [EOS], padding, template) and embedding interventions on them.

Classes, derived only from the tokenizer's own ids and attention mask (never assuming what the padding token is):
  sos      position 0 when it holds the BOS id (CLIP's <|startoftext|>, Gemma's <bos>, BERT's [CLS]; T5 has none)
  semantic the prompt's tokens, everything before the first EOS
  eos      the first EOS position (CLIP's <|endoftext|>, T5's </s>, BERT's [SEP]); a tokenizer that appends
           none (Gemma) has no eos: its padding is then told by the attention mask
  eos_pad  later positions holding the EOS id (SD 1.x pads with EOS)
  pad      later positions holding another id (SD 2.x / SDXL-2 pad with "!", T5 with <pad>)
  template positions of text the pipeline puts around the prompt (Sana's complex human instruction)
The paper's "[EOS] block" is eos + every position after it (eos_pad or pad).

Families (`prompt_token_infos`, `denoiser_token_info`): the denoiser's text positions are
  SD 1.x/2.x  the tokenizer's 77 positions;
  SDXL        77 positions, the two encoders' states concatenated per position. Tokenizer 1 pads
              with EOS, tokenizer 2 with "!": the classes differ only after the first EOS
              (eos_pad vs pad). denoiser_token_info takes tokenizer 1; prompt_token_infos gives both;
  PixArt      the T5 positions (max_sequence_length, 120 for alpha, 300 for sigma): no BOS,
              semantic, "</s>" (eos), "<pad>" (pad, masked out of the cross-attention). The prompt
              is lower-cased and stripped first, as the pipeline does without clean_caption (the
              clean_caption=True rewriting, which needs bs4/ftfy, is not mirrored);
  SD3         the 77 CLIP positions (tokenizer 1's classes, as SDXL) followed by the T5 positions
              (max_sequence_length, 256 by default); without text_encoder_3 those are zero
              vectors, class pad, token "<zero>", id -1.
The other families follow their declared tokenizer (families.Family.tokenizer):
  "t5"        Wan (umT5: the prompt cleaned as the pipeline cleans it, 512 positions; the pipeline zeroes the
              embeddings after </s>, still class pad), Flux (its T5, `tokenizer_2`: the CLIP tokenizer only makes
              the pooled vector; 512), CogVideoX (226): the T5 tokenizer is the one whose text encoder is a T5;
  "gemma"     Sana: Gemma 2's tokenizer, right padding, the prompt lower-cased and stripped; with the complex
              human instruction (the pipeline's default) the instruction is tokenized before the prompt and the
              denoiser sees position 0 and the last max_sequence_length - 1 positions: <bos>, the instruction's
              last token (template; unless the tokenizer merged the instruction's final space into the prompt's
              first word, as Sana's default "User Prompt: " may be), the prompt, padding. Gemma appends no end
              token: no eos;
              Lumina 2: <bos>, its system prompt and " <Prompt Start> " (template), the prompt, right padding;
  "bert+t5"   HunyuanDiT: the 77 BERT positions ([CLS] sos, [SEP] eos, [PAD] pad) followed by the 256 T5 ones;
  "qwen2"     Qwen-Image: the prompt in its chat template, the template's first 34 positions dropped as the
              pipeline drops them: the words, "<|im_end|>" (eos), "\n<|im_start|>assistant\n" (template), and
              the batch padded to its longest with zero embeddings (pad, masked out);
  "glm"       CogView4: "[gMASK]<sop>" (template) and the words, the batch left-padded to its longest, then to a
              multiple of 16 (pad, attended: no mask); no end token.
A batch whose length follows its longest prompt (Qwen-Image, CogView4): denoiser_token_infos pads it as the
pipeline does. Chroma reads its T5 `tokenizer` ("t5").
Any other tokenizer (Kolors' ChatGLM, HunyuanVideo's Llama + CLIP) is refused with one line naming it.
`require_end_token` says whether the [EOS] interventions can run: they need one end token per prompt that can
carry it (CLIP, T5); Gemma, GLM and chat-template decoder-only encoders have none (their last position sees the
whole text causally; Qwen's <|im_end|> is followed by the template's tail), and two concatenated sequences (SD3,
HunyuanDiT) have two.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean as wan_prompt_clean

from .errors import ShapefirstError
from .families import family, family_of_pipe
from .pipeline_call import call_default
from .world.vocab import bytes_to_unicode

SOS = "sos"
SEMANTIC = "semantic"
EOS = "eos"
EOS_PAD = "eos_pad"
PAD = "pad"
TEMPLATE = "template"
TOKEN_CLASSES = (SOS, SEMANTIC, EOS, EOS_PAD, PAD, TEMPLATE)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letters/digits, inner apostrophes ("don't")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def classify_ids(ids: list[int], bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 attention_mask: list[int] | None = None) -> list[str]:
    """Class of every position of `ids` (see the module docstring).

    Anything before the first EOS (after [SOS]) is semantic, even an id equal to pad_id (a "!" in
    the text of a "!"-padding tokenizer). With no EOS at all (input truncated without one, or a
    tokenizer that appends none) everything after [SOS] is semantic, except the positions the
    attention mask (when given) leaves out: pad. After the first EOS, ids that are neither EOS nor
    pad (should not happen) are called pad."""
    ids = list(ids)
    try:
        eos_index = ids.index(eos_id) if eos_id is not None else None
    except ValueError:
        eos_index = None
    classes: list[str] = []
    for i, t in enumerate(ids):
        if i == 0 and bos_id is not None and t == bos_id:
            classes.append(SOS)
        elif eos_index is None and attention_mask is not None and not attention_mask[i]:
            classes.append(PAD)
        elif eos_index is None or i < eos_index:
            classes.append(SEMANTIC)
        elif i == eos_index:
            classes.append(EOS)
        elif t == eos_id:
            classes.append(EOS_PAD)
        else:
            classes.append(PAD)
    return classes


@dataclass
class TokenInfo:
    """One tokenized prompt: ids, token strings, classes, and which word each semantic token is part of."""

    prompt: str
    ids: list[int]
    tokens: list[str]
    classes: list[str]
    words: list[str]
    word_of_token: list[int | None]
    truncated: bool
    dropped_text: str
    n_semantic: int
    eos_index: int | None

    def positions(self, cls: str) -> list[int]:
        """Positions of class `cls` (one of TOKEN_CLASSES)."""
        if cls not in TOKEN_CLASSES:
            raise ShapefirstError(f"unknown token class {cls!r}", f"use one of {', '.join(TOKEN_CLASSES)}")
        return [i for i, c in enumerate(self.classes) if c == cls]

    def word_positions(self, word_index: int) -> list[int]:
        """Positions of the tokens of word `word_index` (empty if the word was truncated away)."""
        return [i for i, w in enumerate(self.word_of_token) if w == word_index]

    def class_mask(self, cls: str) -> torch.Tensor:
        """Bool tensor [len(ids)], True at positions of class `cls`."""
        mask = torch.zeros(len(self.ids), dtype=torch.bool)
        mask[self.positions(cls)] = True
        return mask

    def to_dict(self) -> dict:
        return asdict(self)


def class_positions(info: TokenInfo) -> dict[str, list[int]]:
    """{class: positions} for every class in TOKEN_CLASSES (empty lists included)."""
    return {c: info.positions(c) for c in TOKEN_CLASSES}


def _lowercases(tokenizer) -> bool:
    return tokenizer.tokenize("A") == tokenizer.tokenize("a")


def _token_units(token: str, byte_decoder: dict | None) -> list | None:
    """The text units a token covers: bytes for byte-level BPE (CLIP), characters otherwise (without
    SentencePiece's "▁" word start or WordPiece's "##" continuation)."""
    byte = _BYTE_TOKEN.fullmatch(token)  # SentencePiece's byte fallback (Gemma): <0x41> is the byte "A"
    if byte is not None:
        b = int(byte.group(1), 16)
        return [b] if byte_decoder is not None else [chr(b)] if b < 128 else None
    t = token[:-4] if token.endswith("</w>") else token
    t = t[1:] if t.startswith("▁") else t[2:] if t.startswith("##") and len(t) > 2 else t
    if not t:
        return None
    if byte_decoder is not None:
        return [byte_decoder[c] for c in t] if all(c in byte_decoder for c in t) else None
    return list(t)


def _align(text: str, tokens: list[str], semantic: list[bool], byte_decoder: dict | None) -> list[int | None]:
    """Word index of each semantic token, consuming the token strings against the text in order.

    A token belongs to the word of its first unit that lies inside a word; punctuation tokens
    get None. A token that cannot be matched (e.g. <unk>) gets None and consumes nothing."""
    word_of_char: list[int | None] = [None] * len(text)
    for w, m in enumerate(_WORD.finditer(text)):
        word_of_char[m.start():m.end()] = [w] * (m.end() - m.start())
    units: list = []
    unit_word: list[int | None] = []
    for ch, w in zip(text, word_of_char):
        cu = list(ch.encode("utf-8")) if byte_decoder is not None else [ch]
        units += cu
        unit_word += [w] * len(cu)
    out: list[int | None] = []
    p = 0
    for tok, sem in zip(tokens, semantic):
        tu = _token_units(tok, byte_decoder) if sem else None
        if tu is None:
            out.append(None)
            continue
        k = len(tu)
        q = next((q for q in range(p, len(units) - k + 1) if units[q:q + k] == tu), None)
        if q is None:
            out.append(None)
            continue
        out.append(next((w for w in unit_word[q:q + k] if w is not None), None))
        p = q + k
    return out


def special_ids(tokenizer) -> tuple[int | None, int | None]:
    """(start id, end id) of a tokenizer: its BOS and EOS, or for a tokenizer with neither (BERT) its [CLS] and
    [SEP]."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None and getattr(tokenizer, "cls_token_id", None) is not None:
        return tokenizer.cls_token_id, getattr(tokenizer, "sep_token_id", None)
    return bos, eos


def _prefix_positions(tokenizer, prefix: str, ids: list[int]) -> int:
    """How many leading positions of `ids` are the tokens of `prefix` alone (its special start token included)."""
    alone = list(tokenizer(prefix, truncation=False, verbose=False).input_ids)
    n = 0
    while n < min(len(alone), len(ids)) and alone[n] == ids[n]:
        n += 1
    return n


def analyze_prompt(tokenizer, prompt: str, max_length: int | None = None, prefix: str = "",
                   padding_side: str | None = None) -> TokenInfo:
    """Tokenize `prompt` as the pipeline does (padding="max_length", truncation) and classify it.

    max_length defaults to tokenizer.model_max_length. prefix: text the pipeline puts before the prompt
    (an instruction): tokenized together with it, its positions are class template. padding_side: the side the
    pipeline pads on, when it sets one (else the tokenizer's own). truncated: the untruncated sequence (with
    its special tokens) is longer than max_length; dropped_text is the decoded text of the content tokens that
    did not fit."""
    max_length = max_length or tokenizer.model_max_length
    side = {} if padding_side is None else {"padding_side": padding_side}
    enc = tokenizer(prefix + prompt, padding="max_length", truncation=True, max_length=max_length, **side)
    ids = list(enc.input_ids)
    mask = list(enc["attention_mask"]) if "attention_mask" in enc else None
    bos, eos = special_ids(tokenizer)
    classes = classify_ids(ids, bos, eos, tokenizer.pad_token_id, mask)
    if prefix:
        n = _prefix_positions(tokenizer, prefix, ids)
        classes = [TEMPLATE if i < n and c == SEMANTIC else c for i, c in enumerate(classes)]
    n_semantic = classes.count(SEMANTIC)
    full = tokenizer(prefix + prompt, truncation=False, verbose=False).input_ids
    truncated = len(full) > max_length
    dropped_text = ""
    if truncated:
        content = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids
        dropped_text = tokenizer.decode(content[n_semantic:]).strip()

    return _token_info(tokenizer, prompt, ids, classes, truncated, dropped_text)


def _byte_decoder(tokenizer) -> dict | None:
    """The tokenizer's byte decoder (CLIP's), or GPT-2's byte map for a byte-level BPE that shows a space as "Ġ"
    (Qwen2, GLM); None for the others (SentencePiece, WordPiece)."""
    dec = getattr(tokenizer, "byte_decoder", None)
    if dec is not None:
        return dec
    probe = tokenizer.convert_ids_to_tokens(tokenizer(" a", add_special_tokens=False).input_ids)
    return {c: b for b, c in bytes_to_unicode().items()} if probe and probe[0].startswith("Ġ") else None


def _token_info(tokenizer, prompt: str, ids: list[int], classes: list[str], truncated: bool = False,
                dropped_text: str = "") -> TokenInfo:
    """A TokenInfo of classified ids: the prompt's words, and the word of every semantic token."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    text = prompt.lower() if _lowercases(tokenizer) else prompt
    words = [m.group(0) for m in _WORD.finditer(text)]
    word_of_token = _align(text, tokens, [c == SEMANTIC for c in classes], _byte_decoder(tokenizer))
    return TokenInfo(prompt=prompt, ids=list(ids), tokens=tokens, classes=classes, words=words,
                     word_of_token=word_of_token, truncated=truncated, dropped_text=dropped_text,
                     n_semantic=classes.count(SEMANTIC), eos_index=classes.index(EOS) if EOS in classes else None)


def check_embedding(emb: torch.Tensor, info: TokenInfo, name: str = "emb") -> None:
    if emb.dim() != 3 or emb.shape[1] != len(info.ids):
        raise ShapefirstError(f"{name} has shape {tuple(emb.shape)}, expected [B, {len(info.ids)}, D]",
                              "pass prompt embeddings of the tokenized prompt (same max_length)")


def require_eos(info: TokenInfo, name: str) -> int:
    if info.eos_index is None:
        if not info.truncated:
            raise ShapefirstError(f"prompt {name} has no [EOS] token: its tokenizer appends none",
                                  "use a pipeline whose text encoder has an end token (CLIP, T5)")
        raise ShapefirstError(f"prompt {name} has no [EOS] token (truncated without one)",
                              "use a shorter prompt or a tokenizer that appends EOS")
    return info.eos_index


def swap_eos(emb_a: torch.Tensor, info_a: TokenInfo, emb_b: torch.Tensor, info_b: TokenInfo,
             mode: str = "block") -> torch.Tensor:
    """A's [SOS] + semantic tokens with B's [EOS] (a new tensor; inputs untouched).

    mode="block": the output keeps A's positions 0..eos_a-1 and fills positions eos_a..L-1 with
    B's positions eos_b..eos_b+(L-eos_a)-1, i.e. B's [EOS] block shifted to start where A's EOS
    starts. If B's block is too short (eos_b > eos_a) the remainder repeats B's last position.
    With "!"-padding the block after the EOS holds padding embeddings; it moves all the same.
    mode="first": only position eos_a is replaced, by B's first EOS (position eos_b).
    emb_b may have batch 1 (broadcast over A's batch)."""
    check_embedding(emb_a, info_a, "emb_a")
    check_embedding(emb_b, info_b, "emb_b")
    ea, eb = require_eos(info_a, "A"), require_eos(info_b, "B")
    length = emb_a.shape[1]
    out = emb_a.clone()
    src = emb_b.to(device=emb_a.device, dtype=emb_a.dtype)
    if mode == "block":
        idx = torch.clamp(torch.arange(eb, eb + length - ea, device=emb_a.device), max=src.shape[1] - 1)
        out[:, ea:] = src[:, idx]
    elif mode == "first":
        out[:, ea] = src[:, eb]
    else:
        raise ShapefirstError(f"unknown swap_eos mode {mode!r}", "use 'block' or 'first'")
    return out


def _t5_max_length(pipe, max_sequence_length: int | None) -> int:
    return int(max_sequence_length or call_default(pipe, "max_sequence_length") or 120)


def _lower_strip(prompt: str) -> str:
    return prompt.lower().strip()


# what a family's pipeline does to the prompt before tokenizing it (others tokenize it as given)
PROMPT_TEXT = {"pixart": _lower_strip, "sana": _lower_strip, "wan": wan_prompt_clean}


def _t5_text(pipe, prompt: str) -> str:
    return PROMPT_TEXT.get(family_of_pipe(pipe), str)(prompt)


def prompt_token_infos(pipe, prompt: str, max_sequence_length: int | None = None) -> dict[str, TokenInfo]:
    """{tokenizer attribute name: TokenInfo} for every tokenizer of the pipeline, each tokenized as
    the pipeline tokenizes (CLIP: its model_max_length; T5: max_sequence_length, default the
    pipeline's own). See the module docstring per family."""
    out = {}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        if tok.bos_token_id is None:  # T5
            out[name] = analyze_prompt(tok, _t5_text(pipe, prompt), _t5_max_length(pipe, max_sequence_length))
        else:
            out[name] = analyze_prompt(tok, prompt)
    return out


def concat_token_infos(infos: list[TokenInfo]) -> TokenInfo:
    """One TokenInfo for a text sequence made of several tokenizations of the same prompt placed one
    after the other (SD3: CLIP then T5). Word indices are shared (words are counted in the same
    order whatever the case), so word_positions(i) gathers a word's tokens in every part;
    eos_index is the first part's."""
    first = infos[0]
    ids, tokens, classes, word_of = [], [], [], []
    for info in infos:
        ids += info.ids
        tokens += info.tokens
        classes += info.classes
        word_of += info.word_of_token
    return TokenInfo(prompt=first.prompt, ids=ids, tokens=tokens, classes=classes, words=first.words,
                     word_of_token=word_of, truncated=any(i.truncated for i in infos),
                     dropped_text=" | ".join(i.dropped_text for i in infos if i.dropped_text),
                     n_semantic=sum(i.n_semantic for i in infos), eos_index=first.eos_index)


_PIPELINE_DEFAULT = object()


def denoiser_token_info(pipe, prompt: str, max_sequence_length: int | None = None,
                        complex_human_instruction=_PIPELINE_DEFAULT, system_prompt: str | None = None) -> TokenInfo:
    """Token classes of the text positions the denoiser attends to (its encoder_hidden_states),
    position by position, for this prompt alone (see the module docstring per family; a batch whose length
    depends on its longest prompt: denoiser_token_infos). max_sequence_length, complex_human_instruction (Sana)
    and system_prompt (Lumina 2) default to the pipeline call's own."""
    fam = family(pipe)
    if fam.name in ("sd", "sdxl"):
        return analyze_prompt(pipe.tokenizer, prompt)
    if fam.name == "pixart":
        return analyze_prompt(pipe.tokenizer, _t5_text(pipe, prompt), _t5_max_length(pipe, max_sequence_length))
    if fam.name == "sd3":
        return _sd3_token_info(pipe, prompt, max_sequence_length)
    if fam.tokenizer == "t5":
        return analyze_prompt(t5_tokenizer(pipe), _t5_text(pipe, prompt), _t5_max_length(pipe, max_sequence_length))
    if fam.tokenizer == "gemma" and fam.name == "sana":
        chi = call_default(pipe, "complex_human_instruction") if complex_human_instruction is _PIPELINE_DEFAULT \
            else complex_human_instruction
        return sana_token_info(pipe.tokenizer, _t5_text(pipe, prompt), _t5_max_length(pipe, max_sequence_length), chi)
    if fam.tokenizer == "gemma" and fam.name == "lumina2":
        head = (pipe.system_prompt if system_prompt is None else system_prompt) + " <Prompt Start> "
        return analyze_prompt(pipe.tokenizer, prompt, _t5_max_length(pipe, max_sequence_length), prefix=head,
                              padding_side="right")
    if fam.tokenizer == "bert+t5":  # HunyuanDiT: its encode_prompt's fixed lengths
        return concat_token_infos([analyze_prompt(pipe.tokenizer, prompt, 77),
                                   analyze_prompt(pipe.tokenizer_2, prompt, 256)])
    if fam.tokenizer == "qwen2":
        return chat_token_info(pipe.tokenizer, prompt, pipe.prompt_template_encode,
                               pipe.prompt_template_encode_start_idx, _t5_max_length(pipe, max_sequence_length),
                               pipe.tokenizer_max_length)
    if fam.tokenizer == "glm":
        return glm_token_info(pipe.tokenizer, prompt, _t5_max_length(pipe, max_sequence_length))
    raise ShapefirstError(f"token classes of {type(pipe).__name__}'s {fam.tokenizer!r} tokenizer are not handled",
                          "run the token analyses on SD, SDXL, PixArt, SD3, Wan, Flux, Chroma, CogVideoX, Sana, "
                          "HunyuanDiT, Qwen-Image, Lumina 2 or CogView4")


def _sd3_token_info(pipe, prompt: str, max_sequence_length: int | None) -> TokenInfo:
    clip = analyze_prompt(pipe.tokenizer, prompt)
    n = _t5_max_length(pipe, max_sequence_length)
    if getattr(pipe, "text_encoder_3", None) is None or getattr(pipe, "tokenizer_3", None) is None:
        t5 = TokenInfo(prompt=prompt, ids=[-1] * n, tokens=["<zero>"] * n, classes=[PAD] * n, words=clip.words,
                       word_of_token=[None] * n, truncated=False, dropped_text="", n_semantic=0, eos_index=None)
    else:
        t5 = analyze_prompt(pipe.tokenizer_3, prompt, n)
    return concat_token_infos([clip, t5])


def t5_tokenizer(pipe):
    """The tokenizer of the pipeline's T5 text encoder (`tokenizer` with `text_encoder`, `tokenizer_2` with
    `text_encoder_2`, ...): Wan's and CogVideoX's `tokenizer`, Flux's `tokenizer_2`."""
    for suffix in ("", "_2", "_3"):
        enc, tok = getattr(pipe, f"text_encoder{suffix}", None), getattr(pipe, f"tokenizer{suffix}", None)
        if tok is not None and "T5" in type(enc).__name__:
            return tok
    raise ShapefirstError(f"{type(pipe).__name__} has no T5 text encoder with a tokenizer",
                          "load the pipeline with its T5 text encoder and tokenizer")


def select_positions(info: TokenInfo, positions: list[int]) -> TokenInfo:
    """The TokenInfo of the given positions of `info`, in that order (a pipeline that keeps some positions)."""
    classes = [info.classes[p] for p in positions]
    return replace(info, ids=[info.ids[p] for p in positions], tokens=[info.tokens[p] for p in positions],
                   classes=classes, word_of_token=[info.word_of_token[p] for p in positions],
                   n_semantic=classes.count(SEMANTIC), eos_index=classes.index(EOS) if EOS in classes else None)


def sana_token_info(tokenizer, text: str, max_sequence_length: int, complex_human_instruction) -> TokenInfo:
    """Sana's text positions (SanaPipeline._get_gemma_prompt_embeds and encode_prompt): right padding; without an
    instruction, max_sequence_length positions; with one, the instruction (lines joined by newlines) before the
    prompt, padded to len(instruction tokens) + max_sequence_length - 2, of which the denoiser sees position 0
    and the last max_sequence_length - 1."""
    if not complex_human_instruction:
        return analyze_prompt(tokenizer, text, max_sequence_length, padding_side="right")
    chi = "\n".join(complex_human_instruction)
    total = len(tokenizer.encode(chi)) + max_sequence_length - 2
    info = analyze_prompt(tokenizer, text, total, prefix=chi, padding_side="right")
    return select_positions(info, [0] + list(range(total - max_sequence_length + 1, total)))


def pad_positions(info: TokenInfo, n: int, side: str = "right", pad_id: int = -1, token: str = "<zero>") -> TokenInfo:
    """`info` padded to n positions of class pad on `side` (a pipeline that pads a batch to its longest prompt)."""
    k = n - len(info.ids)
    if k <= 0:
        return info
    ids, tokens, classes, word_of = [pad_id] * k, [token] * k, [PAD] * k, [None] * k
    if side == "left":
        return replace(info, ids=ids + info.ids, tokens=tokens + info.tokens, classes=classes + info.classes,
                       word_of_token=word_of + info.word_of_token,
                       eos_index=None if info.eos_index is None else info.eos_index + k)
    return replace(info, ids=info.ids + ids, tokens=info.tokens + tokens, classes=info.classes + classes,
                   word_of_token=info.word_of_token + word_of)


def denoiser_token_infos(pipe, prompts: list[str], max_sequence_length: int | None = None, **call) -> list[TokenInfo]:
    """denoiser_token_info of every prompt of ONE pipeline call, padded as the pipeline pads the batch: Qwen-Image to
    its longest prompt with zero embeddings on the right (masked out), CogView4 to its longest on the left, then to a
    multiple of 16 (pad ids, attended); the other families pad each prompt to a fixed length already."""
    infos = [denoiser_token_info(pipe, p, max_sequence_length, **call) for p in prompts]
    tok = family(pipe).tokenizer
    if tok == "qwen2":
        n = max(len(i.ids) for i in infos)
        return [pad_positions(i, n) for i in infos]
    if tok == "glm":
        raw = max(len(i.ids) - i.classes.count(PAD) for i in infos)
        n = raw + (16 - raw % 16) % 16
        pad = pipe.tokenizer.pad_token_id
        return [pad_positions(_unpadded(i), n, "left", pad, pipe.tokenizer.convert_ids_to_tokens(pad)) for i in infos]
    return infos


def _unpadded(info: TokenInfo) -> TokenInfo:
    """A left-padded TokenInfo without its padding."""
    k = next((i for i, c in enumerate(info.classes) if c != PAD), len(info.ids))
    return select_positions(info, list(range(k, len(info.ids))))


def chat_token_info(tokenizer, prompt: str, template: str, drop: int, max_sequence_length: int,
                    tokenizer_max_length: int) -> TokenInfo:
    """A chat-template encoder's text positions (QwenImagePipeline._get_qwen_prompt_embeds): the prompt put into
    `template` ("...user\n{}<|im_end|>\n<|im_start|>assistant\n"), tokenized (at most tokenizer_max_length + drop
    tokens); the pipeline drops the first `drop` positions (the template's system part and "<|im_start|>user\n"),
    then keeps max_sequence_length. Classes: the prompt's tokens semantic, the first "<|im_end|>" after them eos,
    every other template position template (a template position the drop leaves in is template too)."""
    head = template.split("{}", 1)[0]
    ids = list(tokenizer(template.format(prompt), truncation=True, max_length=tokenizer_max_length + drop).input_ids)
    n_head = _prefix_positions(tokenizer, head, ids)
    n_words = _prefix_positions(tokenizer, head + prompt, ids)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    classes = []
    for i, t in enumerate(ids):
        if n_head <= i < n_words:
            classes.append(SEMANTIC)
        elif i >= n_words and t == end and EOS not in classes:
            classes.append(EOS)
        else:
            classes.append(TEMPLATE)
    info = _token_info(tokenizer, prompt, ids, classes)
    return select_positions(info, list(range(drop, len(ids)))[:max_sequence_length])


def glm_token_info(tokenizer, prompt: str, max_sequence_length: int) -> TokenInfo:
    """GLM's text positions (CogView4Pipeline._get_glm_embeds, one prompt): "[gMASK]<sop>" and the prompt, truncated
    to max_sequence_length, left-padded with the pad id to a multiple of 16 (no mask: the pads are attended). Classes:
    the tokenizer's special start tokens template, the prompt's tokens semantic, the padding pad; GLM appends no end
    token."""
    ids = list(tokenizer(prompt, truncation=True, max_length=max_sequence_length).input_ids)
    special = set(tokenizer.all_special_ids)
    classes = [TEMPLATE if t in special else SEMANTIC for t in ids]
    k = (16 - len(ids) % 16) % 16
    pad = tokenizer.pad_token_id
    info = _token_info(tokenizer, prompt, [pad] * k + ids, [PAD] * k + classes)
    return info


END_TOKEN_REFUSALS = {  # Family.tokenizer -> why its text has no single end token that can carry the prompt
    "gemma": "its text encoder is Gemma, a decoder-only model whose tokenizer appends no end token: no position "
             "holds the prompt the way T5's </s> or CLIP's [EOS] does (its last word sees the text causally)",
    "bert+t5": "it attends to its BERT and T5 sequences concatenated, which have two end tokens, not one [EOS] "
               "block",
    "qwen2": "its text encoder is Qwen2.5-VL, a decoder-only model reading a chat template: its <|im_end|> is "
             "followed by the template's tail, and every position sees the text before it causally, so no single "
             "position carries the prompt the way T5's </s> or CLIP's [EOS] does",
    "glm": "its text encoder is GLM, a decoder-only model whose tokenizer appends no end token (its last word sees "
           "the text causally)",
}


def require_end_token(pipe, analysis: str) -> None:
    """The [EOS] interventions (swap, switch, keep-first-EOS) need one end token per prompt that can carry it:
    one line saying why not for the families whose text has none (END_TOKEN_REFUSALS, SD3's CLIP + T5)."""
    fam = family(pipe)
    why = "it attends to its CLIP and T5 sequences concatenated, which have two end tokens, not one [EOS] block" \
        if fam.name == "sd3" else END_TOKEN_REFUSALS.get(fam.tokenizer)
    if why is None and fam.tokenizer not in ("clip", "t5"):
        why = f"token classes of its {fam.tokenizer!r} tokenizer are not handled"
    if why is not None:
        raise ShapefirstError(f"{analysis} edits the prompt's [EOS] block, and {type(pipe).__name__} cannot: {why}",
                              "run it on SD 1.x/2.x, SDXL, PixArt, Wan, Flux, Chroma or CogVideoX; attention "
                              "runs on every family")


def swapped(emb_words: torch.Tensor, infos_words, emb_eos: torch.Tensor, infos_eos) -> torch.Tensor:
    """Row i: words (SOS + semantic) of emb_words[i], [EOS] block of emb_eos[i] (TOKEN_RULE)."""
    return torch.cat([swap_eos(emb_words[i:i + 1], infos_words[i], emb_eos[i:i + 1], infos_eos[i])
                      for i in range(emb_words.shape[0])])
