"""The frontier techniques (docs/record_settings.md, F parts A and B) as flags: each changes what it should, trains, survives the
artifact, and keeps scoring legal. Causality across every eval mode is in test_eval.py."""
import dataclasses

import pytest
import torch

from conftest import T, cpu_runtime, randomize, tiny_hp
from test_eval import make_val, model_and_hp, repetitive_val, run_eval


def sequential_hints(x, y, ctx, threshold, boost):
    """The record's state machine (spec A1.1) with exact context keys, one position at a time."""
    counts, tops, hint, gain = {}, {}, [0] * len(x), [0.0] * len(x)
    for k in range(len(x)):
        if k < ctx - 1:
            continue
        key = tuple(x[k - ctx + 1: k + 1])
        if key in tops:
            total, top_count, top_tok = tops[key]
            if torch.tensor(top_count, dtype=torch.float32) / torch.tensor(total, dtype=torch.float32) >= threshold:
                hint[k], gain[k] = top_tok, boost
        c = counts[key, y[k]] = counts.get((key, y[k]), 0) + 1
        total, top_count, top_tok = tops.get(key, (0, 0, 0))
        tops[key] = (total + 1, c, y[k]) if c > top_count else (total + 1, top_count, top_tok)
    return hint, gain


@pytest.mark.parametrize("order_kind", ["stream", "longest_first"])
def test_ngram_hints_equal_the_sequential_counter(order_kind):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(2, 6, (3000,), generator=g)  # 4 symbols: contexts repeat with mixed continuations
    toks[torch.randperm(3000, generator=g)[:40]] = 1
    toks[0] = 1
    docs = T.find_docs(toks, 1)
    order = list(range(len(docs))) if order_kind == "stream" else T.scoring_order(docs)
    hp = tiny_hp(TOKEN_ORDER="4", TOKEN_THRESHOLD="0.5", TOKEN_BOOST="1.5")
    h = T.ngram_hints(toks, docs, order, hp)
    pos = [p for d in order for p in range(docs[d][0], docs[d][0] + docs[d][1] - 1)]
    ref_h, ref_b = sequential_hints([int(toks[p]) for p in pos], [int(toks[p + 1]) for p in pos], 3, 0.5, 1.5)
    assert torch.equal(h.hint[pos], torch.tensor(ref_h)) and torch.equal(h.boost[pos], torch.tensor(ref_b))
    assert 100 < int((h.boost > 0).sum()) < len(pos)  # it fires, and not everywhere


def test_ngram_hint_depends_only_on_what_was_read_before():
    """Changing token p changes no hint of a target read before target p-1, nor that target's own hint."""
    toks = repetitive_val()
    docs = T.find_docs(toks, 1)
    order = T.scoring_order(docs)
    hp = tiny_hp(TOKEN_ORDER="3")
    pos = torch.cat([torch.arange(docs[d][0], docs[d][0] + docs[d][1] - 1) for d in order])
    rank = torch.empty_like(pos)
    rank[pos] = torch.arange(pos.numel())
    base = T.ngram_hints(toks, docs, order, hp)
    for p in (docs[order[2]][0] + 7, docs[order[5]][0] + 3):
        alt = toks.clone()
        alt[p] = 999
        h = T.ngram_hints(alt, docs, order, hp)
        upto = rank <= rank[p - 1]
        assert torch.equal(h.hint[upto], base.hint[upto]) and torch.equal(h.boost[upto], base.boost[upto])


