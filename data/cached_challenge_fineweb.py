#!/usr/bin/env python3
"""Download the challenge's pre-tokenized FineWeb shards + tokenizer from the Hugging Face Hub.

    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 10
    python data/cached_challenge_fineweb.py --caseops            # CaseOps sp8192 export (romeerp/parameter-golf-caseops-v1)

Reads `<remote-root>/manifest.json` of the dataset repo (repo id: --repo-id, env MATCHED_FINEWEB_REPO_ID,
default willdepueoai/parameter-golf; remote root: --remote-root, env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX,
default `datasets`), then fetches every val shard (+ the CaseOps val byte sidecar), the first N train shards
(--train-shards, default all listed) and the dataset's tokenizer files into the layout train_gpt.py reads:

    <out-root>/datasets/fineweb10B_<variant>/fineweb_{val,train}_*.bin     <out-root>/tokenizers/...

Remote paths lose the remote-root prefix and land under --out-root (default: this repo's data/).
Resumable: complete files (right size, sha256 when the manifest lists one, valid shard header) are skipped;
downloads are staged under <out-root>/.download_staging and renamed into place only once verified.
Errors are one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
import time

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DATA_DIR)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
CASEOPS_REPO_ID = "romeerp/parameter-golf-caseops-v1"
DEFAULT_REMOTE_ROOT = "datasets"
CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"
# The challenge's validation split: the first 50,000 documents of the frozen list. A split with fewer puts the
# others into the training shards, where a run would train on what it is scored on (docs/data_guard.md).
CANONICAL_VAL_DOCS = 50_000
STAGING = ".download_staging"
ORIGIN_FILE = "manifest.origin.json"
OFFLINE_HINT = ("run this on a machine with network access, or build the offline sample with "
                "`python data/build_offline_sample.py` (then PRESET=cpu_smoke)")


class DownloadError(Exception):
    """A failure that ends the run with a one-line message and exit code 2."""


# ------------------------------------------------------------------------------------------------
# Hub access (shared with download_hf_docs_and_tokenize.py)
# ------------------------------------------------------------------------------------------------

def _is_offline_error(e: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True
    name = type(e).__name__
    mod = type(e).__module__ or ""
    return "httpx" in mod and any(k in name for k in ("Connect", "Timeout", "Network", "Protocol"))


def explain_hub_error(e: BaseException, repo_id: str, remote: str) -> str | None:
    """One-line message for a known hub/disk failure, or None."""
    from huggingface_hub import errors as hf_errors
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"disk full while writing {remote}: free some space (or pass --out-root on a bigger disk) and rerun"
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return f"revision not found in dataset repo {repo_id} (file {remote})"
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return (f"dataset repo {repo_id!r} not found (or private/gated) at "
                f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}; check --repo-id / MATCHED_FINEWEB_REPO_ID")
    if _is_offline_error(e) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and isinstance(
            e, hf_errors.EntryNotFoundError):
        return f"cannot reach the Hugging Face Hub to fetch {remote} ({type(e).__name__}); {OFFLINE_HINT}"
    if isinstance(e, (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError)):
        return (f"file {remote!r} not found in dataset repo {repo_id} (wrong --remote-root / "
                "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, or the repo lacks a file its manifest lists)")
    if isinstance(e, hf_errors.HfHubHTTPError):
        return f"hub error fetching {remote} from {repo_id}: {str(e).splitlines()[0]}"
    return None


def hub_fetch(repo_id: str, remote: str, staging_dir: str, revision: str | None = None) -> str:
    """Download one file of a dataset repo into `staging_dir/<remote>` (resumable); return its path."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset", revision=revision,
                               local_dir=staging_dir)
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - mapped to one-line messages
        msg = explain_hub_error(e, repo_id, remote)
        if msg is None:
            raise
        raise DownloadError(msg) from None


