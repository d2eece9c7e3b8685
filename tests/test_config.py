import os
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT_S, ROOT, TINY, T


def test_defaults_are_sota_and_presets_override():
    hp = T.Hyperparameters.from_env({})
    assert hp.preset == "sota" and hp.num_layers == 11 and hp.vocab_size == 8192 and hp.caseops_enabled
    assert hp.warmdown_frac == 0.85 and hp.beta2 == 0.99 and hp.embed_bits == 7 and hp.ttt_lora_rank == 80
    b = T.Hyperparameters.from_env({"PRESET": "baseline"})
    assert (b.num_layers, b.model_dim, b.num_heads, b.num_kv_heads, b.mlp_mult, b.vocab_size,
            b.train_seq_len, b.train_batch_tokens, b.tie_embeddings) == (9, 512, 8, 4, 2.0, 1024, 1024, 524288, True)
    o = T.Hyperparameters.from_env({"PRESET": "baseline", "NUM_LAYERS": "5", "MATRIX_LR": "0.1"})
    assert o.num_layers == 5 and o.matrix_lr == 0.1 and o.model_dim == 512


@pytest.mark.parametrize("env,needle", [
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS='abc': expected an integer"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR='fast': expected a number"),
    ({"TIE_EMBEDDINGS": "maybe"}, "TIE_EMBEDDINGS='maybe': expected 0 or 1"),
    ({"PRESET": "huge"}, "PRESET='huge' is not a preset"),
])
def test_parse_errors_name_the_variable(env, needle):
    with pytest.raises(T.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        T.Hyperparameters.from_env(env)


@pytest.mark.parametrize("env,world,needle", [
    ({"MATRIX_LR": "-1"}, 1, "MATRIX_LR=-1.0: must be >= 0"),
    ({"NUM_LAYERS": "0"}, 1, "NUM_LAYERS=0: must be > 0"),
    ({"MODEL_DIM": "500"}, 1, "MODEL_DIM=500: must be divisible by NUM_HEADS=8"),
    ({"NUM_KV_HEADS": "3"}, 1, "NUM_HEADS=8: must be divisible by NUM_KV_HEADS=3"),
    ({}, 3, "WORLD_SIZE=3: must divide 8"),
    ({"WARMDOWN_FRAC": "1.5"}, 1, "WARMDOWN_FRAC=1.5: must be in [0, 1]"),
    ({"CLIP_MODE": "magic"}, 1, "CLIP_MODE='magic': must be one of"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, 1, "TRAIN_BATCH_TOKENS=1000: must be a multiple of 8*TRAIN_SEQ_LEN"),
    ({"LOOP_END": "40"}, 1, "LOOP_START=3: LOOP_START..LOOP_END=3..40"),
    ({"EVAL_ONLY": "1"}, 1, "EVAL_ONLY=1 needs ARTIFACT"),
])
def test_validate_rejects_impossible_values(env, world, needle):
    hp = T.Hyperparameters.from_env(env)
    with pytest.raises(T.ConfigError) as e:
        hp.validate(world, check_files=False)
    assert needle in str(e.value)


def test_missing_files_name_the_fetch_command(tmp_path):
    hp = T.Hyperparameters.from_env({"DATA_DIR": str(tmp_path)})
    with pytest.raises(T.ConfigError) as e:
        hp.validate(1)
    msg = str(e.value)
    assert "DATA_PATH=" in msg and "cached_challenge_fineweb.py --variant sp8192 --caseops" in msg
    assert "build_offline_sample.py" in msg


def test_missing_tokenizer(sample, tmp_path):
    hp = T.Hyperparameters.from_env({**TINY, "DATA_PATH": sample["DATA_PATH"], "TOKENIZER_PATH": str(tmp_path / "no.model")})
    with pytest.raises(T.ConfigError, match="TOKENIZER_PATH=.*no such file"):
        hp.validate(1)


def test_near_miss_env_var_stops_the_run_unless_declared():
    """MATRX_LR=0.1 used to warn and train with the default: a wasted paid run. Now a config error naming the
    setting it resembles; EXTRA_ENV declares a deliberate variable."""
    hp = T.Hyperparameters.from_env({"MATRX_LR": "0.1", "NUM_LAYER": "3", "HOME": "/x", "LANG": "C"})
    with pytest.raises(T.ConfigError) as e:
        hp.validate(1, check_files=False)
    text = str(e.value)
    assert "2 errors" in text and "MATRX_LR is set but is not a setting" in text and "did you mean MATRIX_LR" in text
    assert "did you mean NUM_LAYERS" in text and "HOME" not in text and "LANG" not in text
    ok = T.Hyperparameters.from_env({"MATRX_LR": "0.1", "NUM_LAYER": "3", "EXTRA_ENV": "matrx_lr, NUM_LAYER"})
    ok.validate(1, check_files=False)


def test_every_config_error_is_reported_at_once(tmp_path):
    hp = T.Hyperparameters.from_env({"MATRIX_LR": "-1", "NUM_HEADS": "7", "CLIP_MODE": "magic",
                                     "WARMDOWN_FRAC": "2", "DATA_DIR": str(tmp_path)})
    with pytest.raises(T.ConfigError) as e:
        hp.validate(3)
    text = str(e.value)
    for needle in ("MATRIX_LR=-1.0: must be >= 0", "MODEL_DIM=512: must be divisible by NUM_HEADS=7",
                   "CLIP_MODE='magic': must be one of", "WARMDOWN_FRAC=2.0: must be in [0, 1]",
                   "WORLD_SIZE=3: must divide 8", "DATA_PATH=", "TOKENIZER_PATH="):
        assert needle in text, needle
    assert text.split(" ")[1:4] == ["errors", "in", "the"] and int(text.split(" ")[0]) >= 7


def test_settings_declare_group_and_bounds():
    groups = {f.name: f.metadata["group"] for f in T.fields(T.Hyperparameters)}
    assert set(groups.values()) == {"run", "model", "optimizer", "quantization", "evaluation"}
    assert T.Hyperparameters.artifact_fields() == [n for n, g in groups.items() if g == "model"
                                                   or n in ("train_seq_len", "lqer_asym_group")]
    choices = {f.name: f.metadata["choices"] for f in T.fields(T.Hyperparameters)}
    assert choices["muon_coeffs"]() == tuple(T.NS_COEFFICIENTS) and choices["compressor"]() == (*T.COMPRESSORS, "rans")


def test_the_artifact_stores_every_setting_the_model_reads():
    """A model flag missing from the artifact would rebuild a different model, silently. Record every setting
    GPT reads while it is built and runs (initialisation values aside): all must be artifact fields."""
    read = set()

    class Spy(T.Hyperparameters):
        def __getattribute__(self, name):
            if name in T.Hyperparameters.__dataclass_fields__:
                read.add(name)
            return super().__getattribute__(name)
    from conftest import TINY
    hp = Spy(**T.dataclasses.asdict(T.Hyperparameters.from_env({**TINY, "TIE_EMBEDDINGS": "0", "ROPE_YARN": "1"})))
    real_reset = T.GPT.reset_parameters
    try:
        T.GPT.reset_parameters = lambda self: None  # init values do not need to be stored
        model = T.GPT(hp, 1, "sdpa")
    finally:
        T.GPT.reset_parameters = real_reset
    ids = T.torch.randint(2, 100, (2, 256))
    for looping in (False, True):
        model.looping = looping
        model(ids, ids)
    # kernel choices and the rotary table's length (it is sliced, or computed beyond) come from the running config
    runtime = {"fused_ce_enabled", "fused_mlp_enabled", "eval_seq_len", "ttt_eval_seq_len"}
    stored = set(T.Hyperparameters.artifact_fields())
    assert len(read) > 20 and read - runtime <= stored, read - runtime - stored


def test_bad_config_fails_fast_from_the_command_line(tmp_path):
    env = {**os.environ, "NUM_HEADS": "7", "MODEL_DIM": "512"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert p.returncode == 2
    assert "MODEL_DIM=512: must be divisible by NUM_HEADS=7" in p.stderr
    assert not (tmp_path / "logs").exists()  # rejected before any run state was created


def test_import_has_no_side_effects(tmp_path):
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import train_gpt"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert p.returncode == 0 and p.stdout == "" and list(tmp_path.iterdir()) == []
