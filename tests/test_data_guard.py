"""The validation-overlap guard and the split counts (train_gpt.py, data section): a deliberately leaky copy of the
offline sample, made the way a data prep with too few validation documents makes one."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import HANG_TIMEOUT_S, ROOT, TINY, T, tiny_hp
from data.shard_tools import write_shard


def docs_of(tokens, bos):
    starts = list(np.flatnonzero(tokens == bos)) + [len(tokens)]
    return [tokens[a:b] for a, b in zip(starts[:-1], starts[1:])]


def leaky_copy(sample, dest, kept_val_docs=10, leak_shard=0):
    """The sample's validation shard beside train shards from a prep that kept only `kept_val_docs` validation
    documents: the others open train shard `leak_shard` (0: as in the excluded submissions; 1: a mixed-up shard)."""
    src = sample["DATA_PATH"]
    os.makedirs(dest)
    shutil.copy(os.path.join(src, "fineweb_val_000000.bin"), dest)
    val = T.load_shard(os.path.join(src, "fineweb_val_000000.bin"), mmap=False)
    train = T.load_shard(os.path.join(src, "fineweb_train_000000.bin"), mmap=False)
    docs = docs_of(val, 1)
    cut = np.flatnonzero(train == 1)[len(docs_of(train, 1)) // 2]  # shards split at a document start
    shards = [train[:cut], train[cut:]]
    shards[leak_shard] = np.concatenate(docs[kept_val_docs:] + [shards[leak_shard]])
    for i, s in enumerate(shards):
        write_shard(os.path.join(dest, f"fineweb_train_{i:06d}.bin"), s)
    return {**sample, "DATA_PATH": str(dest)}, len(docs) - kept_val_docs


def checked(data, **over):
    hp = tiny_hp(**data, **over)
    return hp, T.check_split(hp, T.list_shards(hp.data_path, "train"), 1)


def test_clean_sample_has_no_overlap_and_all_tokens_scanned(sample):
    hp, c = checked(sample, VAL_OVERLAP_SCAN_TOKENS=0)
    assert c.val_docs == 40 and c.val_docs_in_train == 0 and c.leaks == {} and c.train_shards == 1
    assert c.scanned_tokens == c.train_tokens == T.read_shard_header(os.path.join(hp.data_path, "fineweb_train_000000.bin"))
    lines = []
    T.enforce_split(c, hp, lines.append)
    assert "val_docs_in_train:0" in lines[0] and any("not the canonical split" in s for s in lines)


@pytest.mark.parametrize("leak_shard", [0, 1])
def test_leaky_split_is_found_and_the_shard_named(sample, tmp_path, leak_shard):
    data, leaked = leaky_copy(sample, tmp_path / "leaky", leak_shard=leak_shard)
    hp, c = checked(data, VAL_OVERLAP_SCAN_TOKENS=0)
    shard = f"fineweb_train_{leak_shard:06d}.bin"
    assert c.val_docs == 40 and c.val_docs_in_train == leaked == 30 and c.leaks == {shard: leaked}
    with pytest.raises(T.ConfigError, match=f"30 of 40 validation documents.*{shard}") as e:
        T.enforce_split(c, hp, lambda s: None)
    assert shard in str(e.value) and "ALLOW_VAL_OVERLAP=1" in str(e.value)


def test_document_key_is_length_and_first_tokens():
    rng = np.random.default_rng(0)
    body = rng.integers(2, 1000, 60)

    def key(*docs):  # keys of the documents of the stream [BOS, doc, BOS, doc, ...]
        stream = np.concatenate([np.concatenate([[1], d]) for d in docs]).astype(np.uint16)
        starts = np.flatnonzero(stream == 1)
        return list(T.document_keys(stream, starts, np.append(starts[1:], len(stream))))
    base = key(body)[0]
    assert key(body[:40], body)[1] == base                      # position in the stream does not matter
    assert key(body[:59])[0] != base                            # same start, other length: another document
    late = body.copy()
    late[T.VAL_KEY_TOKENS + 5] += 1
    assert key(late)[0] == base                                 # only the first VAL_KEY_TOKENS tokens are read
    early = body.copy()
    early[T.VAL_KEY_TOKENS - 1] += 1
    assert key(early)[0] != base
    assert len(key(body[:T.VAL_KEY_TOKENS - 1], body)) == 1      # too short to key: not counted either way


def test_sampled_mode_scans_only_each_shards_head(sample, tmp_path):
    data, _ = leaky_copy(sample, tmp_path / "leaky", leak_shard=1)
    _, head = checked(data, VAL_OVERLAP_SCAN_TOKENS=20_000)
    sizes = [T.read_shard_header(f) for f in T.list_shards(data["DATA_PATH"], "train")]
    assert head.scanned_tokens == 2 * 20_000 and head.train_tokens == sum(sizes)
    assert 0 < head.val_docs_in_train < 30 and list(head.leaks) == ["fineweb_train_000001.bin"]
    with pytest.raises(T.ConfigError, match="fineweb_train_000001.bin"):  # judged against the scanned share
        T.enforce_split(head, tiny_hp(**data), lambda s: None)


def test_allow_val_overlap_warns_and_goes_on(sample, tmp_path):
    data, _ = leaky_copy(sample, tmp_path / "leaky")
    hp, c = checked(data, ALLOW_VAL_OVERLAP=1, VAL_OVERLAP_SCAN_TOKENS=0)
    lines = []
    T.enforce_split(c, hp, lines.append)
    assert any(s.startswith("WARNING: ALLOW_VAL_OVERLAP=1: 30 of 40") for s in lines)


def test_a_few_duplicates_under_the_tolerance_warn_and_go_on(sample, tmp_path, monkeypatch):
    """A leak at or below VAL_OVERLAP_TOLERANCE (cross-crawl duplicates) is named in a warning, not a stop."""
    data, leaked = leaky_copy(sample, tmp_path / "leaky")
    hp, c = checked(data, VAL_OVERLAP_SCAN_TOKENS=0)
    monkeypatch.setattr(T, "VAL_OVERLAP_TOLERANCE", 1.0)
    lines = []
    T.enforce_split(c, hp, lines.append)
    assert any(s.startswith(f"WARNING: {leaked} validation document(s)") and "fineweb_train_000000.bin" in s
               for s in lines)


def test_canonical_flag_needs_all_three_counts(sample, monkeypatch):
    hp, c = checked(sample)
    monkeypatch.setitem(T.CANONICAL_SPLITS, (1024, False), (1, 40, c.val_targets))
    assert T.check_split(hp, T.list_shards(hp.data_path, "train"), 1).canonical
    for wrong in [(2, 40, c.val_targets), (1, 41, c.val_targets), (1, 40, c.val_targets + T.CANONICAL_VAL_UNIT)]:
        monkeypatch.setitem(T.CANONICAL_SPLITS, (1024, False), wrong)
        assert not T.check_split(hp, T.list_shards(hp.data_path, "train"), 1).canonical
    assert c.val_targets % T.CANONICAL_VAL_UNIT == 0 and c.val_targets > 0


def test_canonical_counts_are_the_documented_ones():
    # docs/record_settings.md: CaseOps sp8192 80 shards / 50,000 docs / 47,851,520 tokens; sp1024 62,021,632
    assert T.CANONICAL_SPLITS[(8192, True)] == (80, 50_000, 47_851_520)
    assert T.CANONICAL_SPLITS[(1024, False)][1:] == (50_000, 62_021_632)
    assert 47_851_520 % T.CANONICAL_VAL_UNIT == 0 and 62_021_632 % T.CANONICAL_VAL_UNIT == 0


def test_leaky_run_stops_at_start_up_and_writes_no_artifact(sample, tmp_path):
    data, _ = leaky_copy(sample, tmp_path / "leaky")
    env = {**os.environ, **TINY, **data, "ARTIFACT_DIR": str(tmp_path / "art"), "RUN_ID": "leak",
           "VAL_OVERLAP_SCAN_TOKENS": "0", "ITERATIONS": "2", "MAX_WALLCLOCK_SECONDS": "0"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "fineweb_train_000000.bin" in err[0] and "30 of 40 validation documents" in err[0]
    assert "Traceback" not in p.stderr and "model_params:" not in p.stdout  # stopped before the model was built
    assert "split_check: val_docs:40 val_docs_in_train:30" in p.stdout
    written = {f for _, _, fs in os.walk(tmp_path / "art") for f in fs}
    assert written <= {"log.txt"} and not written & {"final_model.ptz", "prequant_model.pt", "run_record.json"}
