#!/usr/bin/env python3
"""Build a small REAL dataset in the official layout without any network access.

Text source: the Python standard library's own source files (one document per *.py file, sorted by
relative path; test folders, site-packages and files over --max-file-bytes skipped) plus the English help
topics of pydoc_data/topics.py (one document per topic), or a docs JSONL given with --docs-jsonl.
The documents are shuffled with a fixed seed; the first --val-docs are validation, the rest training.

Writes (V = --vocab-size, default 1024):
  <out-root>/tokenizers/offline_sample_<V>_bpe.model (+ .vocab)        [_caseops suffix with --caseops]
  <out-root>/datasets/offline_sample_sp<V>/fineweb_{val,train}_000000.bin (+ more train shards)
  <out-root>/datasets/offline_sample_sp<V>_caseops/... (+ fineweb_val_bytes_000000.bin) with --caseops
  build_info.json in the dataset folder (what was built, from what; used to skip rebuilds)

Deterministic for a given Python version: two builds give byte-identical shards and tokenizer.
Usage: python data/build_offline_sample.py [--vocab-size 1024] [--caseops] [--force]
Then: PRESET=cpu_smoke python train_gpt.py
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import caseops  # noqa: E402
import shard_tools  # noqa: E402

SHUFFLE_SEED = 1337
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TOPICS_REL = "pydoc_data/topics.py"


def stdlib_documents(max_file_bytes: int) -> tuple[list[tuple[str, str]], str]:
    """[(name, text)] from the standard library, in sorted relative-path order; and the stdlib dir."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if any(p in SKIP_DIRS for p in parts):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for fn in filenames:
            if fn.endswith(".py"):
                files.append("/".join(parts + [fn]))
    docs = []
    for rel in sorted(files):
        path = os.path.join(root, *rel.split("/"))
        if rel == TOPICS_REL:
            docs.extend(_topic_documents(path))
            continue
        if os.path.getsize(path) > max_file_bytes:
            continue
        try:
            with open(path, "r", encoding="utf-8", newline="") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((rel, text))
    return docs, root


def _topic_documents(path: str) -> list[tuple[str, str]]:
    """pydoc's help topics (real English prose): one document per topic string, sorted by topic."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
                topics = ast.literal_eval(node.value)
                return [(f"{TOPICS_REL}#{k}", v) for k, v in sorted(topics.items()) if v.strip()]
    except (OSError, SyntaxError, ValueError):
        pass
    return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out-root", default=os.path.dirname(os.path.abspath(__file__)),
                    help="folder that gets datasets/ and tokenizers/ (default: this repo's data/)")
    ap.add_argument("--docs-jsonl", default=None, help="use this docs JSONL ({\"text\": ...} per line) as the text")
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first N source documents")
    ap.add_argument("--val-docs", type=int, default=60, help="validation documents (after the shuffle)")
    ap.add_argument("--max-file-bytes", type=int, default=200_000, help="skip stdlib files larger than this")
    ap.add_argument("--shard-tokens", type=int, default=10_000_000, help="tokens per shard")
    ap.add_argument("--max-sentences", type=int, default=400_000,
                    help="tokenizer training: first N non-empty lines of the shuffled docs")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--caseops", action="store_true", help="apply the CaseOps transform; write the byte sidecar")
    ap.add_argument("--seed", type=int, default=SHUFFLE_SEED, help=argparse.SUPPRESS)
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    args = ap.parse_args(argv)
    t0 = time.time()

    V = args.vocab_size
    suffix = "_caseops" if args.caseops else ""
    tok_prefix = os.path.join(args.out_root, "tokenizers", f"offline_sample_{V}_bpe{suffix}")
    ds_dir = os.path.join(args.out_root, "datasets", f"offline_sample_sp{V}{suffix}")
    info_path = os.path.join(ds_dir, "build_info.json")

    if args.docs_jsonl:
        docs = [(f"{os.path.basename(args.docs_jsonl)}:{i}", t)
                for i, t in enumerate(shard_tokens_texts(args.docs_jsonl, args.max_docs))]
        source = {"kind": "docs_jsonl", "path": os.path.abspath(args.docs_jsonl),
                  "sha256": shard_tools.sha256_file(args.docs_jsonl)}
    else:
        docs, root = stdlib_documents(args.max_file_bytes)
        if args.max_docs is not None:
            docs = docs[:args.max_docs]
        source = {"kind": "python_stdlib", "python": sys.version.split()[0], "stdlib": root}
    if not docs:
        print("error: no source documents found", file=sys.stderr)
        return 2
    names_sha = hashlib.sha256("\n".join(n for n, _ in docs).encode("utf-8", "surrogatepass")).hexdigest()
    request = {"vocab_size": V, "caseops": args.caseops, "val_docs": args.val_docs, "max_docs": args.max_docs,
               "max_file_bytes": args.max_file_bytes, "shard_tokens": args.shard_tokens,
               "max_sentences": args.max_sentences, "seed": args.seed, "source": source,
               "doc_names_sha256": names_sha}

    if not args.force and os.path.isfile(info_path) and os.path.isfile(tok_prefix + ".model"):
        try:
            with open(info_path) as f:
                old = json.load(f)
            if old.get("request") == request and all(
                    os.path.isfile(os.path.join(ds_dir, r["name"])) for r in old.get("files", [])):
                print(f"offline sample already built: {ds_dir} (use --force to rebuild)")
                return 0
        except (OSError, ValueError):
            pass

    order = list(range(len(docs)))
    random.Random(args.seed).shuffle(order)
    texts = [docs[i][1] for i in order]
    num_val = min(args.val_docs, max(len(texts) - 1, 0))
    transform = caseops.encode if args.caseops else None
    sentences = shard_tools.training_sentences(texts, args.max_sentences, transform)
    symbols = list(caseops.CONTROLS) if args.caseops else []
    settings = shard_tools.sp_trainer_settings(V, symbols, num_threads=1)
    t1 = time.time()
    try:
        model_path = shard_tools.train_sentencepiece(sentences, tok_prefix, settings)
    except (RuntimeError, ValueError) as e:
        print(f"error: tokenizer training failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    t_tok = time.time() - t1
    stats = shard_tools.tokenize_to_shards(
        texts, model_path=model_path, out_dir=ds_dir, num_val_docs=num_val, shard_tokens=args.shard_tokens,
        caseops_on=args.caseops, workers=args.workers, batch_docs=32, progress_every=0)
    files = stats.pop("files")
    info = {"request": request, "tokenizer": {"model_path": os.path.abspath(model_path),
                                              "sha256": shard_tools.sha256_file(model_path),
                                              "trainer_settings": settings, "training_sentences": len(sentences)},
            "stats": {k: v for k, v in stats.items() if k != "seconds"}, "files": files}
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(info_path + ".tmp", info_path)
    print(f"offline sample ({source['kind']}): {stats['docs_total']} docs -> val {stats['docs_val']} docs / "
          f"{stats['tokens_val']:,} tokens, train {stats['docs_train']} docs / {stats['tokens_train']:,} tokens "
          f"in {stats['files_train']} train shard(s)")
    print(f"  tokenizer: {model_path} ({len(sentences):,} training lines, {t_tok:.1f}s)")
    print(f"  dataset:   {ds_dir}")
    for r in files:
        print(f"    {r['name']}: {r['tokens']:,} tokens")
    print(f"  built in {time.time() - t0:.1f}s")
    return 0


def shard_tokens_texts(path, limit):
    return list(shard_tools.iter_jsonl_texts(path, limit))


if __name__ == "__main__":
    sys.exit(main())
