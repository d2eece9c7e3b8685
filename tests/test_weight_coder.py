"""The weight coder (COMPRESSOR=rans): exact round trips, its contexts earn their keep on data that has the
structure they model, corrupt streams are refused, and the MLP hidden-unit sort keeps the model's function."""
import numpy as np
import pytest
import torch

from conftest import T, randomize, tiny_hp


def _laplace_codes(rng, rows, cols, bits, col_width):
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.round(rng.laplace(0, 1, (rows, cols)) * col_width), -qmax, qmax).astype(np.int64)


def _order0_bytes(codes):
    return T.order0_entropy_bytes(torch.from_numpy(codes))


def test_round_trip_across_roles_widths_and_bit_depths():
    rng = np.random.default_rng(0)
    tensors = [T.CodedTensor("mlp.fc", 64, _laplace_codes(rng, 40, 24, 6, rng.uniform(0.3, 6, 24))),
               T.CodedTensor("tok_emb", 128, _laplace_codes(rng, 17, 31, 7, 9.0)),
               T.CodedTensor("mlp.fc", 64, _laplace_codes(rng, 5, 24, 6, 2.0)),
               T.CodedTensor("attn.c_q", 16, _laplace_codes(rng, 9, 7, 4, 1.0)),
               T.CodedTensor("attn.c_q", 16, np.full((3, 7), -7, np.int64)),  # the extreme code, every time
               T.CodedTensor("tok_emb", 128, np.repeat(np.array([[63, -63, 0, 5]]), 6, 0) *
                             np.array([[1], [1], [-1], [-1], [1], [1]]))]  # difference rows that wrap around
    spec = T.CoderSpec()
    blob = T.rans_encode(tensors, spec)
    assert blob == T.rans_encode(tensors, spec)
    shapes = [t._replace(codes=np.broadcast_to(np.int64(0), t.codes.shape)) for t in tensors]
    for got, t in zip(T.rans_decode(blob, shapes, spec), tensors):
        assert got.codes.dtype == np.int64 and np.array_equal(got.codes, t.codes) and got.steps is None


def test_row_steps_ride_in_the_coder_stream():
    """Row-step indices (any length, the extremes of the range included) round-trip with the codes; the decoder
    sees only their count. A concentrated spread costs far fewer bits than the uniform 6 of the range."""
    rng = np.random.default_rng(1)
    h = T.STEP_HALF_RANGE
    steps = [np.round(rng.normal(0, 1.5, 300)).astype(np.int64).clip(1 - h, h - 1), np.array([1 - h, h - 1, 0]),
             None, np.round(rng.normal(0, 1.5, 1)).astype(np.int64)]
    tensors = [T.CodedTensor("mlp.fc", 64, _laplace_codes(rng, 300, 40, 6, 2.0), steps[0]),
               T.CodedTensor("attn.c_q", 16, _laplace_codes(rng, 3, 5, 4, 1.0), steps[1]),
               T.CodedTensor("attn.c_q", 16, _laplace_codes(rng, 3, 5, 4, 1.0), steps[2]),
               T.CodedTensor("mlp.fc", 64, _laplace_codes(rng, 1, 40, 6, 2.0), steps[3])]
    spec = T.CoderSpec()
    blob = T.rans_encode(tensors, spec)
    blind = [t._replace(codes=np.broadcast_to(np.int64(0), t.codes.shape),
                        steps=None if t.steps is None else np.zeros(len(t.steps), np.int64)) for t in tensors]
    for got, t in zip(T.rans_decode(blob, blind, spec), tensors):
        assert np.array_equal(got.codes, t.codes)
        assert (got.steps is None) == (t.steps is None) and (t.steps is None or np.array_equal(got.steps, t.steps))
    plain = len(T.rans_encode([t._replace(steps=None) for t in tensors], spec))
    assert len(blob) - plain < 304 * 3.5 / 8, (len(blob), plain)


