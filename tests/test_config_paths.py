"""Every path the run writes (ARTIFACT_DIR, logs/, SAVE_TOKEN_LOSSES) is checked with the other settings, before any
data is read: one line naming the variable and the path, not a logger's traceback after start-up."""
import os
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT_S, ROOT, TINY, T


@pytest.fixture
def blocker(tmp_path):
    """A regular file where a directory would have to be."""
    p = tmp_path / "a_file"
    p.write_text("x")
    return p


@pytest.mark.parametrize("var,where,needle", [
    ("ARTIFACT_DIR", "/proc/x/y", "cannot create files in /proc"),
    ("ARTIFACT_DIR", "blocker/run", "a_file is a file, not a directory"),
    ("SAVE_TOKEN_LOSSES", "blocker/losses", "a_file is a file, not a directory"),
])
def test_unwritable_output_is_a_config_error_naming_variable_and_path(sample, blocker, var, where, needle):
    path = where.replace("blocker", str(blocker))
    hp = T.Hyperparameters.from_env({**TINY, **sample, var: path})
    with pytest.raises(T.ConfigError) as e:
        hp.validate(1)
    assert str(e.value) == f"{var}={path!r}: " + str(e.value).split(": ", 1)[1] and needle in str(e.value)


def test_log_folder_blocked_by_a_file(sample, tmp_path, monkeypatch):
    (tmp_path / "logs").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    hp = T.Hyperparameters.from_env({**TINY, **sample, "ARTIFACT_DIR": str(tmp_path / "art")})
    with pytest.raises(T.ConfigError, match=r"^logs/ \(the run log folder, in the working directory\): .*logs is a "
                                            r"file, not a directory$"):
        hp.validate(1)


def test_writable_new_paths_pass_and_the_check_makes_nothing(sample, tmp_path):
    env = {**TINY, **sample, "ARTIFACT_DIR": str(tmp_path / "new" / "deeper"), "SAVE_TOKEN_LOSSES": str(tmp_path / "tl")}
    T.Hyperparameters.from_env(env).validate(1)
    assert sorted(os.listdir(tmp_path)) == []


def test_unwritable_artifact_dir_stops_the_command_before_any_data_is_read(sample, tmp_path):
    env = {**os.environ, **TINY, **sample, "ARTIFACT_DIR": "/proc/x/y", "RUN_ID": "blocked"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["config error: ARTIFACT_DIR='/proc/x/y': cannot create files in /proc "
                                             "(No such file or directory)"]
    assert not (tmp_path / "logs").exists()
