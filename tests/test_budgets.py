"""The two time budgets under jitter, on fake clocks: MAX_WALLCLOCK_SECONDS for training + Hessians (an
impossible one refused before training), EVAL_TIME_BUDGET for the whole eval (TTT cuts adaptation, never
scoring)."""
import pytest
import torch

import sys

from conftest import ROOT, TINY, T, cpu_runtime, randomize, tiny_hp

# The training tests run a few dozen real steps of the smallest model (the fake clock decides the budget), each
# step one 128-token row (no gradient accumulation: the stop rule sees optimizer steps, not micro-steps).
SMALL = dict(NUM_LAYERS="2", LOOP_START="0", LOOP_END="0", PARALLEL_START_LAYER="1", XSA_LAST_N="2",
             TRAIN_BATCH_TOKENS="128")


def fake_training(monkeypatch, step_s, hessian_batch_s):
    """A fake clock: optimizer step n costs step_s(n) seconds, a Hessian batch hessian_batch_s(now) (a slower
    machine makes both slower). Returns (clock, steps taken, Hessian seconds the real collection would take)."""
    now, steps = [0.0], [0]

    def hessians(model, loader, batches, hp, rt):
        now[0] += hessian_batch_s(now[0]) * batches
        return {}
    monkeypatch.setattr(T, "collect_hessians", hessians)
    real_step = T.Optimizers.step

    def step(self):
        now[0] += step_s(steps[0])
        steps[0] += 1
        return real_step(self)
    monkeypatch.setattr(T.Optimizers, "step", step)
    return (lambda: now[0]), steps, (lambda batches: hessian_batch_s(now[0]) * batches)


def run_train(hp, tmp_path, clock):
    sp = T.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    model = T.GPT(hp, T.build_byte_luts(sp, hp.vocab_size).bos_id, "sdpa")
    return T.train(hp, cpu_runtime(tmp_path, grad_accum=1), model, T.list_shards(hp.data_path, "train"), None, None,
                   clock=clock)[0]


def test_budget_without_training_time_is_refused_before_training(sample, tmp_path, monkeypatch):
    """PRESET=sota at a small shape once reserved 872 s of Hessians out of 300 s and trained one step. Now a
    config error, naming the three settings and the numbers, before any training step."""
    clock, steps, _ = fake_training(monkeypatch, lambda n: 1.0, lambda now: 6.0)
    hp = tiny_hp(**sample, **SMALL, MAX_WALLCLOCK_SECONDS="100", GPTQ_CALIBRATION_BATCHES="16",
                 GPTQ_RESERVE_SECONDS="2")
    with pytest.raises(T.ConfigError) as e:
        run_train(hp, tmp_path, clock)
    msg = str(e.value)  # 16 x 6 s = 96 s of Hessians in a 100 s budget
    for part in ("MAX_WALLCLOCK_SECONDS=100", "GPTQ_CALIBRATION_BATCHES=16", "CALIBRATION_BATCH_TOKENS=1024",
                 "96.0s", "6.00s per batch"):
        assert part in msg, (part, msg)
    assert steps[0] == 0
    ok = tiny_hp(**sample, **SMALL, MAX_WALLCLOCK_SECONDS="400", GPTQ_CALIBRATION_BATCHES="16", ITERATIONS="2")
    assert run_train(ok, tmp_path, clock).steps == 2  # 400 - 96 - 2 = 302 s left: over half, accepted


@pytest.mark.parametrize("offset", [0, 3])
def test_stop_rule_holds_with_recurring_slow_steps(sample, tmp_path, monkeypatch, offset):
    """One step in ten takes 5x the others. The mean-of-all-steps rule ran 3 s into the reserved Hessian time
    when a slow step came last (offset 0); the slowest-of-recent-steps rule never does."""
    clock, _, actual_hessians = fake_training(monkeypatch, lambda n: 5.0 if (n + offset) % 10 == 0 else 1.0,
                                              lambda now: 1.0)
    hp = tiny_hp(**sample, **SMALL, MAX_WALLCLOCK_SECONDS="80", GPTQ_CALIBRATION_BATCHES="4",
                 GPTQ_RESERVE_SECONDS="2", ITERATIONS="0", WARMUP_STEPS="0", EMA_DECAY="0")
    res = run_train(hp, tmp_path, clock)
    assert res.stop_reason == "wallclock_cap" and res.steps > 40
    assert res.train_time_ms / 1000 + res.hessian_estimate_s + hp.gptq_reserve_seconds <= 80
    assert res.train_time_ms / 1000 + actual_hessians(4) <= 80


