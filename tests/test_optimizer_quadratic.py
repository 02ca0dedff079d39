"""On a quadratic the QLAB rule is exact line search: the sharpest test of the step size.

For f(w) = 1/2 w^T H w - k^T w the loss along -d is exactly a parabola, so the fitted minimiser
is the exact line-search step (g . d) / (d^T H d). The directions d (fitted along) and u (stepped
along) are computed here from their textbook formulas (not read back from the optimizer's
displacement), in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_qlab._workspace import Workspace
from lightning_qlab.directions import DIRECTIONS
from lightning_qlab.optimizer import (GROWTH_LIMIT, QLAB, RELATIVE_UPDATE, StepEstimate, StepSolution, next_held_step,
                                      solve_step_size, step_toward_relative_update)

DIM = (5, 3)  # the parameter vector is split into two tensors, in two groups
GROUP_OPTIONS = [
    dict(momentum=0.9, betas=(0.9, 0.999), eps=1e-8),
    dict(momentum=0.5, betas=(0.8, 0.99), eps=1e-6),
]


def random_quadratic(eigenvalues: list[float], seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """H = Q diag(eigenvalues) Q^T with a random rotation Q, a random k and a start w0."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    hessian = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    hessian = (hessian + hessian.T) / 2
    k = torch.randn(n, generator=gen, dtype=torch.float64)
    w0 = 3.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    return hessian, k, w0