def test_tilted_distribution_is_normalised_and_exact():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 7, 50, generator=g) * 8
    y, hint = torch.randint(0, 50, (3, 7), generator=g), torch.randint(0, 50, (3, 7), generator=g)
    y[0] = hint[0]  # some targets are the hinted token
    boost = torch.where(torch.rand(3, 7, generator=g) < 0.7, torch.tensor(2.625), torch.tensor(0.0))
    scores = T.softcap_scores(z, y, hint, 30.0)
    tilted = T.tilted_nll(scores, y, hint, boost)
    capped = 30.0 * torch.tanh(z / 30.0)
    p_tilt = torch.softmax(capped.double() + boost.double()[..., None] * torch.nn.functional.one_hot(hint, 50), -1)
    assert torch.allclose(p_tilt.sum(-1), torch.ones(3, 7, dtype=torch.float64))
    assert torch.allclose(tilted.double(), -p_tilt.gather(-1, y[..., None])[..., 0].log(), atol=1e-5)
    off = boost == 0
    assert torch.equal(tilted[off], scores.nll[off])  # no hint: the NLL bit for bit
    plain = T.softcap_cross_entropy(z, y, 30.0, "none").view(3, 7)
    assert torch.allclose(scores.nll, plain, atol=1e-6)


def test_tilt_lowers_the_loss_of_repeated_text(tmp_path):
    rt = cpu_runtime(tmp_path)
    val = make_val(repetitive_val())
    losses = {}
    for tilt in ("0", "1"):
        hp, m = model_and_hp(NGRAM_TILT_ENABLED=tilt, TOKEN_ORDER="3")
        losses[tilt] = run_eval("phased", m, val, hp, rt)
    assert losses["1"].val_loss < losses["0"].val_loss - 0.1
    assert losses["1"].tokens == losses["0"].tokens == val.num_targets


def test_tilt_needs_ttt():
    with pytest.raises(T.ConfigError, match="NGRAM_TILT_ENABLED"):
        tiny_hp(NGRAM_TILT_ENABLED="1", TTT_ENABLED="0").validate(check_files=False)


def test_lora_targets_follow_the_masks():
    m = T.GPT(tiny_hp(), 1)
    m.looping = True

    def kinds(**over):
        return {n.split("_", 1)[1] for n in m.lora_shapes(tiny_hp(**over)) if n != "head"}
    assert kinds() == {"q", "k", "v", "o", "mlp"}
    assert kinds(TTT_K_LORA="0") == {"q", "v", "o", "mlp"}  # #2135
    assert kinds(TTT_MASK="no_qv") == {"k", "o", "mlp"}  # #1953
    n_slots = sum(map(len, m.schedule()))
    assert len(m.lora_shapes(tiny_hp(TTT_K_LORA="0"))) == 4 * n_slots + 1


def test_short_documents_get_short_chunks():
    hp = tiny_hp(TTT_SHORT_SCORE_FIRST_ENABLED="1", TTT_SHORT_SCORE_FIRST_STEPS="2000:24,256:8", TTT_CHUNK_SIZE="48")
    assert [T.ttt_chunk_for(hp, n) for n in (100, 256, 257, 2000, 2001)] == [8, 8, 24, 24, 48]
    assert T.ttt_chunk_for(tiny_hp(TTT_CHUNK_SIZE="48"), 100) == 48  # off: one chunk size
    with pytest.raises(T.ConfigError, match="TTT_SHORT_SCORE_FIRST_STEPS"):
        tiny_hp(TTT_SHORT_SCORE_FIRST_STEPS="256-8").validate(check_files=False)


def test_ttt_batches_split_where_the_chunk_size_changes():
    """Each document gets the chunk of its own length: batches never mix chunk sizes, so the split over ranks
    does not change a document's chunk (the record chose it per batch of similar lengths)."""
    hp = tiny_hp(TTT_SHORT_SCORE_FIRST_ENABLED="1", TTT_SHORT_SCORE_FIRST_STEPS="256:8,2000:24", TTT_BATCH_SIZE="3")
    docs = [(0, n) for n in (3000, 2500, 1900, 1500, 1200, 900, 300, 250, 100, 50)]
    batches = T.ttt_batches(list(range(10)), docs, hp)
    assert batches == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert all(len({T.ttt_chunk_for(hp, docs[d][1]) for d in b}) == 1 for b in batches)
    assert T.ttt_batches(list(range(10)), docs, tiny_hp(TTT_BATCH_SIZE="4")) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("flag", [dict(TTT_LOCAL_LR_MULT="0.5"), dict(TTT_MASK="no_qv"), dict(TTT_K_LORA="0"),
                                  dict(TTT_SHORT_SCORE_FIRST_ENABLED="1", TTT_SHORT_SCORE_FIRST_STEPS="400:8"),
                                  dict(TTT_WEIGHT_DECAY="2.0", TTT_LORA_LR="0.02")])