def test_hessian_reserve_follows_a_slowdown(sample, tmp_path, monkeypatch):
    """The machine gets 2x slower after 30 steps (steps and calibration alike): the reserved Hessian time grows
    with the measured step slowdown, so training + the real (slower) Hessian collection still fits."""
    clock, _, actual_hessians = fake_training(monkeypatch, lambda n: 1.0 if n < 30 else 2.0,
                                              lambda now: 2.0 if now > 30 else 1.0)
    hp = tiny_hp(**sample, **SMALL, MAX_WALLCLOCK_SECONDS="120", GPTQ_CALIBRATION_BATCHES="20",
                 GPTQ_RESERVE_SECONDS="1", ITERATIONS="0", WARMUP_STEPS="0", EMA_DECAY="0")
    res = run_train(hp, tmp_path, clock)
    assert res.hessian_estimate_s == pytest.approx(2 * 20 * 1.0)
    assert res.train_time_ms / 1000 + actual_hessians(20) <= 120 - 1  # 40 s of Hessians now, not the 20 probed


class TimedBatches:
    """Calibration batches on a fake clock: batch n costs cost(n) seconds."""

    def __init__(self, cost, seed=0):
        self.g, self.cost, self.n, self.now = torch.Generator().manual_seed(seed), cost, 0, 0.0

    def next_batch(self):
        self.now += self.cost(self.n)
        self.n += 1
        ids = torch.randint(2, 1024, (2, 64), generator=self.g)
        ids[:, 0] = 1
        return ids, ids


def calibrate(tmp_path, cost, stop_reason="wallclock_cap", train_s=90.0, **env):
    """collect_hessians under calibration_deadline() after `train_s` of training in a 100 s budget."""
    hp = tiny_hp(MAX_WALLCLOCK_SECONDS="100", GPTQ_RESERVE_SECONDS="1", GPTQ_CALIBRATION_BATCHES="4",
                 NUM_LAYERS="1", XSA_LAST_N="1", NUM_LOOPS="0", LOOP_START="0", LOOP_END="0",
                 PARALLEL_START_LAYER="0", **env)
    model = T.GPT(hp, 1, "sdpa")
    batches = TimedBatches(cost)
    res = T.TrainResult(train_time_ms=train_s * 1000, stop_reason=stop_reason)
    deadline = T.calibration_deadline(hp, res, torch.device("cpu"), 0.0, clock=lambda: batches.now)
    H = T.collect_hessians(model, batches, hp.gptq_calibration_batches, hp, cpu_runtime(tmp_path), deadline)
    return H, deadline, batches, hp, model


def test_hessian_collection_stops_at_the_budget(tmp_path):
    """Training left 10 s - 1 s reserve for Hessians. A quiet machine (1 s a batch) fills them with 9 batches where
    4 were planned; one that slows to 4 s a batch after two stops at 6 (the estimate said 4 s in all); an ITERATIONS
    stop collects the planned 4; a budget already spent still collects the floor, counted as forced. The Hessian
    is the mean over the batches collected, whatever their number."""
    H, d, b, hp, model = calibrate(tmp_path, lambda n: 1.0)
    assert (d.batches, d.forced, b.now) == (9, 0, 9.0)
    again = T.collect_hessians(model, TimedBatches(lambda n: 1.0), 9, hp, cpu_runtime(tmp_path))
    assert all(torch.allclose(H[k], again[k]) for k in H)
    _, d, b, _, _ = calibrate(tmp_path, lambda n: 1.0 if n < 2 else 4.0)
    assert (d.batches, d.forced, b.now) == (3, 0, 6.0)  # a 4th batch would end at 10 > 9
    _, d, b, _, _ = calibrate(tmp_path, lambda n: 1.0, stop_reason="iterations")
    assert (d.batches, d.forced) == (4, 0)
    _, d, b, _, _ = calibrate(tmp_path, lambda n: 1.0, train_s=99.5, GPTQ_MIN_CALIBRATION_BATCHES="2")
    assert (d.batches, d.forced, d.floor) == (2, 2, 2)
    _, d, _, _, _ = calibrate(tmp_path, lambda n: 1.0, train_s=99.5, GPTQ_MIN_CALIBRATION_BATCHES="9")
    assert d.batches == 4  # the floor is at most the planned batches
    assert T.calibration_deadline(tiny_hp(MAX_WALLCLOCK_SECONDS="0"), T.TrainResult(), torch.device("cpu"), 0) \
        is None


