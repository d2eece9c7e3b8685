"""Shared data-building helpers: SentencePiece training, document -> shard tokenization, file hashing.

Used by `data/build_offline_sample.py` (offline sample from local text) and
`data/download_hf_docs_and_tokenize.py` (the FineWeb retokenizer). The shard format itself
(`read_shard_header`, the header constants) lives in train_gpt.py; the writer, which no training run
needs, lives here.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import sys
import time
from typing import Iterable, Iterator

import numpy as np

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DATA_DIR)
for _p in (REPO_ROOT, DATA_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import caseops  # noqa: E402
import train_gpt  # noqa: E402

BOS_ID = 1


def write_shard(path: str, tokens) -> None:
    """Official shard: 256 int32 header (magic, version, count), then uint16 tokens. Atomic."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise train_gpt.ShardError(f"{path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**16):
        raise train_gpt.ShardError(f"{path}: token ids must lie in [0, 65535] to fit uint16")
    if arr.size >= 2**31:
        raise train_gpt.ShardError(f"{path}: {arr.size} tokens do not fit one shard (< 2^31)")
    header = np.zeros(train_gpt.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, arr.size)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)
PAD_ID, EOS_ID, UNK_ID = 0, 2, 3


# ------------------------------------------------------------------------------------------------
# Documents
# ------------------------------------------------------------------------------------------------

def iter_jsonl_texts(path: str, limit: int | None = None) -> Iterator[str]:
    """Texts of a docs JSONL (one {"text": ...} object per line), in file order."""
    with open(path, "r", encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object with a \"text\" key ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: \"text\" is not a string")
            n += 1
            yield text


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def clean_training_text(text: str) -> str:
    """Tokenizer-training form of a doc (spec §1.3 step 5): NUL -> space, stripped."""
    return text.replace("\x00", " ").strip()


def training_sentences(texts: Iterable[str], max_sentences: int | None, transform=None) -> list[str]:
    """Fixed, ordered subset of training sentences: the non-empty lines of the cleaned docs, in order.

    SentencePiece skips sentences over `max_sentence_length` bytes, so docs are fed line by line
    (nmt_nfkc folds newlines into spaces anyway). The cap keeps the first `max_sentences` lines.
    """
    out: list[str] = []
    for text in texts:
        text = clean_training_text(text)
        if not text:
            continue
        if transform is not None:
            text = transform(text)
        for line in text.split("\n"):
            line = line.strip()
            if line:
                out.append(line)
                if max_sentences and len(out) >= max_sentences:
                    return out
    return out


# ------------------------------------------------------------------------------------------------
# SentencePiece
# ------------------------------------------------------------------------------------------------

def sp_trainer_settings(vocab_size: int, user_defined_symbols=(), overrides: dict | None = None,
                        num_threads: int = 1) -> dict:
    """SentencePiece BPE trainer arguments of spec §1.3 step 5 (+ spec overrides)."""
    s = dict(model_type="bpe", vocab_size=int(vocab_size), character_coverage=0.999, byte_fallback=True,
             split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
             pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, hard_vocab_limit=False,
             num_threads=int(num_threads), shuffle_input_sentence=False, input_sentence_size=0)
    if user_defined_symbols:
        s["user_defined_symbols"] = list(user_defined_symbols)
    s.update(overrides or {})
    return s


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def train_sentencepiece(sentences: list[str], model_prefix: str, settings: dict) -> str:
    """Train a SentencePiece model on `sentences` (in the given order); write `<prefix>.model/.vocab`.

    The model is built in memory (so no path ends up inside it) and written atomically; the result is
    byte-identical for the same sentences and settings.
    """
    import sentencepiece as spm
    if not sentences:
        raise ValueError(f"{model_prefix}: no training text for the tokenizer")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, minloglevel=2,
                                   **settings)
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab_lines = []
    for i in range(sp.vocab_size()):
        score = sp.get_score(i)
        vocab_lines.append(f"{sp.id_to_piece(i)}\t{int(score) if float(score).is_integer() else score}\n")
    _atomic_write_bytes(model_prefix + ".vocab", "".join(vocab_lines).encode("utf-8"))
    _atomic_write_bytes(model_prefix + ".model", model)
    return model_prefix + ".model"


