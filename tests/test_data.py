import math
import os

import numpy as np
import pytest
import torch

from conftest import TINY, T
from data.shard_tools import write_shard


def test_shard_round_trip(tmp_path):
    toks = np.random.default_rng(0).integers(0, 65536, size=12345)
    p = str(tmp_path / "fineweb_train_000000.bin")
    write_shard(p, toks)
    assert T.read_shard_header(p) == toks.size
    assert np.array_equal(T.load_shard(p), toks) and np.array_equal(T.load_shard(p, mmap=False), toks)
    with open(p, "rb") as f:
        header = np.frombuffer(f.read(1024), dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 12345] and not header[3:].any()


def _corrupt(path, offset, value):
    raw = bytearray(open(path, "rb").read())
    raw[offset:offset + 4] = np.array([value], dtype="<i4").tobytes()
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("how,needle", [
    ("magic", "magic 123 != 20240520"), ("version", "version 7 unsupported"),
    ("truncate", "truncated or corrupt"), ("short", "shorter than the 1024-byte header"),
    ("count", "header says 99 tokens"),
])
def test_shard_header_errors_name_the_file(tmp_path, how, needle):
    p = str(tmp_path / "bad.bin")
    write_shard(p, np.arange(100))
    if how == "magic":
        _corrupt(p, 0, 123)
    elif how == "version":
        _corrupt(p, 4, 7)
    elif how == "count":
        _corrupt(p, 8, 99)
    elif how == "truncate":
        open(p, "r+b").truncate(1024 + 150)
    elif how == "short":
        open(p, "r+b").truncate(100)
    with pytest.raises(T.ShardError) as e:
        T.read_shard_header(p)
    assert p in str(e.value) and needle in str(e.value)


def test_write_shard_rejects_out_of_range(tmp_path):
    with pytest.raises(T.ShardError, match="uint16"):
        write_shard(str(tmp_path / "x.bin"), np.array([70000]))


@pytest.mark.parametrize("text", [
    "plain ascii words and more words", "café naïve résumé Ångström", "日本語のテキスト 中文 한국어",
    "emoji 🎉🚀 and ∑∫√ symbols", "  leading spaces\nnew line\ttab", "Zürich 東京 Ελληνικά",
])
def test_byte_luts_match_utf8_length_of_decoded_text(sample, text):
    sp = T.load_tokenizer(sample["TOKENIZER_PATH"], 1024)
    luts = T.build_byte_luts(sp, 1024)
    ids = [luts.bos_id] + sp.encode(text)
    t = torch.tensor(ids)
    counted = int(luts.target_bytes(t[:-1], t[1:]).sum())
    assert counted == len(sp.decode(ids[1:]).encode("utf-8"))
    if any(ord(c) > 0x2000 for c in text):  # byte-fallback pieces are exercised
        assert any(sp.is_byte(i) for i in ids[1:])


def test_val_bpb_formula():
    r = T.EvalResult("x", loss_sum=1000.0, tokens=400, bytes=900, time_ms=1.0)
    assert r.val_loss == pytest.approx(2.5)
    assert r.val_bpb == pytest.approx((r.val_loss / math.log(2)) * (400 / 900))
    assert "x val_loss:2.50000000 val_bpb:" in r.line() and "eval_time:1ms" in r.line()


def test_validation_load_and_bytes(sample):
    hp = T.Hyperparameters.from_env({**TINY, **sample})
    sp = T.load_tokenizer(sample["TOKENIZER_PATH"], 1024)
    luts = T.build_byte_luts(sp, 1024)
    val = T.load_validation(hp, luts)
    assert val.num_targets == 4096 and val.tokens[0] == luts.bos_id
    assert val.target_bytes.numel() == val.num_targets and val.source == "sentencepiece LUTs"
    assert int(val.target_bytes.sum()) == int(luts.target_bytes(val.tokens[:-1], val.tokens[1:]).sum())


def _stream_tokens(files):
    return np.concatenate([np.asarray(T.load_shard(f), dtype=np.int64) for f in files])


def test_packed_loader_disjoint_ranks_cover_stream_and_never_open_val(sample, monkeypatch):
    files = T.list_shards(sample["DATA_PATH"], "train")
    opened = []
    real = T.load_shard
    monkeypatch.setattr(T, "load_shard", lambda p, mmap=True: (opened.append(p), real(p, mmap))[1])
    world, local, seq = 2, 512, 128
    loaders = [T.PackedDocumentLoader(files, r, world, local, seq, torch.device("cpu")) for r in range(world)]
    stream = _stream_tokens(files)
    pos = 0
    for _ in range(3):
        for r, ld in enumerate(loaders):
            x, y = ld.next_batch()
            span = stream[pos + r * (local + 1): pos + (r + 1) * (local + 1)]
            assert np.array_equal(x.flatten().numpy(), span[:-1]) and np.array_equal(y.flatten().numpy(), span[1:])
        pos += world * (local + 1)
    assert opened and all("fineweb_train_" in p and "_val_" not in p for p in opened)