def test_each_ttt_flag_changes_the_scores(flag, tmp_path):
    rt = cpu_runtime(tmp_path)
    val = make_val(repetitive_val())
    hp0, m0 = model_and_hp(TTT_LORA_LR="0.02")
    base = run_eval("ttt", m0, val, hp0, rt)
    hp1, m1 = model_and_hp(**{"TTT_LORA_LR": "0.02", **flag})
    r = run_eval("ttt", m1, val, hp1, rt)
    assert r.tokens == base.tokens == val.num_targets and torch.isfinite(r.token_losses).all()
    assert abs(r.loss_sum - base.loss_sum) > 1e-3


def test_seq_schedule_parses_validates_and_plans_warm_up():
    hp = tiny_hp(TRAIN_SEQ_SCHEDULE="128@1.0,64@0.3", ENABLE_LOOPING_AT="0.5")
    hp.validate(check_files=False)
    stages = T.parse_seq_schedule(hp)
    assert stages == [T.SeqStage(64, 0.3), T.SeqStage(128, 1.0)]
    assert [T.stage_at(stages, p).length for p in (0.0, 0.3, 0.31, 1.0)] == [64, 64, 128, 128]
    assert T.shapes_to_warm(hp) == [(64, False), (128, False), (128, True)]  # (64, looping) is never hit
    assert T.parse_seq_schedule(tiny_hp()) == [T.SeqStage(128, 1.0)]
    for bad in ("64@0.5,96@1.0", "64@0.5", "64,128", "128@1.5"):  # 96 does not divide 256; max != TRAIN_SEQ_LEN
        with pytest.raises(T.ConfigError, match="TRAIN_SEQ_SCHEDULE"):
            tiny_hp(TRAIN_SEQ_SCHEDULE=bad).validate(check_files=False)


def test_piece_cut_forward_equals_documents_run_apart():
    """A flat row cut every piece_len tokens gives each piece exactly the loss it has alone in its own row
    (attention stays inside a piece and rotary positions restart there). SmearGate off: like the record, it
    carries the previous token of the same document across a cut."""
    hp = tiny_hp(SMEAR_GATE_ENABLED="0")
    m = randomize(T.GPT(hp, 1), seed=2, scale=0.05)
    m.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 1024, (1, 257), generator=g)
    ids[0, [0, 50, 200]] = 1
    x, y = ids[:, :-1], ids[:, 1:]
    m.doc_piece_len = 64
    with torch.no_grad():
        flat = m(x, y, reduction="none")[0]
        starts = T.segment_starts(x, 1, 64)[0].nonzero().flatten().tolist() + [256]
        apart = torch.cat([m(x[:, a:b], y[:, a:b], reduction="none")[0] for a, b in zip(starts, starts[1:])])
    assert torch.allclose(flat, apart, atol=1e-5)
    m.doc_piece_len = 0
    with torch.no_grad():
        assert not torch.allclose(m(x, y, reduction="none")[0], flat, atol=1e-3)  # the cut is real