class TextbookDirection:
    """(d, u) from the direction's formula, group by group, in float64: d the direction the
    parabola is fitted along, u the one the step follows."""

    def __init__(self, direction: str, mode: str) -> None:
        self.direction = direction
        self.mode = mode
        self.t = 0
        self.m: list[Tensor] = [torch.zeros(n, dtype=torch.float64) for n in DIM]
        self.v: list[Tensor] = [torch.zeros(n, dtype=torch.float64) for n in DIM]

    def __call__(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        parts = list(torch.split(grad, DIM))
        self.t += 1
        if self.direction == "sgd":
            return grad.clone(), grad.clone()
        probe, step = [], []
        for i, (g, options) in enumerate(zip(parts, GROUP_OPTIONS)):
            if self.direction == "momentum":
                self.m[i] = options["momentum"] * self.m[i] + g
                probe.append(g)
                step.append(self.m[i])
                continue
            beta1, beta2 = options["betas"]
            self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
            self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
            denominator = (self.v[i] / (1 - beta2**self.t)).sqrt() + options["eps"]
            probe.append(g / denominator)
            momentum = self.m[i] / (1 - beta1**self.t) / denominator
            step.append(momentum if self.direction == "adam" else g / denominator)
        d, u = torch.cat(probe), torch.cat(step)
        return (u, u) if self.mode == "paper" else (d, u)


def make_optimizer(w0: Tensor, direction: str, mode: str, initial_step: float, probe_every=None):
    params = [torch.nn.Parameter(part.clone()) for part in torch.split(w0, DIM)]
    groups = [{"params": [p], **options} for p, options in zip(params, GROUP_OPTIONS)]
    return params, QLAB(groups, initial_step=initial_step, direction=direction, mode=mode, probe_every=probe_every)


def quadratic_steps(hessian: Tensor, k: Tensor, w0: Tensor, direction: str, mode: str,
                    initial_step: float, steps: int, probe_every=None):
    """Run QLAB on f; yield (w before, g, d, u, step size taken, last_step) per step."""
    params, opt = make_optimizer(w0, direction, mode, initial_step, probe_every)
    textbook = TextbookDirection(direction, mode)

    def f() -> Tensor:
        w = torch.cat(params)
        return 0.5 * w @ hessian @ w - k @ w

    for _ in range(steps):
        w = torch.cat([p.detach() for p in params])
        grad = hessian @ w - k
        d, u = textbook(grad)
        opt.zero_grad()
        loss = f()
        loss.backward()
        opt.step(loss, f)
        w_new = torch.cat([p.detach() for p in params])
        a = opt.last_step.step_size
        # The parameters moved by exactly -a u, with u from the textbook formula.
        assert (w_new - (w - a * u)).abs().max() <= 1e-12 * w.abs().max()
        yield w, grad, d, u, a, opt.last_step


@pytest.mark.parametrize("direction", ["sgd", "rmsprop", "momentum", "adam"])
def test_paper_mode_is_exact_line_search(direction: str) -> None:
    hessian, k, w0 = random_quadratic([1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0], seed=0)
    seen = 0
    for _, grad, d, _, a, last in quadratic_steps(hessian, k, w0, direction, "paper", 1e-2, steps=12):
        if last.event == "not_descent":  # momentum/Adam may point uphill; QLAB then skips
            assert a == 0.0 and grad @ d <= 0
            continue
        exact = (grad @ d) / (d @ hessian @ d)
        assert a == pytest.approx(exact.item(), rel=1e-10, abs=0.0)
        assert last.curvature == pytest.approx((d @ hessian @ d).item() / 2, rel=1e-8)
        assert last.event is None
        seen += 1
    assert seen >= 8


# The stability edges over the two groups of GROUP_OPTIONS: the smaller one applies.
EDGES = {"sgd": 2.0, "rmsprop": 2.0, "momentum": 2.0 * (1 + 0.5), "adam": 2.0 * (1 + 0.8) / (1 - 0.8)}


@pytest.mark.parametrize("direction", ["sgd", "rmsprop", "momentum", "adam"])
def test_safeguarded_mode_fits_exactly_and_holds_the_step(direction: str) -> None:
    """The first step (warm start) is the exact line-search step from any initial step; every
    later probe fits the exact minimiser along d (capped at GROWTH_LIMIT times the probed
    distance); the held step follows next_held_step from those minimisers, the step taken leans
    from it into the band RELATIVE_UPDATE of the initial weights' norm as measured on the last
    probing step's move, and the steps
    between probes move by exactly -a u with that a."""
    hessian, k, w0 = random_quadratic([1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0], seed=5)
    held, taken, measured, estimate = None, None, None, StepEstimate()
    probes = leaned = 0
    edge = EDGES[direction]
    for step, (w, grad, d, u, a, last) in enumerate(
            quadratic_steps(hessian, k, w0, direction, "safeguarded", 1e-7, steps=25, probe_every=4)):
        exact = ((grad @ d) / (d @ hessian @ d)).item()
        if step == 0:
            assert last.probes == 2  # 1e-7 -> exact minimiser -> confirmed there
            assert a == pytest.approx(exact, rel=1e-10, abs=0.0)
            held = taken = a
            measured = (a, (a * u).square().sum().item(), w.square().sum().item())
            continue
        if step % 4:  # no probe: the step taken at the last probe, nothing measured
            assert last.probes == 0 and math.isnan(last.curvature)
            assert a == taken
            continue
        probes += 1
        assert last.trial_distance == pytest.approx(held, rel=1e-10, abs=0.0)
        held = last.trial_distance
        assert last.curvature == pytest.approx((d @ hessian @ d).item() / 2, rel=1e-8)
        fitted = min(exact, GROWTH_LIMIT * held)
        held, estimate, _ = next_held_step(held, estimate, _exact_solution(fitted, held), edge)
        assert held <= edge / 2 * estimate.value * (1 + 1e-10)
        taken = step_toward_relative_update(held, RELATIVE_UPDATE, measured)
        assert a == pytest.approx(taken, rel=1e-8, abs=0.0)
        leaned += taken != held
        taken = a
        measured = (a, (a * u).square().sum().item(), measured[2])  # |w_0|^2: the first step's
    assert probes == 6 and leaned > 0


def _exact_solution(fitted: float, beta: float) -> StepSolution:
    """What solve_step_size returns for an exact parabola with this (capped) minimiser."""
    capped = fitted == GROWTH_LIMIT * beta
    return StepSolution(fitted, fitted, 1.0, fitted, "extrapolation_capped" if capped else None)


def test_paper_mode_on_an_indefinite_quadratic_keeps_the_step_where_the_curvature_is_negative() -> None:
    """Branch by branch: A > 0 gives the exact line search step, A <= 0 keeps the previous one."""
    hessian, _, _ = random_quadratic([-3.0, -1.0, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0], seed=2)
    k = torch.zeros(8, dtype=torch.float64)
    # Start almost on the convex eigenvectors: the first steps see positive curvature, and as
    # the convex components shrink the growing concave ones make it negative.
    _, eigenvectors = torch.linalg.eigh(hessian)  # eigenvalues in ascending order
    w0 = eigenvectors @ torch.tensor([1e-4, 1e-4, 2.0, -3.0, 1.0, 2.5, -1.0, 1.5], dtype=torch.float64)
    beta = 1e-2
    branches = []
    for _, grad, d, _, a, last in quadratic_steps(hessian, k, w0, "sgd", "paper", beta, steps=12):
        d_h_d = (d @ hessian @ d).item()
        assert last.trial_distance == beta
        if d_h_d > 0:
            expected, event = (grad @ d).item() / d_h_d, None
        else:
            expected, event = beta, "negative_curvature"
        assert last.event == event
        assert a == pytest.approx(expected, rel=1e-9, abs=0.0)
        branches.append(event)
        beta = a
    assert branches == [None] * 6 + ["negative_curvature"] * 6


def test_paper_mode_on_a_concave_quadratic_steps_the_initial_distance_forever() -> None:
    hessian, k, w0 = random_quadratic([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0], seed=3)
    for w, grad, d, _, a, last in quadratic_steps(hessian, k, w0, "momentum", "paper", 0.05, steps=6):
        assert last.event == "negative_curvature"
        assert a == 0.05
        assert last.curvature == pytest.approx((d @ hessian @ d).item() / 2, rel=1e-8)


@pytest.mark.parametrize("direction", ["sgd", "rmsprop", "momentum", "adam"])
def test_weight_decay_is_decoupled_from_the_fitted_step(direction: str) -> None:
    """w <- w (1 - a lambda) - a d, where a is still the exact line search on the data loss."""
    hessian, k, w0 = random_quadratic([1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0], seed=4)
    params, opt = make_optimizer(w0, direction, "paper", 1e-2)
    decays = (0.1, 0.0)
    for group, decay in zip(opt.param_groups, decays):
        group["weight_decay"] = decay
    textbook = TextbookDirection(direction, "paper")

    def f() -> Tensor:
        w = torch.cat(params)
        return 0.5 * w @ hessian @ w - k @ w

    for _ in range(6):
        w = torch.cat([p.detach() for p in params])
        grad = hessian @ w - k
        d, _ = textbook(grad)
        opt.zero_grad()
        loss = f()
        loss.backward()
        opt.step(loss, f)
        a = opt.last_step.step_size
        if opt.last_step.event == "not_descent":
            continue
        assert a == pytest.approx(((grad @ d) / (d @ hessian @ d)).item(), rel=1e-10, abs=0.0)
        decay = torch.cat([torch.full((n,), lam, dtype=torch.float64) for n, lam in zip(DIM, decays)])
        expected = w * (1 - a * decay) - a * d
        assert (torch.cat([p.detach() for p in params]) - expected).abs().max() <= 1e-12 * w.abs().max()


# ---------------------------------------------------------------- the rule on exact parabolas
# phi(a) = 1 - 2a + a^2: c = 1, b = -2, A = 1, minimiser 1.
def phi(a: float) -> float:
    return 1.0 - 2.0 * a + a * a


@pytest.mark.parametrize("mode", ["safeguarded", "paper"])
@pytest.mark.parametrize("beta", [0.5, 0.75, 1.0, 2.0])
def test_solve_finds_the_parabola_minimum(mode: str, beta: float) -> None:
    sol = solve_step_size(phi(0), phi(beta), -2.0, beta, mode)
    found = (sol.step_size, sol.next_trial_distance, sol.curvature, sol.minimiser, sol.event)
    assert found == (1.0, 1.0, 1.0, 1.0, None)


def test_solve_caps_extrapolation_beyond_the_growth_limit_in_safeguarded_mode_only() -> None:
    sol = solve_step_size(phi(0), phi(0.25), -2.0, 0.25, "safeguarded")
    found = (sol.step_size, sol.next_trial_distance, sol.minimiser, sol.event)
    assert found == (0.5, 0.5, 1.0, "extrapolation_capped")
    sol = solve_step_size(phi(0), phi(0.25), -2.0, 0.25, "paper")
    assert (sol.step_size, sol.next_trial_distance, sol.event) == (1.0, 1.0, None)


def test_solve_when_the_trial_loss_rose_steps_less_than_half_the_distance() -> None:
    sol = solve_step_size(phi(0), phi(4.0), -2.0, 4.0, "paper")  # phi(4) = 9 > phi(0)
    assert sol.step_size == 1.0 < 4.0 / 2


@pytest.mark.parametrize("mode, step", [("paper", 0.5), ("safeguarded", 1.0)])
def test_solve_on_negative_curvature(mode: str, step: float) -> None:
    # phi(a) = 1 - 2a - a^2: A = -1
    sol = solve_step_size(1.0, 1.0 - 2 * 0.5 - 0.25, -2.0, 0.5, mode)
    found = (sol.step_size, sol.next_trial_distance, sol.curvature, sol.event)
    assert found == (step, step, -1.0, "negative_curvature")
    assert math.isnan(sol.minimiser)
    # On the tangent line exactly (A = 0) the same branch applies.
    assert solve_step_size(1.0, 0.0, -2.0, 0.5, mode).event == "negative_curvature"


@pytest.mark.parametrize("mode", ["safeguarded", "paper"])
@pytest.mark.parametrize("trial", [math.inf, -math.inf, math.nan])
def test_solve_on_a_nonfinite_trial_loss_takes_no_step_and_halves(mode: str, trial: float) -> None:
    sol = solve_step_size(1.0, trial, -2.0, 0.5, mode)
    assert (sol.step_size, sol.next_trial_distance, sol.event) == (0.0, 0.25, "nonfinite_trial")


@pytest.mark.parametrize("paper", [False, True])
@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_a_probe_writes_the_textbook_ray_and_a_skipped_one_changes_nothing(name: str, paper: bool) -> None:
    """``probe`` writes ``d`` (with the moments it is made of) through the fused kernels; ``d`` is
    the textbook formula's, in float64, at the second step (three parameters, one empty). With
    ``found_inf = 1`` the ray stays zero and no buffer changes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (0,), (5,)]
    group = dict(momentum=0.5, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    direction = DIRECTIONS[name]
    states = [{buffer: torch.rand(s, generator=gen, dtype=torch.float64) for buffer in direction.buffers}
              for s in shapes]
    before = [{k: v.clone() for k, v in state.items()} for state in states]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    steps = [torch.tensor(2.0) for _ in shapes]  # float32, as QLAB keeps them

    ray = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    direction.probe(group, states, grads, ray, steps, torch.ones(()), paper)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in ray)
    assert all(torch.equal(state[k], old[k]) for state, old in zip(states, before) for k in state)

    direction.probe(group, states, grads, ray, steps, torch.zeros(()), paper)
    (b1, b2), mu = group["betas"], group["momentum"]
    for d, g, old in zip(ray, grads, before):
        v = b2 * old["exp_avg_sq"] + (1 - b2) * g * g if "exp_avg_sq" in old else None
        rms = (v / (1 - b2 ** 2)).sqrt() + group["eps"] if v is not None else None
        if name == "adam" and paper:
            expected = (b1 * old["exp_avg"] + (1 - b1) * g) / (1 - b1 ** 2) / rms
        elif name == "momentum" and paper:
            expected = mu * old["momentum_buffer"] + g
        else:
            expected = g / rms if rms is not None else g
        torch.testing.assert_close(d, expected, rtol=1e-14, atol=1e-15)


def test_the_workspace_keeps_cpu_temporaries_for_the_same_shapes_only() -> None:
    space = Workspace()
    params = [torch.zeros(3, 2), torch.zeros(4)]
    origin = space.like("origin", params)
    assert space.like("origin", [torch.ones(3, 2), torch.ones(4)]) is origin  # same shapes: the same tensors
    assert all(a is not b for a, b in zip(space.like("denominators", params), origin))  # another name
    wider = space.like("origin", [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)])
    assert wider is not origin and wider[0].dtype == torch.float64
    transposed = space.like("origin", [torch.zeros(2, 3).t(), torch.zeros(4)])
    assert transposed[0].stride() == (1, 3)  # laid out like the parameter
    if torch.cuda.is_available():  # elsewhere than the CPU nothing is kept
        on_gpu = [p.cuda() for p in params]
        assert space.like("origin", on_gpu)[0] is not space.like("origin", on_gpu)[0]
