"""CaseOps: a lossless case transform for tokenizer input (spec §1.5, `lossless_caps_caseops_v1`).

Runs of ASCII letters are lower-cased and their case is recorded with private-use control characters:

    TITLE   U+E001  the next letter is upper case (a Title-case word, or the head of a mixed-case word)
    ALLCAPS U+E002  the whole following run of letters is upper case (words of length >= 2)
    CAPNEXT U+E003  the next letter is upper case (inside a mixed-case word)
    ESC     U+E004  the next character is literal (used for control characters already in the input)

`decode(encode(s)) == s` for every Unicode string `s`. Also here: the per-token byte accounting of the
CaseOps byte sidecar, i.e. how many ORIGINAL (pre-transform) UTF-8 bytes every token of a tokenized
transformed document stands for. Standalone: needs only the standard library (+ numpy for
`token_original_bytes`).
"""
from __future__ import annotations

import re

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
CONTROL_CODEPOINTS = tuple(ord(c) for c in CONTROLS)
TRANSFORM_NAME = "lossless_caps_caseops_v1"

_ESCAPE_TABLE = {ord(c): ESC + c for c in CONTROLS}
_WORD = re.compile(r"[A-Za-z]+")
_DECODE = re.compile("\ue004(.)|\ue002([A-Za-z]+)|[\ue001\ue003]([A-Za-z])", re.DOTALL)


def _encode_word(m: re.Match) -> str:
    w = m.group(0)
    if w.islower():
        return w
    low = w.lower()
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + low
    if w[0].isupper() and (len(w) == 1 or w[1:].islower()):
        return TITLE + low
    out = [TITLE + low[0] if w[0].isupper() else low[0]]
    for ch in w[1:]:
        out.append(CAPNEXT + ch.lower() if ch.isupper() else ch)
    return "".join(out)


def encode(text: str) -> str:
    """Original text -> transformed text (letters lower-cased, case kept in control characters)."""
    return _WORD.sub(_encode_word, text.translate(_ESCAPE_TABLE))


def _decode_match(m: re.Match) -> str:
    if m.group(1) is not None:
        return m.group(1)
    if m.group(2) is not None:
        return m.group(2).upper()
    return m.group(3).upper()


def decode(text: str) -> str:
    """Transformed text -> original text; the exact inverse of `encode`."""
    return _DECODE.sub(_decode_match, text)


# ------------------------------------------------------------------------------------------------
# Byte accounting
# ------------------------------------------------------------------------------------------------

def _utf8_len(ch: str) -> int:
    cp = ord(ch)
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


def _byte_piece_value(piece: str) -> int | None:
    """`<0xNN>` byte-fallback piece -> NN, else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def piece_byte_counts(pieces, caseops: bool = True) -> list[int]:
    """Surface walk of spec §1.5: original UTF-8 bytes per piece of a tokenized transformed text.

    Control characters count 0 (ESC too), an escaped character its UTF-8 length, `▁` one byte (a space),
    a byte-fallback piece one byte, anything else its UTF-8 length. The ESC state carries across pieces.
    Exact whenever the tokenizer's normalizer left the text unchanged; `token_original_bytes` is exact always.
    """
    counts, escaped = [], False
    for piece in pieces:
        if _byte_piece_value(piece) is not None:
            counts.append(1)
            escaped = False
            continue
        n = 0
        for ch in piece:
            if escaped:
                n += _utf8_len(ch)
                escaped = False
            elif caseops and ch in CONTROLS:
                escaped = ch == ESC
            elif ch == "\u2581":
                n += 1
            else:
                n += _utf8_len(ch)
        counts.append(n)
    return counts


def char_original_bytes(text: str, caseops: bool = True):
    """numpy int64 [len(text)]: original UTF-8 bytes of each character of a (transformed) text."""
    import numpy as np
    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    w = np.where(cps < 0x80, 1, np.where(cps < 0x800, 2, np.where(cps < 0x10000, 3, 4))).astype(np.int64)
    if caseops and text:
        is_ctl = (cps >= 0xE001) & (cps <= 0xE004)
        if is_ctl.any():
            w[is_ctl] = 0
            n = len(text)
            pos = text.find(ESC)
            while pos != -1:  # the char after an (unescaped) ESC is literal: its own UTF-8 length
                if pos + 1 < n:
                    w[pos + 1] = _utf8_len(text[pos + 1])
                    pos = text.find(ESC, pos + 2)
                else:
                    break
    return w


def token_original_bytes(sp, text: str, ids=None, caseops: bool = True):
    """Exact per-token original-byte counts for `sp.encode(text)` (numpy int64, one per token).

    `text` is the tokenizer input (the CaseOps-transformed document when `caseops`). The counts are aligned
    through the normalizer's offsets, so characters the normalizer drops or merges (collapsed whitespace,
    stripped ends, NFKC) are charged to a neighbouring token and the counts sum to exactly
    `len(decode(text).encode('utf-8'))` (or `len(text.encode('utf-8'))` without caseops) for any non-blank
    text. Falls back to `piece_byte_counts` (with the total fixed up on the last token) if the pieces do not
    spell the normalized text.
    """
    import numpy as np
    if ids is None:
        ids = sp.encode(text)
    ids = list(ids)
    w = char_original_bytes(text, caseops)
    total = int(w.sum())
    if not ids:
        return np.zeros(0, dtype=np.int64)
    norm, offs = sp.normalize(text, with_offsets=True)
    pieces = [sp.id_to_piece(int(t)) for t in ids]
    cw = np.concatenate([[0], np.cumsum(w)])
    offs = np.asarray(offs, dtype=np.int64)
    ok = len(offs) == len(norm) + 1 and (offs.size == 0 or (offs.min() >= 0 and offs.max() <= len(text)))
    counts = np.zeros(len(ids), dtype=np.int64)
    if ok:
        # normalized char i covers original chars [offs[i], offs[i+1]); ends go to the first/last char
        per_norm = cw[offs[1:]] - cw[offs[:-1]]
        pos, i, np_ = 0, 0, len(pieces)
        while i < np_ and ok:
            b = _byte_piece_value(pieces[i])
            if b is None:
                L = len(pieces[i])
                if norm[pos:pos + L] != pieces[i]:
                    ok = False
                    break
                counts[i] = per_norm[pos:pos + L].sum()
                pos += L
                i += 1
                continue
            # a run of byte pieces spelling one character
            k = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 0
            if k == 0 or i + k > np_ or pos >= len(norm):
                ok = False
                break
            try:
                ch = bytes(_byte_piece_value(p) for p in pieces[i:i + k]).decode("utf-8")
            except (TypeError, ValueError):
                ok = False
                break
            if ch != norm[pos]:
                ok = False
                break
            B = int(per_norm[pos])
            counts[i:i + k] = [1] * k if B == k else [B] + [0] * (k - 1)
            pos += 1
            i += k
        if ok and pos == len(norm):
            counts[0] += int(cw[offs[0]]) if len(offs) else 0
            counts[-1] += total - int(cw[offs[-1]]) if len(offs) else 0
            return counts
    counts = np.asarray(piece_byte_counts(pieces, caseops), dtype=np.int64)
    counts[-1] += total - int(counts.sum())
    if counts[-1] < 0:  # keep counts non-negative: take the excess from earlier tokens
        deficit, counts[-1] = -int(counts[-1]), 0
        for j in range(len(counts) - 2, -1, -1):
            take = min(deficit, int(counts[j]))
            counts[j] -= take
            deficit -= take
            if not deficit:
                break
    return counts
