"""Full-batch L2-regularised logistic regression: QLAB converges to the optimum.

The problem is generated, binary, well conditioned (Hessian condition number about 4), float64, with
the L2 term inside the loss and an unregularised bias as a second parameter tensor. The optimum
comes from Newton's method written here (quadratic convergence to machine precision), itself
checked against scipy's L-BFGS-B.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_qlab.optimizer import QLAB

N_SAMPLES, N_FEATURES, L2 = 500, 8, 0.05


def logistic_problem() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.5, 1.5, N_FEATURES, dtype=torch.float64)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=gen, dtype=torch.float64) * scales
    w_true = torch.randn(N_FEATURES, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(x @ w_true + 0.3)
    y = torch.where(torch.rand(N_SAMPLES, generator=gen, dtype=torch.float64) < p, 1.0, -1.0)
    return x.to(torch.float64), y.to(torch.float64)


def objective(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """mean log(1 + exp(-y (x.w + b))) + L2/2 |w|^2"""
    return torch.nn.functional.softplus(-y * (x @ w + b)).mean() + 0.5 * L2 * (w @ w)


def newton_optimum(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """theta = (w, b) minimising the objective, by Newton's method with the exact Hessian."""
    theta = torch.zeros(N_FEATURES + 1, dtype=torch.float64)
    for _ in range(25):
        hessian = torch.autograd.functional.hessian(lambda t: objective(t[:-1], t[-1], x, y), theta)
        grad = torch.func.grad(lambda t: objective(t[:-1], t[-1], x, y))(theta)
        theta = theta - torch.linalg.solve(hessian, grad)
    grad = torch.func.grad(lambda t: objective(t[:-1], t[-1], x, y))(theta)
    assert grad.norm() < 1e-15
    return theta, hessian


def test_the_problem_is_well_conditioned_and_newton_agrees_with_scipy() -> None:
    optimize = pytest.importorskip("scipy.optimize")
    x, y = logistic_problem()
    theta, hessian = newton_optimum(x, y)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert 3 < eigenvalues.max() / eigenvalues.min() < 30

    def value_and_grad(t):
        t = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        value = objective(t[:-1], t[-1], x, y)
        value.backward()
        return value.item(), t.grad.numpy()

    result = optimize.minimize(value_and_grad, torch.zeros(N_FEATURES + 1).numpy(), jac=True,
                               method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 1000})
    assert torch.allclose(torch.from_numpy(result.x), theta, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "direction, mode, steps",
    [
        ("sgd", "safeguarded", 150),
        ("sgd", "paper", 150),
        ("momentum", "safeguarded", 400),
        ("adam", "safeguarded", 400),
    ],
)
def test_qlab_converges_to_the_optimum(direction: str, mode: str, steps: int) -> None:
    x, y = logistic_problem()
    theta, _ = newton_optimum(x, y)
    optimum = objective(theta[:-1], theta[-1], x, y).item()
    w = torch.zeros(N_FEATURES, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = QLAB([{"params": [w]}, {"params": [b]}], initial_step=1e-3, direction=direction, mode=mode)
    for _ in range(steps):
        opt.zero_grad()
        loss = objective(w, b, x, y)
        loss.backward()
        opt.step(loss, lambda: objective(w, b, x, y))
    found = torch.cat([w.detach(), b.detach().reshape(1)])
    # Near the optimum the loss decrease of a step falls below the float64 rounding of the loss
    # (1e-16 relative), which bounds the reachable accuracy of any line search on it: about
    # |g| ~ 1e-8, |theta - theta*| ~ 1e-7 here.
    assert (found - theta).norm() / theta.norm() < 1e-6
    assert objective(w, b, x, y).item() - optimum < 1e-13
    assert opt.events["nonfinite_loss"] == opt.events["nonfinite_trial"] == 0
