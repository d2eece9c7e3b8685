
import pytest
import torch

from conftest import T, run_on_ranks, tiny_hp


def scalar_map(s, coeffs, steps):
    """Newton-Schulz acts on each singular value s of X/||X||_F by s <- a s + b s^3 + c s^5."""
    tab = T.NS_COEFFICIENTS[coeffs]
    for i in range(steps):
        a, b, c = tab[min(i, len(tab) - 1)]
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def _check_band(G, coeffs, lo_expected):
    out = torch.linalg.svdvals(T.orthogonalize(G, 5, coeffs))
    s_in = (torch.linalg.svdvals(G) / G.norm()).double()
    predicted = scalar_map(s_in, coeffs, 5)
    assert torch.allclose(out.double(), predicted.sort(descending=True).values, rtol=1e-3, atol=1e-4)
    return out


def test_polar_express_singular_values_near_one_random():
    G = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    out = _check_band(G, "polar_express", 0.85)
    # Polar Express equioscillates around 1: its 5-step band for these inputs is 1 +- 0.142
    assert out.min() > 0.85 and out.max() < 1.15
    std = torch.linalg.svdvals(T.orthogonalize(G, 5, "standard"))
    assert out.min() > std.min()  # tighter than the stock quintic


def test_polar_express_ill_conditioned_and_tall():
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(384, 128, generator=g))
    V, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
    S = torch.logspace(-3, 0, 128)
    G = U @ torch.diag(S) @ V.T  # tall: exercised through the transpose path
    out = _check_band(G, "polar_express", 0.0)
    s_in = torch.linalg.svdvals(G) / G.norm()
    big = out[s_in.sort(descending=True).values > 5e-3]
    assert out.max() < 1.15 and big.min() > 0.85  # every direction above 0.5% of the norm is equalised


def test_lr_multiplier_phases():
    hp = tiny_hp(WARMDOWN_FRAC="0.5", MIN_LR="0.1", LR_WARMUP_STEPS="10")
    assert T.lr_multiplier(0.0, 0, hp) == pytest.approx(0.1)          # warm-up
    assert T.lr_multiplier(0.2, 4, hp) == pytest.approx(0.5)
    assert T.lr_multiplier(0.3, 50, hp) == pytest.approx(1.0)         # plateau
    assert T.lr_multiplier(0.75, 50, hp) == pytest.approx(0.5)        # warmdown
    assert T.lr_multiplier(0.97, 50, hp) == pytest.approx(0.1)        # floor
    hp0 = tiny_hp(WARMDOWN_FRAC="0", LR_WARMUP_STEPS="0")
    assert T.lr_multiplier(0.99, 5, hp0) == 1.0
    assert T.muon_momentum_at(0, hp) == hp.muon_momentum_warmup_start
    assert T.muon_momentum_at(10**6, hp) == hp.muon_momentum


def test_ema_update_and_apply():
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = T.ModelEMA(m, 0.9)
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 1.1))
    ema.apply_to(m)
    assert torch.allclose(m.weight, torch.full((2, 3), 1.1))


def test_budget_stops_early_when_hessians_are_slow():
    hp = tiny_hp(MAX_WALLCLOCK_SECONDS="100", GPTQ_RESERVE_SECONDS="2", ITERATIONS="0")
    assert T.stop_reason(80.0, 100, 0.5, hp, hessian_estimate_s=5.0) == ""
    assert T.stop_reason(80.0, 100, 0.5, hp, hessian_estimate_s=18.0) == "wallclock_cap"
    assert T.usable_train_seconds(hp, 18.0) == 80.0
    assert T.training_fraction(40.0, 0, hp, 18.0) == pytest.approx(0.5)
    fixed = tiny_hp(MAX_WALLCLOCK_SECONDS="0", ITERATIONS="10")
    assert T.stop_reason(1e9, 9, 1.0, fixed, 100.0) == "" and T.stop_reason(0, 10, 1.0, fixed, 0) == "iterations"


def test_train_with_fake_clock_reserves_hessian_time(sample, tmp_path, monkeypatch):
    """A fake clock makes every step take 1 s and every Hessian batch 2 s: training must stop so that
    steps + measured Hessian cost + reserve fit in MAX_WALLCLOCK_SECONDS."""
    from conftest import cpu_runtime
    hp = tiny_hp(**sample, MAX_WALLCLOCK_SECONDS="40", GPTQ_RESERVE_SECONDS="1", GPTQ_CALIBRATION_BATCHES="4",
                 ITERATIONS="1000", WARMUP_STEPS="0", EMA_DECAY="0")
    rt = cpu_runtime(tmp_path)
    now = [0.0]
    real_collect = T.collect_hessians

    def slow_collect(*a, **k):
        now[0] += 2.0
        return real_collect(*a, **k)
    monkeypatch.setattr(T, "collect_hessians", slow_collect)
    real_step = T.Optimizers.step

    def slow_step(self):
        now[0] += 1.0
        return real_step(self)
    monkeypatch.setattr(T.Optimizers, "step", slow_step)
    sp = T.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    luts = T.build_byte_luts(sp, hp.vocab_size)
    model = T.GPT(hp, luts.bos_id)
    res, _ = T.train(hp, rt, model, T.list_shards(hp.data_path, "train"), None, luts, clock=lambda: now[0])
    assert res.hessian_estimate_s == pytest.approx(T.HESSIAN_ESTIMATE_SAFETY * 2.0 * 4)  # 12 s
    assert res.stop_reason == "wallclock_cap"
    assert res.steps == 27  # 40 - 12 - 1 = 27 usable seconds at 1 s per step
    assert res.train_time_ms / 1000 + 4 * 2.0 <= 40


def _muon_worker(rank, world):
    torch.manual_seed(0)
    hp = tiny_hp(GRAD_CLIP_NORM="0.05")  # clipping active: it must act on the averaged gradient
    m = T.GPT(hp, 1)
    m.looping = True
    opt = T.Optimizers(m, hp, world, rank)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        ids = torch.randint(2, 1024, (4, 65), generator=g)
        ids[:, 0] = 1
        mine = ids[rank * 4 // world: (rank + 1) * 4 // world]
        m(mine[:, :-1], mine[:, 1:]).backward()
        opt.set_schedule(1.0, 0.9)
        opt.step()
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_sharded_muon_two_ranks_match_one_process(tmp_path):
    outs = run_on_ranks(_muon_worker, tmp_path)
    for k in outs[1]:
        assert torch.allclose(outs[1][k], outs[2][k], atol=2e-5, rtol=1e-4), k
    torch.manual_seed(0)
    init = T.GPT(tiny_hp(), 1).state_dict()
    assert not torch.allclose(outs[1]["blocks.0.attn.c_q.weight"], init["blocks.0.attn.c_q.weight"])  # it trained