def remote_size(repo_id: str, remote: str, revision: str | None = None) -> int | None:
    """Size of a remote file from a HEAD call; None when it cannot be asked."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    try:
        return get_hf_file_metadata(hf_hub_url(repo_id, remote, repo_type="dataset", revision=revision)).size
    except Exception as e:  # noqa: BLE001
        if _is_offline_error(e):
            return None
        msg = explain_hub_error(e, repo_id, remote)
        if msg is None:
            raise
        raise DownloadError(msg) from None


def local_path_for(remote: str, remote_root: str, out_root: str) -> str:
    """Remote->local mapping: strip the remote root; the rest lands under out_root."""
    rel = remote
    root = remote_root.strip("/")
    if root and (rel == root or rel.startswith(root + "/")):
        rel = rel[len(root):].lstrip("/")
    return os.path.join(out_root, *rel.split("/"))


def remote_path(remote_root: str, rel: str) -> str:
    root = remote_root.strip("/")
    return f"{root}/{rel}" if root else rel


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------

def file_ok(path: str, size: int | None = None, sha256: str | None = None, shard: bool = False) -> tuple[bool, str]:
    """(complete?, why not)."""
    if not os.path.isfile(path):
        return False, "missing"
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return False, f"size {actual} != {size}"
    if shard:
        import train_gpt
        try:
            train_gpt.read_shard_header(path)
        except train_gpt.ShardError as e:
            return False, str(e)
    if sha256:
        from shard_tools import sha256_file
        if sha256_file(path) != sha256:
            return False, "sha256 mismatch"
    return True, ""


def _fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


# ------------------------------------------------------------------------------------------------
# Manifest and plan
# ------------------------------------------------------------------------------------------------

def load_manifest(repo_id: str, remote_root: str, out_root: str, refresh: bool, revision: str | None) -> dict:
    """Local manifest if it came from the same repo/root, else (re)download it."""
    path = os.path.join(out_root, "manifest.json")
    origin_path = os.path.join(out_root, ORIGIN_FILE)
    origin = {"repo_id": repo_id, "remote_root": remote_root}
    have = os.path.isfile(path)
    same_origin = False
    if have and os.path.isfile(origin_path):
        try:
            with open(origin_path) as f:
                same_origin = json.load(f) == origin
        except (OSError, ValueError):
            same_origin = False
    if have and not same_origin and not os.path.isfile(origin_path):
        same_origin = repo_id == DEFAULT_REPO_ID and remote_root == DEFAULT_REMOTE_ROOT  # hand-placed default
    if refresh or not have or not same_origin:
        staged = hub_fetch(repo_id, remote_path(remote_root, "manifest.json"),
                           os.path.join(out_root, STAGING), revision)
        os.makedirs(out_root, exist_ok=True)
        os.replace(staged, path)
        with open(origin_path + ".tmp", "w") as f:
            json.dump(origin, f)
        os.replace(origin_path + ".tmp", origin_path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DownloadError(f"{path}: unreadable manifest ({e}); delete it and rerun") from None


def dataset_name_for(variant: str, caseops: bool) -> str:
    v = variant.strip()
    if v.startswith("fineweb10B_"):
        v = v[len("fineweb10B_"):]
    if caseops and "caseops" not in v:
        v += CASEOPS_SUFFIX
    return f"fineweb10B_{v}"


def few_val_docs_error(num_val: int, what: str) -> str:
    return (f"{what} has {num_val:,} validation documents, fewer than the challenge's {CANONICAL_VAL_DOCS:,}: the "
            "rest of the validation set is then in its training shards, and a run would train on what it is scored "
            "on (submissions were excluded for it); pass --allow-few-val-docs if that is what you want")


def build_plan(manifest: dict, dataset_name: str, train_shards: int | None, with_docs: bool,
               remote_root: str, allow_few_val_docs: bool = False) -> list[dict]:
    """Files to fetch: [{remote, rel, size, sha256, shard}] in download order (val first)."""
    datasets = manifest.get("datasets") or []
    entry = next((d for d in datasets if d.get("name") == dataset_name), None)
    if entry is None:
        known = sorted(d.get("name", "").replace("fineweb10B_", "", 1) for d in datasets)
        raise DownloadError(f"unknown variant {dataset_name.replace('fineweb10B_', '', 1)!r} for this repo; "
                            f"known variants: {', '.join(known) or '(manifest lists none)'}")
    ds_path = (entry.get("path") or f"datasets/{dataset_name}").strip("/")
    stats = entry.get("stats") or {}
    if stats.get("docs_val") is not None and stats["docs_val"] < CANONICAL_VAL_DOCS and not allow_few_val_docs:
        raise DownloadError(few_val_docs_error(stats["docs_val"], f"dataset {dataset_name} (manifest stats.docs_val)"))
    listed = {f["name"]: f for f in entry.get("files") or [] if "name" in f}
    n_val = int(stats.get("files_val", 1) or 1)
    n_train_all = int(stats.get("files_train", 0) or 0)
    n_train = n_train_all if train_shards is None else min(max(train_shards, 0), n_train_all)
    caseops = bool(entry.get("val_bytes_glob")) or "caseops" in dataset_name

    def shard(name):
        rec = listed.get(name, {})
        return {"rel": f"{ds_path}/{name}", "size": rec.get("bytes"), "sha256": rec.get("sha256"), "shard": True}

    plan = [shard(f"fineweb_val_{i:06d}.bin") for i in range(n_val)]
    if caseops:
        plan += [shard(f"fineweb_val_bytes_{i:06d}.bin") for i in range(n_val)]
    plan += [shard(f"fineweb_train_{i:06d}.bin") for i in range(n_train)]
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers") or [] if t.get("name") == tok_name), None)
    if tok is None:
        raise DownloadError(f"manifest lists no tokenizer {tok_name!r} for dataset {dataset_name}")
    for key in ("model_path", "vocab_path", "path"):
        if tok.get(key):
            plan.append({"rel": tok[key].strip("/"), "size": tok.get(key.replace("path", "bytes")),
                         "sha256": tok.get(key.replace("path", "sha256")), "shard": False})
    if with_docs:
        docs = manifest.get("docs_jsonl") or "docs_selected.jsonl"
        meta = manifest.get("docs_meta") or {}
        plan.append({"rel": docs.strip("/"), "size": None, "sha256": meta.get("docs_sha256"), "shard": False})
        side = meta.get("source_sidecar") or "docs_selected.source_manifest.json"
        plan.append({"rel": side.strip("/"), "size": None, "sha256": None, "shard": False, "optional": True})
    for p in plan:
        p["remote"] = remote_path(remote_root, p["rel"])
    return plan


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def run(args) -> int:
    caseops = args.caseops or "caseops" in args.variant
    variant = args.variant if not (args.caseops and args.variant == "sp1024") else "sp8192"
    repo_id = args.repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or (
        CASEOPS_REPO_ID if caseops else DEFAULT_REPO_ID)
    remote_root = args.remote_root if args.remote_root is not None else os.environ.get(
        "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)
    out_root = os.path.abspath(args.out_root)
    staging = os.path.join(out_root, STAGING)
    t0 = time.time()

    manifest = load_manifest(repo_id, remote_root, out_root, args.refresh_manifest, args.revision)
    dataset = dataset_name_for(variant, caseops)
    plan = build_plan(manifest, dataset, args.train_shards, args.with_docs, remote_root, args.allow_few_val_docs)
    print(f"{repo_id} ({remote_root or '/'}): {dataset}, {len(plan)} files -> {out_root}", flush=True)

    done_files, done_bytes, fetched_bytes, skipped = 0, 0, 0, 0
    known_total = sum(p["size"] or 0 for p in plan)
    for i, p in enumerate(plan, 1):
        dest = local_path_for(p["remote"], remote_root, out_root)
        size = p["size"]
        if os.path.isfile(dest):
            if size is None and not p["shard"] and not p.get("sha256"):
                size = remote_size(repo_id, p["remote"], args.revision)
            ok, why = file_ok(dest, size, p.get("sha256"), p["shard"])
            if ok:
                skipped += 1
                done_files += 1
                done_bytes += os.path.getsize(dest)
                print(f"[{i}/{len(plan)}] {p['rel']}: present, skipped", flush=True)
                continue
            print(f"[{i}/{len(plan)}] {p['rel']}: incomplete ({why}); downloading again", flush=True)
        t1 = time.time()
        try:
            staged = hub_fetch(repo_id, p["remote"], staging, args.revision)
        except DownloadError:
            if p.get("optional"):
                print(f"[{i}/{len(plan)}] {p['rel']}: not in the repo (optional), skipped", flush=True)
                continue
            raise
        dt = max(time.time() - t1, 1e-6)
        ok, why = file_ok(staged, size, p.get("sha256"), p["shard"])
        if not ok:
            os.remove(staged)
            raise DownloadError(f"downloaded {p['remote']} is corrupt ({why}); rerun to fetch it again")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        n = os.path.getsize(staged)
        os.replace(staged, dest)
        done_files += 1
        done_bytes += n
        fetched_bytes += n
        total = f"/{_fmt_mb(known_total)}" if known_total else ""
        print(f"[{i}/{len(plan)}] {p['rel']}: {_fmt_mb(n)} in {dt:.1f}s ({n / dt / 1e6:,.1f} MB/s); "
              f"overall {done_files}/{len(plan)} files, {_fmt_mb(done_bytes)}{total}", flush=True)
    shutil.rmtree(staging, ignore_errors=True)
    dt = time.time() - t0
    print(f"done: {done_files} files ({skipped} already present), fetched {_fmt_mb(fetched_bytes)} in {dt:.1f}s"
          f" ({fetched_bytes / max(dt, 1e-6) / 1e6:,.1f} MB/s) -> {os.path.join(out_root, 'datasets', dataset)}",
          flush=True)
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="sp1024",
                    help="dataset variant: sp1024, sp4096, sp8192, byte260, ... (the manifest's datasets)")
    ap.add_argument("train_shards_pos", nargs="?", type=int, default=None, metavar="TRAIN_SHARDS")
    ap.add_argument("--train-shards", type=int, default=None,
                    help="train shards to fetch (default: all listed in the manifest); val is always complete")
    ap.add_argument("--caseops", action="store_true",
                    help=f"the CaseOps sp8192 export (repo {CASEOPS_REPO_ID} unless --repo-id)")
    ap.add_argument("--repo-id", default=None, help=f"HF dataset repo (env MATCHED_FINEWEB_REPO_ID; {DEFAULT_REPO_ID})")
    ap.add_argument("--remote-root", default=None,
                    help="folder of the repo holding manifest.json (env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX; datasets)")
    ap.add_argument("--revision", default=None, help="repo revision (default: main)")
    ap.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl (+ sidecar)")
    ap.add_argument("--out-root", default=DATA_DIR, help="local data root (default: this repo's data/)")
    ap.add_argument("--refresh-manifest", action="store_true", help="download manifest.json again")
    ap.add_argument("--allow-few-val-docs", action="store_true",
                    help=f"fetch a dataset whose validation split has fewer than {CANONICAL_VAL_DOCS:,} documents")
    args = ap.parse_args(argv)
    if args.train_shards is None:
        args.train_shards = args.train_shards_pos
    if args.train_shards is not None and args.train_shards < 0:
        ap.error("--train-shards must be >= 0")
    return args


def main(argv=None) -> int:
    if DATA_DIR not in sys.path:
        sys.path.insert(0, DATA_DIR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = parse_args(argv)
    try:
        return run(args)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: disk full ({e.filename or args.out_root}): free some space and rerun", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
