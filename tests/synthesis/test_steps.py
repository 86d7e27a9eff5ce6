import torch

from synth.synthesis.steps import Adam, PlateauStopper


def _run(rows_per_call: int, steps: int = 40) -> torch.Tensor:
    """Adam on 16 rows, updated ``rows_per_call`` rows at a time, with fixed per-row gradients."""
    g = torch.Generator().manual_seed(0)
    params = torch.zeros(16, 3, 5, 5)
    grads = torch.randn(steps, 16, 3, 5, 5, generator=g)
    rule = Adam(params, 0.05, betas=(0.8, 0.99))
    for s in range(steps):
        for a in range(0, 16, rows_per_call):
            rows = torch.arange(a, min(a + rows_per_call, 16))
            rule.step(rows, grads[s, rows])
    return params


def test_adam_update_does_not_depend_on_how_many_rows_share_the_call():
    # 0.99 ** t on a tensor rounds differently for 16 elements and for 11 from t = 30 on;
    # the bias corrections must not (the images of a run would depend on its batch layout)
    whole = _run(16)
    for n in (1, 5, 11):
        assert torch.equal(_run(n), whole), n


def test_adam_bias_correction_matches_the_formula_and_scattered_rows():
    params = torch.zeros(4, 2)
    rule = Adam(params, 0.1, betas=(0.9, 0.999))
    g = torch.ones(4, 2)
    rule.step(torch.tensor([0, 2]), g[:2])  # scattered rows: index path
    rule.step(torch.arange(4), g)  # contiguous: slice path; rows 0 and 2 at t=2, others t=1
    # with constant gradients Adam's first steps are exactly lr (bias corrected)
    assert torch.allclose(params, torch.tensor([[-0.2, -0.2], [-0.1, -0.1], [-0.2, -0.2], [-0.1, -0.1]]), atol=1e-6)
    assert rule.t.tolist() == [2, 1, 2, 1]
    # the table grows past its first size
    big = Adam(torch.zeros(1, 1), 0.1, betas=(0.9, 0.999))
    for _ in range(300):
        big.step(torch.arange(1), torch.ones(1, 1))
    assert torch.isclose(big.params, torch.tensor([[-30.0]]), rtol=1e-4).all()


def test_plateau_stopper_stops_each_row_on_its_own():
    st = PlateauStopper(patience=2, min_delta=0.0, min_steps=0, smoothing=0.0)
    st.start(2, torch.device("cpu"))
    rows = torch.arange(2)
    out = [st(s, rows, torch.tensor([float(s), 1.0]), None).tolist() for s in range(4)]
    assert out[-1] == [False, True] and out[0] == [False, False]
