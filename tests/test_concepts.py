"""learning_concepts.md must not rot: every env var and code name it cites has to exist.

Rules (applied to every `backticked` span of the guide):
- a span that is an UPPER_CASE name (optionally `NAME=value`) is an env var or a module constant: it must be a
  Hyperparameters field, an attribute of train_gpt or of one of OTHER_MODULES, or be listed in FOREIGN_ENV
  together with a repo file that must still mention it;
- a span `name()` or `Dotted.name()` must resolve as an attribute chain in train_gpt or in OTHER_MODULES;
- a CamelCase span (`ClassName`) must resolve the same way;
- inside command spans (`PRESET=cpu_smoke python ...`) every `NAME=` assignment is checked as an env var.
Anything else (paths, lower-case words, literal values) is ignored.
"""
import importlib.util
import os
import re
import sys
from dataclasses import fields

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "learning_concepts.md")
sys.path.insert(0, ROOT)

import train_gpt as T  # noqa: E402

# Repo modules whose names the guide may cite (loaded by path: data/ and scripts/ are not packages).
OTHER_MODULES = ["data/caseops.py", "data/shard_tools.py", "data/cached_challenge_fineweb.py",
                 "scripts/significance.py", "scripts/make_submission.py", "scripts/runlib.py", "bench/flops.py",
                 "bench/throughput.py"]

# Env vars that are not Hyperparameters fields: name -> file (repo-relative) that must still mention it.
FOREIGN_ENV = {
    "PRESET": "train_gpt.py", "MASTER_ADDR": "train_gpt.py", "MASTER_PORT": "train_gpt.py", "RANK": "train_gpt.py", "WORLD_SIZE": "train_gpt.py", "LOCAL_RANK": "train_gpt.py",
    "MATCHED_FINEWEB_REPO_ID": "data/cached_challenge_fineweb.py",
    "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX": "data/cached_challenge_fineweb.py",
    "SEEDS": "scripts/run_seeds.sh", "NPROC": "scripts/run_seeds.sh", "NAME": "scripts/run_seeds.sh",
    "RUNS_ROOT": "scripts/run_seeds.sh", "TRAIN_CMD": "scripts/run_seeds.sh", "FORCE": "scripts/run_seeds.sh",
    "SWEEP_VAR": "scripts/sweep.sh", "SWEEP_VALUES": "scripts/sweep.sh",
    "BENCH_GRAD_ACCUM": "bench/throughput.py",
}
# Generic launcher/tool variables documented for users but owned by no repo file.
EXTERNAL_ENV = {"CUDA_VISIBLE_DEVICES", "HF_TOKEN", "HF_ENDPOINT", "HF_HOME", "TRITON_INTERPRET", "OMP_NUM_THREADS",
                "MAX_JOBS", "TORCHINDUCTOR_CACHE_DIR"}

SPAN = re.compile(r"`([^`\n]+)`")
UPPER = re.compile(r"^([A-Z][A-Z0-9_]*[A-Z0-9])(=\S*)?$")
CALL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\(\)$")
CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")
ASSIGN = re.compile(r"(?:^|\s)([A-Z][A-Z0-9_]*[A-Z0-9])=")


def _load(rel):
    path = os.path.join(ROOT, rel)
    name = "_concepts_" + re.sub(r"\W", "_", rel)
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def modules():
    return [T] + [_load(rel) for rel in OTHER_MODULES]


def _resolves(dotted, modules):
    for mod in modules:
        obj, ok = mod, True
        for part in dotted.split("."):
            if not hasattr(obj, part):
                ok = False
                break
            obj = getattr(obj, part)
        if ok:
            return True
    return False


def _mentions(rel, name):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return re.search(rf"\b{re.escape(name)}\b", f.read()) is not None


def check_text(text, modules):
    """Return a list of problems: cited names that do not exist."""
    field_vars = {f.name.upper() for f in fields(T.Hyperparameters)}
    problems = []

    def env_ok(name):
        if name in field_vars or name in EXTERNAL_ENV or _resolves(name, modules):
            return True
        return name in FOREIGN_ENV and _mentions(FOREIGN_ENV[name], name)

    for span in SPAN.findall(text):
        span = span.strip()
        m = UPPER.match(span)
        if m:
            if not env_ok(m.group(1)):
                problems.append(f"env var / constant `{span}` is not a Hyperparameters field or known name")
            continue
        m = CALL.match(span)
        if m:
            if not _resolves(m.group(1), modules):
                problems.append(f"`{span}` does not exist in train_gpt or {OTHER_MODULES}")
            continue
        if CAMEL.match(span):
            if not _resolves(span, modules):
                problems.append(f"class `{span}` does not exist in train_gpt or {OTHER_MODULES}")
            continue
        if " " in span:  # a command line: check its NAME=value assignments
            for name in ASSIGN.findall(span):
                if not env_ok(name):
                    problems.append(f"env var {name} in `{span}` is not a Hyperparameters field or known name")
    return problems


def _guide():
    with open(GUIDE, encoding="utf-8") as f:
        return f.read()


def test_at_least_60_entries():
    entries = [ln for ln in _guide().splitlines() if ln.startswith("### ")]
    assert len(entries) >= 60, f"only {len(entries)} entries"
    assert len(set(entries)) == len(entries), "duplicate entry headings"


def test_every_entry_names_code_or_env():
    """Each entry points somewhere: at least one backticked name in its body."""
    parts = re.split(r"^### .*$", _guide(), flags=re.M)[1:]
    heads = re.findall(r"^### (.*)$", _guide(), flags=re.M)
    for head, body in zip(heads, parts):
        assert SPAN.search(body), f"entry {head!r} cites no env var or code name"
        assert "**Measured:**" in body, f"entry {head!r} has no Measured line"


def test_every_cited_name_exists(modules):
    problems = check_text(_guide(), modules)
    assert not problems, "learning_concepts.md cites names that do not exist:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", ["docs/strategy.md", "docs/workstation.md", "docs/runpod_guide.md",
                                 "docs/architecture.md"])
def test_docs_cite_existing_names(doc, modules):
    """The other guides follow the same rule when they exist."""
    path = os.path.join(ROOT, doc)
    if not os.path.exists(path):
        pytest.skip(f"{doc} not present")
    with open(path, encoding="utf-8") as f:
        problems = check_text(f.read(), modules)
    assert not problems, f"{doc} cites names that do not exist:\n" + "\n".join(problems)


def test_checker_catches_removed_names(modules):
    """The checker must flag names that do not exist (so renaming code breaks this test, not silently the guide)."""
    bad = ("`NO_SUCH_SETTING` `no_such_function()` `GPT.no_such_method()` `NoSuchClass` "
           "`NO_SUCH_VAR=1 python train_gpt.py`")
    assert len(check_text(bad, modules)) == 5
    good = "`MATRIX_LR` `gptq_quantize()` `GPT.smear()` `Hyperparameters` `PRESET=cpu_smoke python train_gpt.py`"
    assert check_text(good, modules) == []


def test_removing_a_field_is_detected(modules, monkeypatch):
    """Simulate deleting a function from train_gpt: the guide check must then fail."""
    monkeypatch.delattr(T, "lqer_factors")
    assert any("lqer_factors" in p for p in check_text(_guide(), modules))
