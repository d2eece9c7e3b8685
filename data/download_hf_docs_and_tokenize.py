#!/usr/bin/env python3
"""Rebuild tokenizers + shards from the frozen FineWeb document list (spec §1.3).

    python data/download_hf_docs_and_tokenize.py --only sp1024                 # docs from the HF repo
    python data/download_hf_docs_and_tokenize.py --docs-jsonl docs.jsonl --only sp8192 --workers 16
    python data/download_hf_docs_and_tokenize.py --caseops                     # the CaseOps sp8192 spec(s)

Docs: --docs-jsonl PATH, else `<remote-root>/docs_selected.jsonl` (+ `docs_selected.source_manifest.json`)
from dataset repo MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf), root
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default `datasets`), linked into --output-root.
Specs: data/tokenizer_specs.json (--tokenizer-specs); --only picks specs by name or dataset suffix.
Per spec: train SentencePiece BPE (or reuse one, --reuse-sp-model V=PATH), tokenize all docs in parallel in
file order ([BOS] + tokens, no EOS; the first --num-val-docs docs are val), write --chunk-tokens shards to
<output-root>/datasets/fineweb10B_<suffix>/, and record everything in <output-root>/manifest.json
(docs sha256, per-shard tokens/bytes/sha256, tokenizer settings and sha256) so a rebuild can be verified.
Re-running gives byte-identical shards. Specs with `text_transform: lossless_caps_caseops_v1` also get the
`fineweb_val_bytes_*` byte sidecar.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, DATA_DIR)
import caseops  # noqa: E402
import shard_tools  # noqa: E402
from cached_challenge_fineweb import (CANONICAL_VAL_DOCS, DEFAULT_REMOTE_ROOT, DEFAULT_REPO_ID,  # noqa: E402
                                      DownloadError, few_val_docs_error, hub_fetch, remote_path)

DEFAULT_NUM_VAL_DOCS = CANONICAL_VAL_DOCS
SHARD_SIZE = 10**8
BYTE_SPEC_KIND = "byte"


def fetch_docs(repo_id: str, remote_root: str, output_root: str) -> tuple[str, str | None]:
    """Download docs_selected.jsonl (+ optional sidecar) and link them into output_root."""
    staging = os.path.join(output_root, ".download_staging")
    out = []
    for name, optional in (("docs_selected.jsonl", False), ("docs_selected.source_manifest.json", True)):
        dest = os.path.join(output_root, name)
        if os.path.isfile(dest):
            out.append(dest)
            continue
        try:
            staged = hub_fetch(repo_id, remote_path(remote_root, name), staging)
        except DownloadError:
            if optional:
                out.append(None)
                continue
            raise
        os.makedirs(output_root, exist_ok=True)
        try:
            os.link(staged, dest)
        except OSError:
            shutil.copyfile(staged, dest)
        out.append(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return out[0], out[1]


def load_specs(path: str, only: list[str] | None, caseops_only: bool) -> list[dict]:
    with open(path) as f:
        raw = json.load(f)
    specs = raw["tokenizer_specs"] if isinstance(raw, dict) else raw
    if caseops_only:
        specs = [s for s in specs if s.get("text_transform")]
    if only:
        chosen = [s for s in specs if s.get("name") in only or s.get("dataset_suffix") in only]
        missing = [o for o in only if not any(o in (s.get("name"), s.get("dataset_suffix")) for s in specs)]
        if missing:
            names = ", ".join(s.get("dataset_suffix", s.get("name", "?")) for s in specs)
            raise SystemExit(f"error: unknown spec(s) {', '.join(missing)}; known: {names}")
        specs = chosen
    if not specs:
        raise SystemExit(f"error: no tokenizer spec selected from {path}")
    return specs


def build_spec(spec: dict, *, docs_path: str, num_val: int, args, output_root: str) -> tuple[dict, dict]:
    """Train/reuse the tokenizer and write the shards of one spec; return (tokenizer entry, dataset entry)."""
    V = int(spec["vocab_size"])
    kind = spec.get("kind", "sentencepiece_bpe")
    transform = spec.get("text_transform")
    if transform not in (None, caseops.TRANSFORM_NAME):
        raise SystemExit(f"error: spec {spec['name']}: unknown text_transform {transform!r}")
    co = transform == caseops.TRANSFORM_NAME
    suffix = spec.get("dataset_suffix") or f"sp{V}"
    ds_name = f"fineweb10B_{suffix}"
    ds_dir = os.path.join(output_root, "datasets", ds_name)
    tok_dir = os.path.join(output_root, "tokenizers")
    os.makedirs(tok_dir, exist_ok=True)
    t0 = time.time()
    tok = {"name": spec["name"], "kind": kind, "vocab_size": V, "bos_id": shard_tools.BOS_ID,
           "eos_id": shard_tools.EOS_ID, "recommended_bigram_vocab_size": shard_tools.recommended_bigram_vocab_size(V),
           "source_spec": spec}
    if co:
        tok["text_transform"] = transform
        tok["reserve_text_transform_controls"] = bool(spec.get("reserve_text_transform_controls", True))
    if kind == BYTE_SPEC_KIND:
        if V != 256 + shard_tools.BYTE_OFFSET:
            raise SystemExit(f"error: spec {spec['name']}: a byte tokenizer has vocab {256 + shard_tools.BYTE_OFFSET}")
        cfg = os.path.join(tok_dir, spec.get("model_prefix", f"fineweb_pure_byte_{V}") + ".json")
        with open(cfg, "w") as f:
            json.dump({"kind": "byte", "vocab_size": V, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3,
                       "byte_offset": shard_tools.BYTE_OFFSET}, f, indent=1)
        model_path = None
        tok.update(path=os.path.relpath(cfg, output_root), pad_id=0, unk_id=3,
                   sha256=shard_tools.sha256_file(cfg), bytes=os.path.getsize(cfg))
    else:
        prefix = os.path.join(tok_dir, spec.get("model_prefix") or f"fineweb_{V}_bpe")
        reuse = dict(r.split("=", 1) for r in args.reuse_sp_model or [])
        if str(V) in reuse:
            shutil.copyfile(reuse[str(V)], prefix + ".model")
            vocab_src = os.path.splitext(reuse[str(V)])[0] + ".vocab"
            if os.path.isfile(vocab_src):
                shutil.copyfile(vocab_src, prefix + ".vocab")
            settings, n_sent = {"reused_from": os.path.abspath(reuse[str(V)])}, 0
            print(f"[{spec['name']}] reusing tokenizer {reuse[str(V)]}", flush=True)
        else:
            symbols = list(caseops.CONTROLS) if co and tok.get("reserve_text_transform_controls") else []
            settings = shard_tools.sp_trainer_settings(V, symbols, spec.get("trainer_overrides"),
                                                       num_threads=args.sp_threads)
            train_docs = args.tokenizer_train_docs or spec.get("tokenizer_train_docs")
            texts = shard_tools.iter_jsonl_texts(docs_path, int(train_docs) if train_docs else None)
            sentences = shard_tools.training_sentences(texts, args.max_tokenizer_sentences,
                                                       caseops.encode if co else None)
            n_sent = len(sentences)
            print(f"[{spec['name']}] training SentencePiece BPE V={V} on {n_sent:,} lines", flush=True)
            shard_tools.train_sentencepiece(sentences, prefix, settings)
            del sentences
        model_path = prefix + ".model"
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=model_path)
        if sp.vocab_size() != V:
            print(f"[{spec['name']}] warning: tokenizer has {sp.vocab_size()} pieces, spec asked for {V}",
                  flush=True)
        tok.update(model_path=os.path.relpath(model_path, output_root),
                   vocab_path=os.path.relpath(prefix + ".vocab", output_root),
                   model_sha256=shard_tools.sha256_file(model_path), model_bytes=os.path.getsize(model_path),
                   trainer_settings=settings, training_sentences=n_sent)
        if os.path.isfile(prefix + ".vocab"):
            tok.update(vocab_sha256=shard_tools.sha256_file(prefix + ".vocab"),
                       vocab_bytes=os.path.getsize(prefix + ".vocab"))
    t_tok = time.time() - t0
    print(f"[{spec['name']}] tokenizing -> {ds_dir} ({args.workers} workers)", flush=True)
    stats = shard_tools.tokenize_to_shards(
        shard_tools.iter_jsonl_texts(docs_path), model_path=model_path, out_dir=ds_dir, num_val_docs=num_val,
        shard_tokens=args.chunk_tokens, caseops_on=co, write_val_bytes=co, workers=args.workers,
        batch_docs=args.batch_docs, max_train_shards=args.max_train_shards, progress_every=args.progress_every)
    files = stats.pop("files")
    secs = stats.pop("seconds")
    stats.pop("truncated_at_max_train_shards", None)
    ds = {"name": ds_name, "tokenizer_name": spec["name"], "tokenizer_kind": kind,
          "path": os.path.relpath(ds_dir, output_root), "train_glob": f"{os.path.relpath(ds_dir, output_root)}/fineweb_train_*.bin",
          "val_glob": f"{os.path.relpath(ds_dir, output_root)}/fineweb_val_*.bin", "vocab_size": V,
          "bos_id": shard_tools.BOS_ID, "eos_id": shard_tools.EOS_ID,
          "recommended_bigram_vocab_size": shard_tools.recommended_bigram_vocab_size(V), "stats": stats,
          "files": files}
    if co:
        ds["val_bytes_glob"] = f"{os.path.relpath(ds_dir, output_root)}/fineweb_val_bytes_*.bin"
    print(f"[{spec['name']}] val {stats['docs_val']:,} docs / {stats['tokens_val']:,} tokens, train "
          f"{stats['docs_train']:,} docs / {stats['tokens_train']:,} tokens, {stats['files_total']} shards; "
          f"tokenizer {t_tok:.1f}s, tokenize {secs:.1f}s ({stats['tokens_total'] / max(secs, 1e-9):,.0f} tok/s)",
          flush=True)
    return tok, ds


def write_manifest(output_root: str, header: dict, toks: list[dict], dss: list[dict], specs: list[dict]) -> str:
    """Merge into <output_root>/manifest.json (entries of the same name are replaced)."""
    path = os.path.join(output_root, "manifest.json")
    old = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if old.get("docs_meta", {}).get("docs_sha256") != header["docs_meta"]["docs_sha256"]:
            old = {}  # built from other docs: start over
    def merge(key, new):
        names = {e["name"] for e in new}
        return [e for e in old.get(key, []) if e.get("name") not in names] + new
    man = dict(header)
    man["tokenizer_specs"] = merge("tokenizer_specs", specs)
    man["tokenizers"] = merge("tokenizers", toks)
    man["datasets"] = merge("datasets", dss)
    with open(path + ".tmp", "w") as f:
        json.dump(man, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs-jsonl", default=None, help="local docs JSONL (default: download from the HF repo)")
    ap.add_argument("--output-root", "--out-root", dest="output_root", default=DATA_DIR)
    ap.add_argument("--tokenizer-specs", default=os.path.join(DATA_DIR, "tokenizer_specs.json"))
    ap.add_argument("--only", default=None, help="comma list of spec names or dataset suffixes (default: all)")
    ap.add_argument("--caseops", action="store_true", help="build only the CaseOps (text_transform) specs")
    ap.add_argument("--num-val-docs", type=int, default=None,
                    help=f"validation docs (default: sidecar docs_val, else {DEFAULT_NUM_VAL_DOCS})")
    ap.add_argument("--allow-few-val-docs", action="store_true",
                    help=f"write a split with fewer than {CANONICAL_VAL_DOCS:,} validation documents")
    ap.add_argument("--chunk-tokens", type=int, default=SHARD_SIZE, help="tokens per shard")
    ap.add_argument("--max-train-shards", type=int, default=None)
    ap.add_argument("--workers", type=int,
                    default=int(os.environ.get("MATCHED_FINEWEB_TOKENIZER_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--batch-docs", type=int, default=int(os.environ.get("MATCHED_FINEWEB_SP_BATCH_SIZE", 1024)))
    ap.add_argument("--sp-threads", type=int, default=1,
                    help="SentencePiece trainer threads (1 = bit-reproducible tokenizer)")
    ap.add_argument("--tokenizer-train-docs", type=int, default=None, help="train the tokenizer on the first N docs")
    ap.add_argument("--max-tokenizer-sentences", type=int, default=None,
                    help="cap on tokenizer training lines (first N non-empty lines)")
    ap.add_argument("--reuse-sp-model", action="append", metavar="V=PATH", help="copy this model instead of training")
    ap.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    args = ap.parse_args(argv)
    t0 = time.time()
    output_root = os.path.abspath(args.output_root)
    os.makedirs(output_root, exist_ok=True)
    repo_id = os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID)
    remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)

    sidecar_path = None
    if args.docs_jsonl:
        docs_path = os.path.abspath(args.docs_jsonl)
        cand = os.path.join(os.path.dirname(docs_path), "docs_selected.source_manifest.json")
        sidecar_path = cand if os.path.isfile(cand) and os.path.basename(docs_path) == "docs_selected.jsonl" else None
        remote = {"remote_repo_id": None, "remote_root": None}
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            docs_path, sidecar_path = fetch_docs(repo_id, remote_root, output_root)
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        remote = {"remote_repo_id": repo_id, "remote_root": remote_root}
    if not os.path.isfile(docs_path):
        print(f"error: {docs_path}: no such docs file", file=sys.stderr)
        return 2
    sidecar = {}
    if sidecar_path:
        with open(sidecar_path) as f:
            sidecar = json.load(f)
    specs = load_specs(args.tokenizer_specs, args.only.split(",") if args.only else None, args.caseops)

    docs_sha = shard_tools.sha256_file(docs_path)
    if sidecar.get("docs_sha256") and sidecar["docs_sha256"] != docs_sha:
        print(f"error: {docs_path}: sha256 {docs_sha} != sidecar docs_sha256 {sidecar['docs_sha256']}",
              file=sys.stderr)
        return 2
    num_docs = sum(1 for _ in shard_tools.iter_jsonl_texts(docs_path))
    num_val = args.num_val_docs if args.num_val_docs is not None else int(sidecar.get("docs_val", DEFAULT_NUM_VAL_DOCS))
    num_val = min(num_val, num_docs)
    if num_val < CANONICAL_VAL_DOCS and not args.allow_few_val_docs:
        print(f"error: {few_val_docs_error(num_val, f'the split of {docs_path} ({num_docs:,} docs)')}", file=sys.stderr)
        return 2
    print(f"docs: {docs_path} ({num_docs:,} docs, sha256 {docs_sha[:16]}...), val = first {num_val:,}", flush=True)

    toks, dss = [], []
    for spec in specs:
        tok, ds = build_spec(spec, docs_path=docs_path, num_val=num_val, args=args, output_root=output_root)
        toks.append(tok)
        dss.append(ds)
    rel_docs = os.path.relpath(docs_path, output_root)
    header = {"version": "10B", "num_docs": num_docs, "num_val_docs": num_val,
              "shuffle_seed": sidecar.get("shuffle_seed"), "shard_size": args.chunk_tokens, "append_eos": False,
              "docs_jsonl": rel_docs if not rel_docs.startswith("..") else docs_path,
              "docs_meta": dict(remote, num_docs=num_docs, docs_sha256=docs_sha,
                                source_manifest=sidecar or None,
                                **({"source_sidecar": os.path.relpath(sidecar_path, output_root)} if sidecar_path else {}))}
    path = write_manifest(output_root, header, toks, dss, specs)
    with open(os.path.join(output_root, "tokenizer_config.export.json"), "w") as f:
        json.dump({"tokenizer_specs": specs, "tokenizers": toks}, f, indent=1, sort_keys=True)
    print(f"manifest: {path}; done in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
