import pytest
import torch

from conftest import T, randomize, tiny_hp

FLAGS = {  # env override that turns each feature off (the tiny config has them all on)
    "smear_gate": {"SMEAR_GATE_ENABLED": "0"},
    "sparse_attn_gate": {"SPARSE_ATTN_GATE_ENABLED": "0"},
    "xsa": {"XSA_LAST_N": "0"},
    "skip_gates": {"SKIP_GATES_ENABLED": "0"},
    "parallel_lanes": {"PARALLEL_START_LAYER": "0"},
    "parallel_final_lane": {"PARALLEL_FINAL_LANE": "attn"},
    "ln_scale": {"LN_SCALE": "0"},
    "partial_rope": {"ROPE_DIMS": "0"},
    "leaky_relu": {"MLP_NEGATIVE_SLOPE": "0"},
    "softcap": {"LOGIT_SOFTCAP": "0"},
    "qk_gain_init": {"QK_GAIN_INIT": "1.5"},
    "tie_embeddings": {"TIE_EMBEDDINGS": "0"},
    "yarn": {"ROPE_YARN": "1", "TRAIN_SEQ_LEN": "64"},
}


def _ids(B=2, L=128, seed=0, bos=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1024, (B, L), generator=g)
    ids[:, 0] = bos
    ids[:, min(50, L - 1)] = bos
    if B > 1 and L > 90:
        ids[1, 90] = bos
    return ids


def test_default_parameter_count_matches_record():
    assert T.count_parameters(T.GPT(T.Hyperparameters.from_env({}), 1)) == 35_945_671


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_each_feature_flag_changes_the_output(flag):
    on_hp, off_hp = tiny_hp(), tiny_hp(**FLAGS[flag])
    on = randomize(T.GPT(on_hp, 1))
    off = T.GPT(off_hp, 1)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k in off.state_dict()}, strict=False)
    if flag == "qk_gain_init":  # an init value: the shared weights are random, the gains keep their inits
        for model, hp in ((on, on_hp), (off, off_hp)):
            for b in model.blocks:
                b.attn.q_gain.data.fill_(hp.qk_gain_init)
    if flag == "tie_embeddings":
        off.lm_head.weight.data.copy_(on.tok_emb.weight)  # same numbers, separate parameter
        assert T.count_parameters(off) > T.count_parameters(on)
    ids = _ids(L=128)
    with torch.no_grad():
        a, b = on.forward_logits(ids), off.forward_logits(ids)
        if flag == "softcap":
            a, b = on(ids, ids), off(ids, ids)
    if flag == "tie_embeddings":
        assert torch.allclose(a, b, atol=1e-5)  # tying only shares storage; training then diverges
        return
    assert not torch.allclose(a, b, atol=1e-6), f"{flag} did nothing"


def test_looping_changes_order_not_parameters():
    hp = tiny_hp()
    m = randomize(T.GPT(hp, 1))
    n_params = T.count_parameters(m)
    ids = _ids()
    with torch.no_grad():
        off = m.forward_logits(ids)
        m.looping = True
        on = m.forward_logits(ids)
    assert T.count_parameters(m) == n_params and not torch.allclose(off, on)
    assert T.layer_schedule(11, True, 2, 3, 5) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert T.layer_schedule(11, False, 2, 3, 5) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])


@pytest.mark.parametrize("looping", [False, True])
def test_no_information_crosses_a_document_boundary(looping):
    """Changing any token of document N leaves every output of document N+1 unchanged."""
    m = randomize(T.GPT(tiny_hp(), 1), seed=3)
    m.looping = looping
    ids = _ids(B=1, L=128)  # docs: [0,50) [50,128)
    with torch.no_grad():
        base = m.forward_logits(ids)
        for pos in (0 + 1, 25, 49):
            alt = ids.clone()
            alt[0, pos] = (alt[0, pos] + 7) % 1000 + 2
            out = m.forward_logits(alt)
            assert torch.equal(out[0, 50:], base[0, 50:]), f"token {pos} of doc 0 leaked into doc 1"
            assert not torch.equal(out[0, pos:50], base[0, pos:50])


@pytest.mark.parametrize("hkv", [1, 2])
def test_sdpa_attention_matches_per_document_reference(hkv):
    g = torch.Generator().manual_seed(1)
    B, Tn, H, D = 2, 37, 4, 16
    q, k, v = (torch.randn(B, Tn, h, D, generator=g) for h in (H, hkv, hkv))
    ids = torch.randint(2, 50, (B, Tn), generator=g)
    ids[0, [0, 9, 30]] = 1
    ids[1, [5, 6]] = 1
    doc = T.prepare_attention("sdpa", ids, 1)
    assert torch.allclose(T.attention_sdpa(q, k, v, doc), T.attention_reference(q, k, v, doc), atol=1e-5)


@pytest.mark.parametrize("hkv", [1, 2])
def test_banded_sdpa_on_a_flat_row_matches_reference(hkv):
    """A packed training row (one flat row, pieces of at most 8 tokens): the banded mask (each block of 8
    queries sees its own and the previous block of keys) equals the per-document reference, gradients too."""
    g = torch.Generator().manual_seed(2)
    Tn, H, D = 45, 4, 16
    q, k, v = (torch.randn(1, Tn, h, D, generator=g, requires_grad=True) for h in (H, hkv, hkv))
    ids = torch.randint(2, 50, (1, Tn), generator=g)
    ids[0, [3, 4, 20]] = 1
    doc = T.prepare_attention("sdpa", ids, 1, piece_len=8)
    assert doc.prepared.shape == (1, 6, 1, 8, 16)  # banded: T > 2 x piece_len
    out, ref = T.attention_sdpa(q, k, v, doc), T.attention_reference(q, k, v, doc)
    assert torch.allclose(out, ref, atol=1e-5)
    ga = torch.autograd.grad(out.square().sum(), (q, k, v))
    gb = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ga, gb))


def test_smear_gate_identity_at_init_and_masks_bos():
    m = T.GPT(tiny_hp(), 1)
    x = torch.randn(1, 6, 64)
    ids = torch.tensor([[1, 5, 6, 1, 7, 8]])
    assert torch.equal(m.smear(x, ids), x)  # lambda = 0 at init
    with torch.no_grad():
        m.smear_lambda.fill_(1.0)
    y = m.smear(x, ids)
    assert torch.equal(y[:, [0, 3]], x[:, [0, 3]]) and not torch.equal(y[:, 4], x[:, 4])


@pytest.mark.parametrize("flag", ["all_on"] + sorted(FLAGS))
def test_model_trains_with_each_flag(flag):
    hp = tiny_hp(**({} if flag == "all_on" else FLAGS[flag]), MATRIX_LR="0.02", GRAD_CLIP_NORM="1.0")
    torch.manual_seed(0)
    m = T.GPT(hp, 1)
    m.looping = True
    opt = T.Optimizers(m, hp, 1, 0)
    ids = _ids(B=4, L=64, seed=2)
    x, y = ids[:, :-1], ids[:, 1:]
    first = m(x, y).item()
    for _ in range(12):
        m(x, y).backward()
        opt.step()
    assert m(x, y).item() < first - 0.5
