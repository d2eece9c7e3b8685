"""A clone stands on its own: no tracked text file names a path outside the repository (the workstation's shared
folder, a machine's home or install paths), and every record / frontier section the code and docs cite is written
down in docs/record_settings.md."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

# Paths a clone does not have. /tmp (scratch files in commands), /proc and /dev (system files used on purpose) and
# /workspace (a rented pod's volume, in docs/runpod_guide.md) are not on the list.
OUTSIDE = re.compile(r"\.\./shared\b|(?<![\w.~-])/(?:work|root|opt|mnt)/|(?<![\w.~-])/(?:home|Users)/[^/\s]+/"
                     r"|\b(?:sota_stack|frontier_2135)\.md\b")
# Folders a working tree holds that are not the project's text (only for a copy without git): these, the hidden
# ones but .ci, and the downloaded data.
UNTRACKED_DIRS = {"__pycache__", "runs", "logs", "artifacts"}
THIS_FILE = "tests/test_clone.py"  # it spells the patterns out
CITATION = re.compile(r"\b(spec|F) §([A-D]?\d+(?:\.\d+)*)")


def project_files(root: str) -> list[str]:
    """The tracked files (git ls-files); for a copy without git, every file outside the untracked folders."""
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, timeout=30)
        if out.returncode == 0 and out.stdout:
            return sorted(p for p in out.stdout.decode().split("\0") if p)
    except (OSError, subprocess.TimeoutExpired):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if d not in UNTRACKED_DIRS and (d == ".ci" or not d.startswith("."))
                       and not (rel == "data" and d in ("datasets", "tokenizers"))]
        files += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/") for f in filenames]
    return sorted(files)


def text_of(path: str) -> str | None:
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_paths(root: str) -> list[str]:
    """'file:line: match' for every outside path named in the project's text files."""
    hits = []
    for rel in project_files(root):
        path = os.path.join(root, rel)
        text = text_of(path) if rel != THIS_FILE and os.path.isfile(path) else None
        for n, line in enumerate((text or "").splitlines(), 1):
            hits += [f"{rel}:{n}: {m.group(0)}" for m in OUTSIDE.finditer(line)]
    return hits


def test_no_tracked_file_names_a_path_outside_the_repository():
    hits = outside_paths(ROOT)
    assert not hits, "paths a clone does not have (write the facts into docs/, cite public URLs):\n" + "\n".join(hits)


@pytest.mark.parametrize("line", ["see ../" "shared/spec/notes.md", "raw output in /work/" "shared/gpu_runs/x/",  # split: no literal hit here
                                  "python at /opt/torch/.venv/bin/python", "cd /home/alice/pg", "numbers from sota_stack.md"])
def test_the_check_finds_an_outside_path_in_a_git_checkout_and_in_a_plain_copy(tmp_path, line):
    for use_git in (True, False):
        root = tmp_path / ("git" if use_git else "copy")
        (root / "docs").mkdir(parents=True)
        (root / "docs" / "a.md").write_text(f"fine: /tmp/x, /proc/self, /workspace/pg\n{line}\n")
        (root / "blob.bin").write_bytes(b"\0/work/ binary files are not text")
        (root / "runs").mkdir()
        (root / "runs" / "log.txt").write_text("/work/ in an output folder\n")
        if use_git:
            subprocess.run(["git", "init", "-q", str(root)], check=True)
            subprocess.run(["git", "-C", str(root), "add", "docs", "blob.bin"], check=True)
        assert [h.split(": ", 1)[0] for h in outside_paths(str(root))] == ["docs/a.md:2"], use_git


def test_a_copy_without_git_lists_its_files(tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(os.path.join(ROOT, "docs"), root / "docs")
    for skipped in (".venv", ".inductor_cache", "runs", "data/datasets"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "x.py").write_text("/work/\n")
    (root / ".ci").mkdir()
    (root / ".ci" / "run").write_text("#!/usr/bin/env bash\n")
    files = project_files(str(root))
    assert "docs/record_settings.md" in files and ".ci/run" in files and not [f for f in files if f.endswith("x.py")]


def test_every_cited_section_is_written_down():
    with open(os.path.join(ROOT, "docs", "record_settings.md"), encoding="utf-8") as f:
        entries = set(re.findall(r"^(?:#+ |- )((?:F )?§[A-D]?\d+(?:\.\d+)*)\b", f.read(), re.M))
    missing = set()
    for rel in project_files(ROOT):
        text = text_of(os.path.join(ROOT, rel)) if os.path.isfile(os.path.join(ROOT, rel)) else None
        for kind, sec in CITATION.findall(text or ""):
            label = f"F §{sec}" if kind == "F" or sec[0].isalpha() else f"§{sec}"
            if label not in entries:
                missing.add(f"{rel}: {kind} §{sec}")
    assert not missing, "cited but not in docs/record_settings.md:\n" + "\n".join(sorted(missing))
    assert {"§9", "§10", "§11.7", "F §A1.1", "F §C7"} <= entries