def test_document_boundaries_are_bos_positions():
    bos = 1
    ids = torch.tensor([[5, 6, 1, 7, 8, 1, 9] + [9] * 57, [1, 2, 3, 4, 1, 5, 6] + [6] * 57])
    seg = T.prepare_attention("reference", ids, bos).seg
    for row, s in zip(ids, seg):
        changes = (s[1:] != s[:-1]).nonzero().flatten() + 1
        assert all(row[c] == bos for c in changes)
    cu = T.cu_seqlens_from_segments(seg)
    cap = T.cu_seqlens_capacity(*ids.shape)
    assert cu.dtype == torch.int32 and cu.numel() == cap + 1  # fixed length: one compiled shape
    assert cu[:6].tolist() == [0, 2, 5, 64, 68, 128] and set(cu[6:].tolist()) == {128}  # tail: empty segments
    dense = torch.ones(2, 64, dtype=torch.long)  # a BOS at every token: more documents than the capacity
    with pytest.raises(RuntimeError, match="cu_seqlens_capacity"):
        T.cu_seqlens_from_segments(T.prepare_attention("reference", dense, bos).seg)


def test_packed_loader_wraps_around_short_shards(tmp_path):
    for i in range(2):
        write_shard(str(tmp_path / f"fineweb_train_{i:06d}.bin"), np.r_[1, np.arange(2, 60)])
    ld = T.PackedDocumentLoader(T.list_shards(str(tmp_path), "train"), 0, 1, 256, 128, torch.device("cpu"))
    for _ in range(3):
        x, _ = ld.next_batch()
        assert x.shape == (1, 256)  # one flat row per micro-batch, as the record


def test_packed_rows_cut_documents_at_start_plus_k_pieces():
    """Segments start at column 0, at each BOS and every piece_len tokens into a document, never at a fixed
    row start (#1855's loader); positions restart at each segment (the rotary angle)."""
    ids = torch.full((1, 40), 7)
    ids[0, [5, 30]] = 1
    starts = T.segment_starts(ids, 1, piece_len=8)[0].nonzero().flatten().tolist()
    assert starts == [0, 5, 13, 21, 29, 30, 38]
    doc = T.prepare_attention("sdpa", ids, 1, piece_len=8)
    assert doc.pos[0, :16].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2] and doc.piece_len == 8
    assert T.segment_starts(ids, 1)[0].nonzero().flatten().tolist() == [0, 5, 30]  # no piece cut


def test_shuffled_loader_ranks_disjoint_seeded(sample):
    files = T.list_shards(sample["DATA_PATH"], "train")
    seen = []
    for r in range(2):
        ld = T.ShuffledSequenceLoader(files, r, 2, 1024, 128, torch.device("cpu"), seed=5)
        starts = set()
        for st in ld.starts:
            starts |= set(int(s) for s in st)
        seen.append(starts)
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    a = T.ShuffledSequenceLoader(files, 0, 1, 1024, 128, torch.device("cpu"), seed=5).next_batch()[0]
    b = T.ShuffledSequenceLoader(files, 0, 1, 1024, 128, torch.device("cpu"), seed=5).next_batch()[0]
    c = T.ShuffledSequenceLoader(files, 0, 1, 1024, 128, torch.device("cpu"), seed=6).next_batch()[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_caseops_validation_uses_the_byte_sidecar(tmp_path):
    import json, subprocess, sys
    from conftest import ROOT
    docs = tmp_path / "docs.jsonl"
    texts = [f"Doc {i}: The QUICK brown Fox, McDonald's iPhone \ue001 café 東京 #{i}." * 3 for i in range(60)]
    docs.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "build_offline_sample.py"), "--out-root", str(tmp_path),
                    "--docs-jsonl", str(docs), "--val-docs", "10", "--vocab-size", "512", "--caseops"],
                   check=True, capture_output=True)
    (ds,) = [p for p in (tmp_path / "datasets").iterdir()]
    (tok,) = [p for p in (tmp_path / "tokenizers").iterdir() if p.suffix == ".model"]
    import sentencepiece as spm
    V = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size()  # small corpus: fewer than 512 pieces
    hp = T.Hyperparameters.from_env({**TINY, "DATA_PATH": str(ds), "TOKENIZER_PATH": str(tok), "VOCAB_SIZE": str(V),
                                     "CASEOPS_ENABLED": "1", "VAL_MAX_TOKENS": "0", "EVAL_SEQ_LEN": "16", "EVAL_STRIDE": "0"})
    hp.validate(1)
    sp = T.load_tokenizer(str(tok), V)
    val = T.load_validation(hp, T.build_byte_luts(sp, V))
    assert val.source == "caseops byte sidecar"
    side = np.concatenate([T.load_shard(f, mmap=False) for f in sorted(ds.glob("fineweb_val_bytes_*.bin"))])
    assert int(val.target_bytes.sum()) == int(side[1: val.num_targets + 1].sum())
    assert int(val.target_bytes.sum()) != int(T.build_byte_luts(sp, V).target_bytes(val.tokens[:-1], val.tokens[1:]).sum())


def test_rows_without_bos_are_one_segment():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert T.prepare_attention("reference", ids, 1).seg.unique().numel() == 1