def recommended_bigram_vocab_size(vocab_size: int) -> int:
    return int(math.ceil(vocab_size / 128) * 128 * 5)


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------

class ShardWriter:
    """Accumulates tokens into fixed-size shards `<prefix>_{i:06d}.bin`; a doc may straddle two shards."""

    def __init__(self, out_dir: str, prefix: str, shard_tokens: int):
        if shard_tokens <= 0 or shard_tokens >= 2**31:
            raise ValueError(f"shard size {shard_tokens} must be in [1, 2^31)")
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, int(shard_tokens)
        self.buf = np.empty(min(self.shard_tokens, 1 << 20), dtype=np.uint16)
        self.fill = 0
        self.files: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        while tokens.size:
            if self.fill == self.buf.size and self.buf.size < self.shard_tokens:
                grown = np.empty(min(self.shard_tokens, self.buf.size * 2), dtype=np.uint16)
                grown[:self.fill] = self.buf[:self.fill]
                self.buf = grown
            take = min(tokens.size, self.buf.size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.fill:
            return
        name = f"{self.prefix}_{len(self.files):06d}.bin"
        path = os.path.join(self.out_dir, name)
        write_shard(path, self.buf[:self.fill])
        self.files.append({"name": name, "tokens": int(self.fill), "bytes": os.path.getsize(path),
                           "sha256": sha256_file(path)})
        self.fill = 0


def remove_stale_shards(out_dir: str) -> None:
    for pat in ("fineweb_train_*.bin", "fineweb_val_*.bin"):
        for f in glob.glob(os.path.join(out_dir, pat)):
            os.remove(f)


_WORKER: dict = {}


BYTE_OFFSET = 4  # pure-byte tokenizer (byte260): 4 specials, then token = byte + 4


def _worker_init(model_path: str | None, caseops_on: bool) -> None:
    """Per-process tokenizer: a SentencePiece model, or the pure-byte tokenizer when `model_path` is None."""
    if model_path is None:
        _WORKER["sp"] = None
    else:
        import sentencepiece as spm
        _WORKER["sp"] = spm.SentencePieceProcessor(model_file=model_path)
    _WORKER["caseops"] = caseops_on


def _tokenize_batch(job):
    """(split, texts, want_bytes) -> (split, n_docs, tokens uint16, byte counts uint16 | None)."""
    split, texts, want_bytes = job
    sp, co = _WORKER["sp"], _WORKER["caseops"]
    inputs = [caseops.encode(t) for t in texts] if co else texts
    if sp is None:
        encoded = [(np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) + BYTE_OFFSET).tolist()
                   for t in inputs]
    else:
        encoded = sp.encode(inputs)
    parts, bparts = [], []
    for text, ids in zip(inputs, encoded):
        parts.append(np.asarray([BOS_ID] + ids, dtype=np.uint16))
        if want_bytes:
            if sp is None:  # a byte token is one transformed byte; CaseOps control bytes stand for none
                w = caseops.char_original_bytes(text, co)
                counts = np.zeros(len(ids), np.int64)
                ends = np.cumsum([len(ch.encode("utf-8")) for ch in text]) - 1 if text else []
                counts[np.asarray(ends, dtype=np.int64)] = w
            else:
                counts = caseops.token_original_bytes(sp, text, ids, caseops=co)
            if counts.size and counts.max() > 65535:
                raise ValueError("a token stands for more than 65535 bytes; cannot store it in the sidecar")
            bparts.append(np.concatenate([[0], counts]).astype(np.uint16))
    toks = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    bts = (np.concatenate(bparts) if bparts else np.zeros(0, np.uint16)) if want_bytes else None
    return split, len(texts), toks, bts