def test_column_context_beats_order0_when_columns_differ_in_width():
    rng = np.random.default_rng(1)
    widths = np.exp(rng.uniform(np.log(0.4), np.log(8), 256))  # input channels 20x apart, as in trained models
    tensors = [T.CodedTensor("mlp.fc", 64, _laplace_codes(rng, 256, 256, 6, widths)) for _ in range(3)]
    order0 = sum(_order0_bytes(t.codes) for t in tensors)
    classes_only = len(T.rans_encode(tensors, T.CoderSpec(prev_clip=0, copy_percent=0)))
    default = len(T.rans_encode(tensors, T.CoderSpec()))  # the code-above context costs a little on iid rows
    without = len(T.rans_encode(tensors, T.CoderSpec(class_range=0, prev_clip=0, copy_percent=0)))
    assert without > 0.99 * order0  # an order-0 coder cannot see the columns
    assert classes_only < 0.95 * order0 and default < 0.97 * order0, (classes_only, default, order0)


def test_code_above_context_pays_on_similar_consecutive_rows():
    rng = np.random.default_rng(2)
    base = _laplace_codes(rng, 1, 256, 6, 3.0)
    walk = [base]
    for _ in range(255):  # each row a small perturbation of the one above (what the hidden-unit sort produces)
        walk.append(np.clip(walk[-1] + rng.integers(-1, 2, (1, 256)) * (rng.random((1, 256)) < 0.4), -31, 31))
    tensors = [T.CodedTensor("mlp.fc", 64, np.concatenate(walk))]
    on, off = (len(T.rans_encode(tensors, T.CoderSpec(prev_clip=p, copy_percent=0))) for p in (2, 0))
    assert on < 0.8 * off, (on, off)


def test_near_copies_of_the_row_above_are_coded_as_differences():
    rng = np.random.default_rng(4)
    rows = [_laplace_codes(rng, 1, 128, 7, 6.0)]
    for i in range(1, 300):  # a third of the rows repeat the one above with a few +-1 changes (rare tokens)
        if i % 3:
            rows.append(_laplace_codes(rng, 1, 128, 7, 6.0))
        else:
            rows.append(np.clip(rows[-1] + rng.integers(-1, 2, (1, 128)) * (rng.random((1, 128)) < 0.1), -63, 63))
    tensors = [T.CodedTensor("tok_emb", 128, np.concatenate(rows))]
    with_diff, without = (len(T.rans_encode(tensors, T.CoderSpec(copy_percent=c))) for c in (60, 0))
    assert with_diff < 0.8 * without, (with_diff, without)
    assert np.array_equal(T.rans_decode(T.rans_encode(tensors, T.CoderSpec()), tensors, T.CoderSpec())[0].codes,
                          tensors[0].codes)


def test_corrupt_or_truncated_streams_are_refused():
    rng = np.random.default_rng(3)
    tensors = [T.CodedTensor("mlp.fc", 64, _laplace_codes(rng, 64, 32, 6, 2.5))]
    spec = T.CoderSpec()
    blob = T.rans_encode(tensors, spec)
    for bad in (blob[:-2], blob[:100], blob[: len(blob) // 2], blob + b"\0\0"):
        with pytest.raises(T.ArtifactError):
            T.rans_decode(bad, tensors, spec)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x5A
    with pytest.raises(T.ArtifactError):
        T.rans_decode(bytes(flipped), tensors, spec)


def test_hidden_unit_sort_keeps_the_function_and_groups_similar_units():
    hp = tiny_hp()
    model = randomize(T.GPT(hp, 1, "sdpa"))
    x = torch.randint(0, hp.vocab_size, (2, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hess = {n: torch.randn(t.shape[1], t.shape[1]) for n, t in state.items() if ".mlp.proj." in n}
    sorted_state, sorted_hess = T.sort_hidden_units(state, hess)
    with torch.no_grad():
        ref = model.forward_hidden(x)
        model.load_state_dict(sorted_state)
        out = model.forward_hidden(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    fc = "blocks.0.mlp.fc.weight"
    assert not torch.equal(sorted_state[fc], state[fc])
    order = [int(torch.nonzero((state[fc] == row).all(1))[0]) for row in sorted_state[fc]]
    pn = fc.replace("fc", "proj")
    assert torch.equal(sorted_hess[pn], hess[pn][order][:, order])
    step = lambda w: float((w[1:] - w[:-1]).abs().sum(1).mean())
    assert step(sorted_state[fc]) < 0.95 * step(state[fc])