def slowed_forward(monkeypatch, slow_after_s, factor):
    """A fake clock charged by every model forward: 1 ms per token without gradients, 3 ms with (forward +
    backward), times `factor` once the clock passes slow_after_s."""
    now = [0.0]
    real = T.GPT.forward

    def forward(self, ids, *a, **k):
        out = real(self, ids, *a, **k)
        cost = ids.numel() * 1e-3 * (3.0 if torch.is_grad_enabled() else 1.0)
        now[0] += cost * (factor if now[0] > slow_after_s else 1.0)
        return out
    monkeypatch.setattr(T.GPT, "forward", forward)
    return lambda: now[0]


def ttt_eval(hp, val, tmp_path, clock, logs):
    torch.manual_seed(0)
    model = randomize(T.GPT(hp, 1, "sdpa"), scale=0.05)
    model.looping = True
    t0 = clock()
    res = T.eval_ttt(model, val, hp, cpu_runtime(tmp_path), "ttt", True, True, t0, logs.append, clock)
    return res, clock() - t0


def test_eval_budget_holds_when_ttt_slows_down(monkeypatch, tmp_path):
    """The throughput probe once said 126 tok/s, scoring then ran at ~50 and eval took 677 s of 180. Here the
    machine gets 4x slower a third of the way through: TTT re-plans from measured progress, drops adaptation
    (global SGD phases, grad steps, down to score-only batches) and still scores every token once, in budget."""
    from test_cuda_nets import synthetic_val
    val = synthetic_val(6000, 40, 5)
    hp = tiny_hp(PHASED_TTT_PREFIX_DOCS="20", PHASED_TTT_NUM_PHASES="2", TTT_BATCH_SIZE="4", TTT_GRAD_STEPS="2",
                 EVAL_TIME_BUDGET="1000", EVAL_CLOCK="strict")  # the budget counts the probe too
    logs = []
    res, nominal = ttt_eval(hp, val, tmp_path, slowed_forward(monkeypatch, 1e9, 1.0), logs)
    c = res.info["cuts"]
    assert (c["fewer_grad_steps"], c["score_only"], c["phases_dropped"], c["grad_steps"]) == (0, 0, 0, 2)
    budget = 1.25 * nominal
    hp = tiny_hp(PHASED_TTT_PREFIX_DOCS="20", PHASED_TTT_NUM_PHASES="2", TTT_BATCH_SIZE="4", TTT_GRAD_STEPS="2",
                 EVAL_TIME_BUDGET=str(budget), EVAL_CLOCK="strict")
    logs = []
    res, took = ttt_eval(hp, val, tmp_path, slowed_forward(monkeypatch, nominal / 3, 4.0), logs)
    cuts = res.info["cuts"]
    assert took <= budget, (took, budget, cuts)
    assert res.tokens == val.num_targets  # every token scored exactly once (ScoreBoard checks it with keep_losses)
    assert cuts["fewer_grad_steps"] + cuts["score_only"] + cuts["phases_dropped"] > 0
    assert any(line.startswith("ttt_budget: to keep EVAL_TIME_BUDGET") and "every token still scored" in line
               for line in logs), logs


