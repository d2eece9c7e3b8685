"""submissions/README.md says what scripts/make_submission.py writes: the files of a folder, the keys of its
submission.json, and the refusal of a run whose split check found validation documents in training."""
import json
import os
import re

import pytest

from conftest import ROOT
from test_scripts import make_code, make_run

import make_submission

README = os.path.join(ROOT, "submissions", "README.md")
SPLIT_OK = {"val_docs_in_train": 0, "train_shards": 80, "val_docs": 50_000, "canonical_split": True}


def readme_section(title: str) -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def listed(paragraph_start: str, section: str) -> set[str]:
    """Backticked names of the paragraph of `section` that starts with `paragraph_start`."""
    para = next(p for p in readme_section(section).split("\n\n") if p.startswith(paragraph_start))
    return set(re.findall(r"`([^`]+)`", para[len(paragraph_start):]))


def runs(tmp_path, seeds=(42, 0, 1234), wrapper=False, **split):
    out = []
    for s in seeds:
        d = make_run(tmp_path / "runs", f"r{s}", s, wrapper=wrapper)
        rec = json.loads((d / "run_record.json").read_text())
        rec["compliance"].update({**SPLIT_OK, **split})
        (d / "run_record.json").write_text(json.dumps(rec))
        out.append(d)
    return out


def test_the_folder_holds_what_the_readme_lists(tmp_path):
    files = [b.split("`")[1] for b in readme_section("What a folder holds").splitlines() if b.startswith("- `")]
    patterns = {f: re.compile("^" + re.escape(f).replace(re.escape("<seed>"), r"\d+") + "$") for f in files}
    code, req = make_code(tmp_path), tmp_path / "requirements.txt"
    req.write_text("torch\n")
    made = set()
    for i, (wrapper, ship) in enumerate([(False, False), (True, False), (True, True)]):
        folder = make_submission.build(runs(tmp_path / str(i), wrapper=wrapper), f"s{i}", code=code, author="x",
                                       out_root=tmp_path / "subs", requirements=req, ship_wrapper=ship)
        for name in os.listdir(folder):
            match = [f for f, p in patterns.items() if p.match(name)]
            assert match, f"{name} is written but submissions/README.md does not list it"
            made |= set(match)
    assert made == set(files), f"listed but never written: {set(files) - made}"


def test_submission_json_keys_are_the_readmes(tmp_path):
    code = make_code(tmp_path)
    record = make_submission.build(runs(tmp_path / "a"), "rec", code=code, author="x", out_root=tmp_path / "subs")
    non_record = make_submission.build(runs(tmp_path / "b", val_docs_in_train=3), "non", code=code, author="x",
                                       out_root=tmp_path / "subs", non_record=True)
    subs = [json.loads((f / "submission.json").read_text()) for f in (record, non_record)]
    section = "`submission.json`"
    assert set(subs[0]) | set(subs[1]) == listed("Keys: ", section)
    assert set(subs[0]["seed_results"]["42"]) == listed("`seed_results` keys, per seed: ", section)
    assert set(subs[0]["compliance"]) == listed("`compliance` keys: ", section)
    assert subs[0]["compliance"]["no_val_data_during_training"] is True and subs[0]["compliance"]["canonical_split"]
    assert subs[1]["compliance"]["val_docs_in_train_max"] == 3 and not subs[1]["compliance"]["no_val_data_during_training"]
    assert "validation documents in the training shards: 0" in (record / "README.md").read_text()


@pytest.mark.parametrize("split,reason", [({"val_docs_in_train": 3}, "3 validation documents are in the training"),
                                          ({"canonical_split": False}, "not the canonical data split")])
def test_a_run_on_a_leaky_or_other_split_is_refused(tmp_path, split, reason):
    with pytest.raises(make_submission.SubmissionError, match=reason):
        make_submission.build(runs(tmp_path, **split), "leak", code=make_code(tmp_path), author="x",
                              out_root=tmp_path / "subs")
    assert not (tmp_path / "subs").exists() or not [p for p in (tmp_path / "subs").iterdir()]