def test_progressive_context_switches_and_rewarms_the_lr(sample, tmp_path):
    hp = T.Hyperparameters.from_env({**{k: v for k, v in tiny_env().items()}, **sample,
                                     "TRAIN_SEQ_SCHEDULE": "64@0.5,128@1.0", "TRAIN_SEQ_SCHEDULE_MODE": "step",
                                     "ITERATIONS": "6", "MAX_WALLCLOCK_SECONDS": "0", "SEQ_CHANGE_WARMUP_STEPS": "4"})
    lines = []
    rt = dataclasses.replace(cpu_runtime(tmp_path), logger=T.RunLogger([], enabled=False))
    rt.logger.log = lambda msg, *a, **k: lines.append(msg)
    luts = T.build_byte_luts(T.load_tokenizer(hp.tokenizer_path, hp.vocab_size), hp.vocab_size)
    model = T.GPT(hp, luts.bos_id)
    seen = []
    real_step = T.make_train_step

    def spy(hp_, rt_, model_, opt_):
        step = real_step(hp_, rt_, model_, opt_)
        return lambda loader, s, frac, lr_scale=1.0: (seen.append((model_.doc_piece_len, lr_scale)),
                                                      step(loader, s, frac, lr_scale))[1]
    T.make_train_step, saved = spy, T.make_train_step
    try:
        res, _ = T.train(hp, rt, model, T.list_shards(hp.resolved_paths()[0], "train"), None, luts)
    finally:
        T.make_train_step = saved
    timed = seen[-6:]
    assert [p for p, _ in timed] == [64, 64, 64, 64, 128, 128] and res.steps == 6  # progress step/6 <= 0.5: 64
    assert [s for _, s in timed] == [1.0, 1.0, 1.0, 1.0, 0.25, 0.5]
    assert any("train_seq_len: 64 -> 128 step:4" in ln for ln in lines)
    assert any("piece:64 looping:0" in ln for ln in lines) and any("piece:128 looping:1" in ln for ln in lines)
    assert model.doc_piece_len == 0


def tiny_env():
    from conftest import TINY
    return dict(TINY)


def test_asym_softcap_learns_and_round_trips():
    hp = tiny_hp(ASYM_LOGIT_RESCALE="1")
    m = randomize(T.GPT(hp, 1), seed=1, scale=0.1)
    with torch.no_grad():
        m.softcap_pos.fill_(30.0)
        m.softcap_neg.fill_(30.0)
    opt = T.Optimizers(m, hp, 1, 0)
    assert any(p is m.softcap_pos for g in opt.adam.param_groups for p in g["params"])
    x = torch.randint(2, 1024, (2, 64))
    loss = m(x, torch.roll(x, -1, 1))
    loss.backward()
    assert m.softcap_pos.grad is not None and m.softcap_neg.grad is not None and m.softcap_pos.grad != 0
    opt.step()
    assert float(m.softcap_pos.detach()) != 30.0 and float(m.softcap_neg.detach()) != 30.0
    entries = {n: T.direct_entry(n, t.detach(), hp) for n, t in m.state_dict().items() if "softcap" in n}
    blob = T.pack_artifact(entries, {}, "zstd")
    back = T.dequantize_state(T.unpack_artifact(blob)[0], hp.lqer_asym_group)
    assert torch.allclose(back["softcap_pos"], m.softcap_pos.detach(), atol=0.02)
    z = torch.tensor([[-40.0, -5.0, 5.0, 40.0]])
    capped = T.softcap(z, torch.tensor(20.0), torch.tensor(35.0))
    expect = torch.where(z >= 0, 20 * torch.tanh(z / 20), 35 * torch.tanh(z / 35))
    assert torch.allclose(capped, expect) and capped[0, 0] < -28 and capped[0, 3] < 20


def test_gate_storage_flag():
    gate = torch.randn(2, 8)
    assert T.quant_kind("blocks.0.attn.attn_gate_w", gate, tiny_hp()) == "int8_row"
    assert T.quant_kind("blocks.0.attn.attn_gate_w", gate, tiny_hp(GATED_ATTN_QUANT_GATE="0")) == "fp16"


def awq_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(96, 256, generator=g) * 0.05
    X = torch.randn(4096, 256, generator=g)
    X[:, 64:128] *= 6.0  # one salient group of input channels
    return {"w.weight": W}, {"w.weight": X.T @ X / 4096}