def test_ttt_row_tokens_is_the_sum_over_chunks():
    """TTTPlan's unit of work: the tokens of every TTT row a document produces (closed form vs the sum)."""
    def rows_of(length, C, ctx):
        pred = length - 1
        return sum(min(min((c + 1) * C, pred), ctx) for c in range(-(-pred // C)))
    for length in (2, 3, 48, 49, 97, 1000, 2049, 5000):
        for C, ctx in ((48, 2048), (32, 128), (64, 64), (48, 2560)):
            assert T.ttt_row_tokens(length, C, ctx) == rows_of(length, C, ctx), (length, C, ctx)


def test_score_only_ttt_runs_no_rows_for_finished_documents(monkeypatch, tmp_path):
    """A batch planned score-only took 262 s where TTTPlan projected ~42 s: the cpu_smoke batch holds one
    16,649-token document and seven short ones, and every one of its 261 chunks ran all 8 rows, 7 of them padding
    once the short documents ended. The plan's unit (ttt_row_tokens) must be what the forwards compute."""
    lengths = [2000] + [40] * 7  # one long document, seven short: sorted longest first into one batch
    toks = torch.randint(2, 1024, (sum(lengths) - len(lengths) + 1,), generator=torch.Generator().manual_seed(0))
    starts = [sum(L - 1 for L in lengths[:i]) for i in range(len(lengths))]
    toks[starts] = 1
    val = T.ValidationData(toks, torch.ones(toks.numel() - 1, dtype=torch.int32), "synthetic")
    hp = tiny_hp(TTT_BATCH_SIZE="8")
    model = randomize(T.GPT(hp, 1, "sdpa"), scale=0.05)
    model.looping = True
    docs = T.find_docs(val.tokens, 1)
    assert sorted(L for _, L in docs) == sorted(lengths)
    computed = [0]
    real = T.GPT.forward

    def counting(self, ids, *a, **k):
        computed[0] += ids.numel()
        return real(self, ids, *a, **k)
    monkeypatch.setattr(T.GPT, "forward", counting)
    board = T.ScoreBoard(val, torch.device("cpu"), True)
    T.ttt_score_docs(model, val, docs, list(range(len(docs))), hp, cpu_runtime(tmp_path), board, 0)
    row_tokens = sum(T.ttt_row_tokens(L, hp.ttt_chunk_size, hp.ttt_eval_seq_len) for _, L in docs)
    assert board.result("ttt", 0.0).tokens == val.num_targets  # every token scored once (keep_losses checks)
    assert computed[0] <= 1.25 * row_tokens, (computed[0], row_tokens)  # was 7.6x: rows of finished documents


def test_both_budgets_hold_beside_a_busy_process(sample, tmp_path):
    """bench/load_budget.py's short form: train_gpt.py at the smallest shape beside one busy loop it starts,
    12 s of training + Hessians and 18 s of eval. Both budgets hold, every token is scored, nothing is flagged
    OVER or ERROR. The eval's fixed part (artifact load, plain eval, probe, scoring) is kept to ~1/3 of its
    budget on a quiet machine: scoring every token is never cut, so a budget it alone exceeds cannot hold."""
    sys.path.insert(0, ROOT)
    from bench import load_budget
    env = {**TINY, **sample, "ITERATIONS": "0", "EVAL_TIME_BUDGET": "18", "GPTQ_RESERVE_SECONDS": "0.25",
           "VAL_MAX_TOKENS": "2048", "EVAL_STRIDE": "0", "TTT_CHUNK_SIZE": "64", "SAVE_PREQUANT": "0",
           "TRAIN_LOG_EVERY": "1000", "OMP_NUM_THREADS": "1"}
    r = load_budget.run_once(1, 12.0, env, str(tmp_path))
    assert r["train_budget_ok"] and r["train_plus_hessian_s"] <= 12.0, (r["train_plus_hessian_s"], r["flagged"])
    assert r["eval_budget_ok"] and r["eval_s"] <= 18.0, (r["eval_s"], r["load_after"], r["flagged"])
    assert r["all_tokens_scored"], r
    assert not [ln for ln in r["flagged"] if "OVER" in ln or "ERROR" in ln], r["flagged"]
    assert r["hessian_batches"] >= 1 and r["steps"] > 0, r