def _jobs(texts: Iterable[str], num_val_docs: int, batch_docs: int, val_bytes: bool):
    batch, split, i = [], "val", 0
    for text in texts:
        s = "val" if i < num_val_docs else "train"
        if batch and (s != split or len(batch) >= batch_docs):
            yield split, batch, val_bytes and split == "val"
            batch = []
        batch.append(text)
        split = s
        i += 1
    if batch:
        yield split, batch, val_bytes and split == "val"


def tokenize_to_shards(texts: Iterable[str], *, model_path: str | None, out_dir: str, num_val_docs: int,
                       shard_tokens: int, caseops_on: bool = False, write_val_bytes: bool | None = None,
                       workers: int = 1, batch_docs: int = 256, max_train_shards: int | None = None,
                       progress_every: float = 10.0, log=print) -> dict:
    """Tokenize docs in order into val (first `num_val_docs` docs) and train shards in `out_dir`.

    Each doc becomes [BOS] + encode(text) (CaseOps-transformed first when `caseops_on`); no EOS. Val is
    flushed before train starts, so val shards hold only val docs. With `write_val_bytes` (default: with
    caseops) a parallel `fineweb_val_bytes_*` sidecar holds each val token's original UTF-8 byte count.
    Output is independent of `workers` (ordered map). Returns split stats and per-file records.
    """
    if write_val_bytes is None:
        write_val_bytes = caseops_on
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_shards(out_dir)
    writers = {"val": ShardWriter(out_dir, "fineweb_val", shard_tokens),
               "train": ShardWriter(out_dir, "fineweb_train", shard_tokens)}
    bytes_writer = ShardWriter(out_dir, "fineweb_val_bytes", shard_tokens) if write_val_bytes else None
    docs = {"val": 0, "train": 0}
    tokens = {"val": 0, "train": 0}
    t0 = last = time.time()
    jobs = _jobs(texts, num_val_docs, batch_docs, bool(write_val_bytes))
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
            workers, initializer=_worker_init, initargs=(model_path, caseops_on))
        results = pool.imap(_tokenize_batch, jobs, chunksize=1)
    else:
        _worker_init(model_path, caseops_on)
        results = map(_tokenize_batch, jobs)
    stopped = False
    try:
        for split, n, toks, bts in results:
            if split == "train" and docs["train"] == 0:
                writers["val"].flush()
                if bytes_writer:
                    bytes_writer.flush()
            writers[split].add(toks)
            if bts is not None:
                bytes_writer.add(bts)
            docs[split] += n
            tokens[split] += int(toks.size)
            if max_train_shards is not None and len(writers["train"].files) >= max_train_shards:
                stopped = True
                break
            now = time.time()
            if progress_every and now - last >= progress_every:
                last = now
                tot = tokens["val"] + tokens["train"]
                log(f"  {docs['val'] + docs['train']:,} docs, {tot:,} tokens, {tot / (now - t0):,.0f} tok/s")
    finally:
        if pool is not None:
            pool.terminate() if stopped else pool.close()
            pool.join()
    if stopped:
        writers["train"].fill = 0  # drop the partial shard after the cap
        tokens["train"] = sum(f["tokens"] for f in writers["train"].files)
    for w in (writers["val"], bytes_writer, writers["train"]):
        if w:
            w.flush()
    secs = time.time() - t0
    return {"docs_val": docs["val"], "docs_train": docs["train"], "docs_total": docs["val"] + docs["train"],
            "tokens_val": tokens["val"], "tokens_train": tokens["train"],
            "tokens_total": tokens["val"] + tokens["train"],
            "files_val": len(writers["val"].files), "files_train": len(writers["train"].files),
            "files_total": len(writers["val"].files) + len(writers["train"].files),
            "files": writers["val"].files + (bytes_writer.files if bytes_writer else []) + writers["train"].files,
            "seconds": secs, "truncated_at_max_train_shards": stopped}