def test_awq_lite_picks_the_salient_group_and_lowers_its_error():
    state, hessians = awq_case()
    hp0 = tiny_hp(QUANT_MIN_NUMEL="1024", LQER_ENABLED="0", AWQ_LITE_GROUP_SIZE="64")
    hp1 = tiny_hp(QUANT_MIN_NUMEL="1024", LQER_ENABLED="0", AWQ_LITE_GROUP_SIZE="64", AWQ_LITE_ENABLED="1")
    stats = T.clip_stats(state, hessians, ["w.weight"], hp1)
    assert T.awq_lite_groups(state, hessians, stats, hp1) == {"w.weight": [64]}
    assert T.awq_lite_groups(state, hessians, stats, hp0) == {}
    errs = {}
    for name, hp in (("off", hp0), ("on", hp1)):
        entries, _ = T.quantize_state(state, hessians, hp, log=lambda *_: None)
        e = entries["w.weight"]
        Wq = T.dequantize_entry(e, hp.lqer_asym_group)
        errs[name] = T.hessian_weighted_error(state["w.weight"], Wq, hessians["w.weight"])
        if name == "on":
            assert e.awq["starts"] == [64] and e.awq["q"].shape == (96, 64) and int(e.awq["q"].abs().max()) > 31
            assert int(e.q[:, 64:128].abs().max()) == 0 and int(e.q.abs().max()) <= 31
            for comp in ("zstd", "rans"):
                back = T.unpack_artifact(T.pack_artifact(entries, {}, comp))[0]["w.weight"]
                assert torch.equal(T.dequantize_entry(back, hp.lqer_asym_group), Wq)
    assert errs["on"] < 0.8 * errs["off"]


def test_frontier_preset_sets_every_technique_and_sota_none():
    fr, sota = T.Hyperparameters.from_env({"PRESET": "frontier"}), T.Hyperparameters.from_env({})
    fr.validate(check_files=False)
    expect = dict(ngram_tilt_enabled=True, eval_seq_len=2560, ttt_eval_seq_len=2560, phased_ttt_num_phases=1,
                  ttt_lora_lr=8e-5, ttt_weight_decay=2.0, ttt_k_lora=False, matrix_lr=0.028,
                  gptq_calibration_batches=32, lqer_asym_group=32, gated_attn_quant_gate=False,
                  train_seq_schedule="1024@0.1,2048@0.7,3072@1.0", qk_gain_init=5.25, awq_lite_enabled=True, lqer_rank=2, lqer_top_k=4)
    for k, v in expect.items():
        assert getattr(fr, k) == v, k
        assert getattr(sota, k) != v, k
    assert not sota.asym_logit_rescale and sota.ttt_mask == "" and sota.ttt_local_lr_mult == 1.0


def test_no_validation_token_reaches_training_or_calibration(sample, monkeypatch, tmp_path):
    """The packed training loader (flat rows, every piece length) and the GPTQ calibration loader open only
    fineweb_train_* shards; validation tokens enter only the scoring path (and TTT after they are scored)."""
    opened = []
    real = T.load_shard
    monkeypatch.setattr(T, "load_shard", lambda p, mmap=True: (opened.append(p), real(p, mmap))[1])
    hp = tiny_hp(**sample, TRAIN_SEQ_SCHEDULE="64@0.5,128@1.0", GPTQ_CALIBRATION_BATCHES="2")
    files = T.list_shards(hp.resolved_paths()[0], "train")
    rt = cpu_runtime(tmp_path)
    m = T.GPT(hp, 1)
    ld = T.make_train_loader(hp, rt, files)
    for piece in (64, 128):
        m.doc_piece_len = piece
        x, y = ld.next_batch()
        m(x, y).backward()
    T.collect_hessians(m, T.calibration_loader(hp, rt, files), 2, hp, rt)
    assert opened and all("fineweb_train_" in p and "_val_" not in p for p in opened)
