"""LARS (the linear probe's optimizer) against the MoCo v3 / official MAE update rule, written out in numpy.

For a parameter w with more than one dimension and gradient g (weight decay wd, trust coefficient eta):
    d = g + wd * w;   q = eta * |w| / |d|  (1 where |w| or |d| is 0);   mu = m * mu + q * d;   w = w - lr * mu
Biases and other 1-D parameters skip the weight decay and the trust ratio: mu = m * mu + g.
"""

import numpy as np
import pytest
import torch

from util.lars import LARS


def reference_step(w, g, mu, lr, wd, m, eta):
    if w.ndim > 1:
        d = g + wd * w
        wn, dn = np.linalg.norm(w), np.linalg.norm(d)
        q = eta * wn / dn if wn > 0 and dn > 0 else 1.0
        d = q * d
    else:
        d = g
    mu = m * mu + d
    return w - lr * mu, mu


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_three_steps_follow_the_formula(wd: float) -> None:
    rng = np.random.default_rng(0)
    weight = torch.nn.Parameter(torch.tensor(rng.normal(size=(4, 3))))
    bias = torch.nn.Parameter(torch.tensor(rng.normal(size=4)))
    zero = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))  # |w| = 0: trust ratio 1
    lr, m, eta = 0.3, 0.9, 0.001
    opt = LARS([weight, bias, zero], lr=lr, weight_decay=wd)  # momentum 0.9 and eta 0.001 are the defaults
    ref = {"w": weight.detach().numpy().copy(), "b": bias.detach().numpy().copy(), "z": np.zeros((2, 2))}
    mus = {k: np.zeros_like(v) for k, v in ref.items()}
    for step in range(3):
        grads = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=4), "z": rng.normal(size=(2, 2))}
        for p, k in ((weight, "w"), (bias, "b"), (zero, "z")):
            p.grad = torch.tensor(grads[k])
            ref[k], mus[k] = reference_step(ref[k], grads[k], mus[k], lr, wd, m, eta)
        opt.step()
        for p, k in ((weight, "w"), (bias, "b"), (zero, "z")):
            np.testing.assert_allclose(p.detach().numpy(), ref[k], rtol=1e-12, atol=1e-15, err_msg=f"{k}, step {step}")


def test_trust_ratio_sets_the_update_size_of_matrices_only() -> None:
    """One step from zero momentum: a matrix moves by lr * eta * |w| whatever its gradient and the weight decay;
    a bias by lr * |g|. A parameter without gradient does not move."""
    weight = torch.nn.Parameter(torch.full((3, 3), 2.0, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([weight, bias, frozen], lr=1.0, weight_decay=0.1)
    weight.grad = torch.full((3, 3), 1000.0, dtype=torch.float64)
    bias.grad = torch.full((3,), 1000.0, dtype=torch.float64)
    opt.step()
    assert (weight.detach() - 2.0).norm().item() == pytest.approx(0.001 * 6.0, rel=1e-12)  # |w| = 2 * 3
    assert (bias.detach() - 1.0).norm().item() == pytest.approx(1000.0 * 3**0.5, rel=1e-12)
    assert torch.equal(frozen.detach(), torch.ones(2, 2))
