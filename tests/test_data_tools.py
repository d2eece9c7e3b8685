"""Data tooling: CaseOps, offline sample builder, retokenizer, HF downloader (against a local fake hub)."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import subprocess
import sys
import threading

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")
for p in (REPO, DATA):
    if p not in sys.path:
        sys.path.insert(0, p)

import caseops  # noqa: E402
import train_gpt  # noqa: E402
from conftest import HANG_TIMEOUT_S  # noqa: E402

PY = sys.executable
WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will can more other "
         "NASA iPhone McDonald HTML OK Paris London Python JSON camelCase XMLHttpRequest café naïve 2024 3.14 "
         "日本語 emoji 🙂 über Straße").split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = []
        for _ in range(rng.randint(2, 12)):
            w = [rng.choice(WORDS) for _ in range(rng.randint(3, 18))]
            w[0] = w[0].capitalize()
            sents.append(" ".join(w) + rng.choice([".", "!", "?", ",\n", ".\n\n"]))
        docs.append(f"Doc {i}: " + " ".join(sents))
    return docs


def write_jsonl(path: str, docs: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def tree_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# ------------------------------------------------------------------------------------------------
# CaseOps
# ------------------------------------------------------------------------------------------------

def _random_text(rng: random.Random, n: int, surrogates: bool = True) -> str:
    pools = ["abcXYZ", "AaBbQq", " \t\n", "".join(caseops.CONTROLS), "éÉßİıǅﬁ€", "0123.,-_", "\U0001F642\U00010348"]
    chars = []
    for _ in range(n):
        r = rng.random()
        if r < 0.85:
            chars.append(rng.choice(rng.choice(pools)))
        elif r < 0.95 or not surrogates:
            chars.append(chr(rng.randint(0, 0xD7FF)))
        else:
            chars.append(chr(rng.randint(0xD800, 0x10FFFF)))
    return "".join(chars)


def test_caseops_examples():
    T, A, C, E = caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT, caseops.ESC
    assert (T, A, C, E) == ("\ue001", "\ue002", "\ue003", "\ue004")
    assert caseops.encode("hello") == "hello"
    assert caseops.encode("Hello") == T + "hello"
    assert caseops.encode("NASA") == A + "nasa"
    assert caseops.encode("A") == T + "a"
    assert caseops.encode("iPhone") == "i" + C + "phone"
    assert caseops.encode("McDonald") == T + "mc" + C + "donald"
    assert caseops.encode("x\ue001y") == "x" + E + "\ue001y"
    assert caseops.encode("Été 42") == "Été 42"  # non-ASCII letters untouched


def test_caseops_bijective_random_and_adversarial():
    rng = random.Random(1234)
    cases = ["", "\ue004", "\ue004\ue004", "\ue001a", "\ue002AB", "A\ue003b", "AB\ue001cd", "\ue003", "aB\ue004",
             "".join(caseops.CONTROLS) * 3, "ABC" + "\ue004" + "DEF", "x" * 1000 + "Y", "\ud800\udfff", "İstanbul"]
    cases += [_random_text(rng, rng.randint(0, 200)) for _ in range(3000)]
    seen = {}
    for s in cases:
        e = caseops.encode(s)
        assert caseops.decode(e) == s, repr(s)
        assert not any(c.isupper() and c.isascii() for c in e)
        assert seen.setdefault(e, s) == s  # injective
    # decode(encode) is also the identity on already-transformed text (it just gets escaped again)
    for s in cases[:200]:
        assert caseops.decode(caseops.encode(caseops.encode(s))) == caseops.encode(s)


@pytest.fixture(scope="module")
def caseops_sp(tmp_path_factory):
    import shard_tools
    d = tmp_path_factory.mktemp("cosp")
    texts = make_docs(300, 5)
    sents = shard_tools.training_sentences(texts, None, caseops.encode)
    settings = shard_tools.sp_trainer_settings(400, list(caseops.CONTROLS))
    model = shard_tools.train_sentencepiece(sents, str(d / "co"), settings)
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=model)


def test_caseops_tokenizer_layout_and_sidecar_bytes(caseops_sp):
    sp = caseops_sp
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", *caseops.CONTROLS]
    assert sp.piece_to_id("<0x00>") == 8 and sp.piece_to_id("<0xFF>") == 263
    rng = random.Random(7)
    texts = make_docs(30, 9) + [_random_text(rng, rng.randint(1, 300), surrogates=False) for _ in range(300)]
    texts += ["  lots   of\n\n spaces  ", "ﬁne Ｆull ①", "\ue004\ue001X\ue004", "é" * 50, "A"]
    for text in texts:
        t = caseops.encode(text)
        ids = sp.encode(t)
        counts = caseops.token_original_bytes(sp, t, ids)
        assert len(counts) == len(ids) and (counts >= 0).all()
        if text.strip():
            assert int(counts.sum()) == len(text.encode("utf-8")), repr(text)
    # the spec's surface walk agrees where the normalizer leaves the text alone
    for text in make_docs(20, 11):
        text = " ".join(text.split())
        t = caseops.encode(text)
        if sp.normalize(t) != t.replace(" ", "\u2581"):
            continue
        ids = sp.encode(t)
        walk = caseops.piece_byte_counts([sp.id_to_piece(i) for i in ids])
        assert walk == caseops.token_original_bytes(sp, t, ids).tolist()
        assert sum(walk) == len(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# Retokenizer
# ------------------------------------------------------------------------------------------------

SPECS = {"tokenizer_specs": [
    {"name": "sp_bpe_384", "dataset_suffix": "sp384", "vocab_size": 384},
    {"name": "sp_bpe_384_caseops", "dataset_suffix": "sp384_lossless_caps_caseops_v1_reserved", "vocab_size": 384,
     "text_transform": "lossless_caps_caseops_v1", "reserve_text_transform_controls": True,
     "model_prefix": "fineweb_384_bpe_lossless_caps_caseops_v1_reserved"}]}
NUM_DOCS, NUM_VAL = 240, 40


def _retok(out_root, docs_path, specs_path, workers, extra=()):
    import download_hf_docs_and_tokenize as rt
    argv = ["--docs-jsonl", docs_path, "--output-root", str(out_root), "--tokenizer-specs", specs_path,
            "--num-val-docs", str(NUM_VAL), "--chunk-tokens", "20000", "--workers", str(workers),
            "--batch-docs", "16", "--allow-few-val-docs", *extra]
    assert rt.main(argv) == 0


@pytest.fixture(scope="module")
def retok(tmp_path_factory):
    d = tmp_path_factory.mktemp("retok")
    docs = make_docs(NUM_DOCS, 3)
    docs_path = write_jsonl(str(d / "docs_selected.jsonl"), docs)
    specs_path = str(d / "specs.json")
    with open(specs_path, "w") as f:
        json.dump(SPECS, f)
    _retok(d / "a", docs_path, specs_path, workers=2)
    _retok(d / "b", docs_path, specs_path, workers=1)
    return {"dir": d, "docs": docs, "docs_path": docs_path, "a": str(d / "a"), "b": str(d / "b")}


def test_retokenizer_deterministic(retok):
    a, b = tree_bytes(retok["a"]), tree_bytes(retok["b"])
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], k


def test_retokenizer_manifest_split_and_bos(retok):
    import sentencepiece as spm
    root = retok["a"]
    man = json.load(open(os.path.join(root, "manifest.json")))
    for key in ("version", "num_docs", "num_val_docs", "shuffle_seed", "shard_size", "append_eos", "docs_jsonl",
                "docs_meta", "tokenizer_specs", "tokenizers", "datasets"):
        assert key in man
    assert man["num_docs"] == NUM_DOCS and man["num_val_docs"] == NUM_VAL and man["append_eos"] is False
    assert man["docs_meta"]["docs_sha256"] == hashlib.sha256(open(retok["docs_path"], "rb").read()).hexdigest()
    assert [d["name"] for d in man["datasets"]] == ["fineweb10B_sp384", "fineweb10B_sp384_lossless_caps_caseops_v1_reserved"]
    for ds, tok in zip(man["datasets"], man["tokenizers"]):
        path = os.path.join(root, ds["path"])
        st = ds["stats"]
        assert st["docs_val"] == NUM_VAL and st["docs_train"] == NUM_DOCS - NUM_VAL
        assert tok["trainer_settings"]["normalization_rule_name"] == "nmt_nfkc"
        assert tok["model_sha256"] == hashlib.sha256(open(os.path.join(root, tok["model_path"]), "rb").read()).hexdigest()
        val, train = train_gpt.list_shards(path, "val"), train_gpt.list_shards(path, "train")
        assert len(val) == st["files_val"] and len(train) == st["files_train"] >= 2
        for f in ds["files"]:
            fp = os.path.join(path, f["name"])
            assert train_gpt.read_shard_header(fp) == f["tokens"] and os.path.getsize(fp) == f["bytes"]
            assert hashlib.sha256(open(fp, "rb").read()).hexdigest() == f["sha256"]
        v = np.concatenate([train_gpt.load_shard(f, mmap=False) for f in val])
        t = np.concatenate([train_gpt.load_shard(f, mmap=False) for f in train])
        assert v.size == st["tokens_val"] and t.size == st["tokens_train"]
        assert v[0] == 1 and t[0] == 1  # every split starts on a doc boundary
        assert (v == 1).sum() == NUM_VAL and (t == 1).sum() == NUM_DOCS - NUM_VAL
        assert not (v == 2).any() and not (t == 2).any()  # no EOS
        sp = spm.SentencePieceProcessor(model_file=os.path.join(root, tok["model_path"]))
        bos = np.flatnonzero(t == 1)
        co = "caseops" in ds["name"]
        for k in (0, 7, len(bos) - 1):
            end = bos[k + 1] if k + 1 < len(bos) else t.size
            text = retok["docs"][NUM_VAL + k]
            src = caseops.encode(text) if co else text
            assert sp.decode(t[bos[k] + 1:end].tolist()) == sp.decode(sp.encode(src))
            assert sp.decode(t[bos[k] + 1:end].tolist()).replace(" ", "") == sp.normalize(src).replace("\u2581", "")
        if co:
            assert ds["val_bytes_glob"].endswith("fineweb_val_bytes_*.bin")
            side = np.concatenate([train_gpt.load_shard(f, mmap=False) for f in
                                   sorted(glob_bytes(path))])
            assert side.size == v.size and (side[v == 1] == 0).all()
            assert int(side.sum()) == sum(len(d.encode("utf-8")) for d in retok["docs"][:NUM_VAL])
            vb = np.flatnonzero(v == 1)
            assert int(side[vb[3]:vb[4]].sum()) == len(retok["docs"][3].encode("utf-8"))
            assert caseops.decode(sp.decode(v[vb[3] + 1:vb[4]].tolist())).replace(" ", "") == \
                retok["docs"][3].replace(" ", "").replace("\n", "")


def glob_bytes(path):
    import glob
    return glob.glob(os.path.join(path, "fineweb_val_bytes_*.bin"))


# ------------------------------------------------------------------------------------------------
# Offline sample builder
# ------------------------------------------------------------------------------------------------

def _offline(out_root, docs_path, *extra):
    cmd = [PY, os.path.join(DATA, "build_offline_sample.py"), "--out-root", str(out_root), "--docs-jsonl",
           docs_path, "--vocab-size", "384", "--val-docs", "10", "--shard-tokens", "10000", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_offline_builder_deterministic_layout(tmp_path):
    docs_path = write_jsonl(str(tmp_path / "docs.jsonl"), make_docs(120, 21))
    out1 = _offline(tmp_path / "o1", docs_path, "--caseops")
    _offline(tmp_path / "o2", docs_path, "--caseops")
    a, b = tree_bytes(tmp_path / "o1"), tree_bytes(tmp_path / "o2")
    shards = [k for k in a if k.endswith(".bin") or k.endswith(".model") or k.endswith(".vocab")]
    assert {os.path.join("tokenizers", "offline_sample_384_bpe_caseops.model"),
            os.path.join("datasets", "offline_sample_sp384_caseops", "fineweb_val_000000.bin"),
            os.path.join("datasets", "offline_sample_sp384_caseops", "fineweb_val_bytes_000000.bin"),
            os.path.join("datasets", "offline_sample_sp384_caseops", "fineweb_train_000000.bin"),
            os.path.join("datasets", "offline_sample_sp384_caseops", "fineweb_train_000001.bin")} <= set(shards)
    for k in shards:
        assert a[k] == b[k], k
    assert "val 10 docs" in out1
    again = _offline(tmp_path / "o1", docs_path, "--caseops")
    assert "already built" in again
    ds = tmp_path / "o1" / "datasets" / "offline_sample_sp384_caseops"
    v = train_gpt.load_shard(str(ds / "fineweb_val_000000.bin"))
    assert v[0] == 1 and (v == 1).sum() == 10
    plain = _offline(tmp_path / "o1", docs_path)
    assert "offline_sample_sp384" in plain and (tmp_path / "o1" / "tokenizers" / "offline_sample_384_bpe.model").exists()


# ------------------------------------------------------------------------------------------------
# Downloader against a local fake hub
# ------------------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves {repo_id: {path: bytes}} on the `/datasets/<repo>/resolve/<rev>/<path>` routes."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _route(self, body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].split("/")
                # ['', 'datasets', owner, name, 'resolve', rev, *path]
                if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
                    return self._err(404, "RepoNotFound", "no such route")
                repo, rel = f"{parts[2]}/{parts[3]}", "/".join(parts[6:])
                if repo not in hub.repos:
                    return self._err(404, "RepoNotFound", f"Repository {repo} not found")
                data = hub.repos[repo].get(rel)
                if data is None:
                    return self._err(404, "EntryNotFound", f"{rel} does not exist")
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                    status = 206
                chunk = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest()[:32])
                self.send_header("X-Repo-Commit", COMMIT)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(chunk)

            def _err(self, code, err, msg):
                self.send_response(code)
                self.send_header("X-Error-Code", err)
                self.send_header("X-Error-Message", msg)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._route(False)

            def do_GET(self):
                self._route(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def hub_repo_from_build(root: str, prefix: str = "datasets") -> dict[str, bytes]:
    return {f"{prefix}/{k.replace(os.sep, '/')}": v for k, v in tree_bytes(root).items()
            if k.endswith((".bin", ".model", ".vocab", "manifest.json"))}


@pytest.fixture(scope="module")
def hub(retok):
    repo = hub_repo_from_build(retok["a"])
    with FakeHub({"test/pg": repo}) as h:
        yield h, repo


def _download(hub_url, tmp, *args, env_extra=None, allow_few=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MATCHED_FINEWEB"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(tmp / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    env.update(env_extra or {})
    cmd = [PY, os.path.join(DATA, "cached_challenge_fineweb.py"), "--repo-id", "test/pg",
           "--out-root", str(tmp / "data"), *(["--allow-few-val-docs"] if allow_few else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S)


def test_downloader_full_partial_resume(hub, tmp_path, retok):
    h, repo = hub
    r = _download(h.url, tmp_path, "--variant", "sp384", "--train-shards", "1")
    assert r.returncode == 0, r.stderr + r.stdout
    ds = tmp_path / "data" / "datasets" / "fineweb10B_sp384"
    assert sorted(os.listdir(ds)) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert (tmp_path / "data" / "tokenizers" / "fineweb_384_bpe.model").read_bytes() == \
        repo["datasets/tokenizers/fineweb_384_bpe.model"]
    assert (tmp_path / "data" / "manifest.json").exists()
    assert not (tmp_path / "data" / ".download_staging").exists()

    # full download (all listed train shards) resumes: present files skipped, a truncated one re-fetched
    n_train = len([k for k in repo if "fineweb10B_sp384/fineweb_train_" in k])
    with open(ds / "fineweb_val_000000.bin", "r+b") as f:
        f.truncate(2000)
    before = len(h.requests)
    r = _download(h.url, tmp_path, "--variant", "sp384")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "incomplete" in r.stdout and "present, skipped" in r.stdout
    got = sorted(os.listdir(ds))
    assert len([g for g in got if g.startswith("fineweb_train_")]) == n_train
    for g in got:
        assert (ds / g).read_bytes() == repo[f"datasets/datasets/fineweb10B_sp384/{g}"]
    fetched = [p for m, p in h.requests[before:] if m == "GET"]
    assert not any("fineweb_train_000000" in p for p in fetched)  # skipped, not re-downloaded

    # CaseOps variant also gets the byte sidecar
    r = _download(h.url, tmp_path, "--variant", "sp384", "--caseops", "--train-shards", "0")
    assert r.returncode == 0, r.stderr + r.stdout
    co = tmp_path / "data" / "datasets" / "fineweb10B_sp384_lossless_caps_caseops_v1_reserved"
    assert sorted(os.listdir(co)) == ["fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]


def test_downloader_errors(hub, tmp_path):
    h, repo = hub
    r = _download(h.url, tmp_path, "--variant", "sp999")
    assert r.returncode == 2 and "unknown variant" in r.stderr and "sp384" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    r = _download(h.url, tmp_path / "x", "--variant", "sp384", "--repo-id", "nobody/none")
    assert r.returncode == 2 and "not found" in r.stderr

    missing = "datasets/datasets/fineweb10B_sp384/fineweb_train_000001.bin"
    saved = repo.pop(missing)
    try:
        r = _download(h.url, tmp_path / "y", "--variant", "sp384", "--train-shards", "2")
    finally:
        repo[missing] = saved
    assert r.returncode == 2 and "fineweb_train_000001.bin" in r.stderr and "not found" in r.stderr

    r = _download(h.url, tmp_path / "z", "--variant", "sp384", env_extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "build_offline_sample.py" in r.stderr


def test_downloader_refuses_a_split_with_few_validation_docs(hub, tmp_path):
    r = _download(hub[0].url, tmp_path, "--variant", "sp384", allow_few=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"has {NUM_VAL} validation documents, fewer than the challenge's 50,000" in r.stderr
    assert "--allow-few-val-docs" in r.stderr and not (tmp_path / "data" / "datasets").exists()


def test_retokenizer_refuses_a_split_with_few_validation_docs(retok, tmp_path, capsys):
    import download_hf_docs_and_tokenize as rt
    argv = ["--docs-jsonl", retok["docs_path"], "--output-root", str(tmp_path), "--num-val-docs", str(NUM_VAL)]
    assert rt.main(argv) == 2
    err = capsys.readouterr().err
    assert f"has {NUM_VAL} validation documents, fewer than the challenge's 50,000" in err and "--allow-few-val-docs" in err
    assert not (tmp_path / "datasets").exists() and not (tmp_path / "manifest.json").exists()
