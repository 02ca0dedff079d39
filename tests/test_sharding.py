"""QLAB on sharded parameters (FSDP2 ``fully_shard``, DTensors), 2 gloo processes on CPU.

The workers live in tests/sharded_helpers.py, run as a script (torch.multiprocessing starts the
ranks). Each saves what is compared here: the gathered parameters, the step sizes, the sums.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sharded_helpers as helpers
from lightning_helpers import run_worker

HELPERS = Path(helpers.__file__).resolve()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    run_worker(HELPERS, out, OMP_NUM_THREADS="1")
    return out


def _ranks(out: Path, worker: str) -> list[dict]:
    return [torch.load(out / f"{worker}_rank{rank}.pt") for rank in range(helpers.RANKS)]


def test_sharded_sums_equal_the_whole_ones_in_float64(results):
    """g . d and |g|^2 over Shard(0), Replicate and plain tensors: replicated ones counted once,
    a rank with an empty shard taking part."""
    ranks = _ranks(results, "sums_float64")
    assert [r["empty_shard"] for r in ranks] == [False, True]
    for r in ranks:
        torch.testing.assert_close(r["sharded"], r["whole"], rtol=1e-14, atol=0)
    assert torch.equal(ranks[0]["sharded"], ranks[1]["sharded"])


def test_clipping_by_norm_uses_the_norm_of_the_whole_gradient(results):
    for r in _ranks(results, "sums_float64"):
        assert r["clip_whole"] < 1  # the clip is active
        torch.testing.assert_close(r["clip"], r["clip_whole"], rtol=1e-14, atol=0)
        for clipped, expected in zip(r["clipped"], r["clipped_whole"]):
            torch.testing.assert_close(clipped, expected, rtol=1e-14, atol=0)


def test_sharded_training_equals_one_process_on_the_global_batches(results):
    """40 steps (3 probes or more, the warm start included) of the default QLAB on a model whose last layer's
    shard is empty on rank 1. float64, tolerance 1e-10: the sums add the same terms in another
    order, and the fitted step magnifies the last bits about 1e4-fold (see sharded_helpers.DTYPE)."""
    rank0, rank1 = _ranks(results, "train_sharded")
    reference = torch.load(results / "single_process.pt")
    assert rank1["local_shapes"][-2:] == [(0, 7), (0,)]  # the empty shard
    assert rank0["step_sizes"] == rank1["step_sizes"]  # every rank takes the same step
    assert len(set(rank0["step_sizes"])) > 2  # the held step changed at the probes
    torch.testing.assert_close(torch.tensor(rank0["step_sizes"]), torch.tensor(reference["step_sizes"]),
                               rtol=1e-10, atol=0)
    for name, value in reference["parameters"].items():
        assert torch.equal(rank0["parameters"][name], rank1["parameters"][name]), name
        torch.testing.assert_close(rank0["parameters"][name], value, rtol=1e-10, atol=1e-12)


def test_resume_from_a_distributed_checkpoint_equals_the_uninterrupted_run(results):
    """torch.distributed.checkpoint at step 11 (between probes): the held step, the moments (sharded
    like the parameters) and QLAB's record come back; the rest of the run is bitwise the same."""
    uninterrupted = _ranks(results, "train_sharded")
    for resumed, straight in zip(_ranks(results, "resume_sharded"), uninterrupted):
        assert resumed["steps"] == helpers.STEPS
        assert resumed["step_sizes"] == straight["step_sizes"]
        for name, value in straight["parameters"].items():
            assert torch.equal(resumed["parameters"][name], value), name


# ------------------------------------------------------------------ what is refused, and how
def test_deepspeed_is_refused_with_what_to_use_instead():
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_helpers import RegressionNet

    module = RegressionNet()
    # The check looks at the strategy's type only; DeepSpeed itself is not installed here.
    module._trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    refusal = r"does not run under DeepSpeed.*trial forward.*configs/trainer/fsdp.yaml"
    with pytest.raises(MisconfigurationException, match=refusal):
        module._qlab_check_setup()


def test_fsdp1_is_refused_before_any_callback_meets_it_with_what_to_use_instead():
    """Lightning runs training_step inside the FSDP1 root's forward, where a manual backward fails
    an assertion (seen on a GPU): the mixin says so when fit attaches its callbacks, before the
    averaging callback's own refusal of FSDP1 would name a way out that still fails."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_helpers import RegressionNet

    module = RegressionNet()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), state=SimpleNamespace(fn=TrainerFn.FITTING),
                                      callbacks=[])
    for check in (module.configure_callbacks, module._qlab_check_setup):
        refusal = r"FSDPStrategy \(FSDP1\).*backward.*lightning_qlab.FSDP2Strategy"
        with pytest.raises(MisconfigurationException, match=refusal):
            check()
    module._trainer.state.fn = TrainerFn.TESTING  # evaluating needs no backward
    assert len(module.configure_callbacks()) == 1


def test_averaging_under_fsdp1_is_refused_with_what_to_use_instead():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_helpers import RegressionNet
    from lightning_qlab.averaging import PolynomialAveraging

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy \(FSDP1\).*weight_averaging=False"):
        PolynomialAveraging().setup(trainer, RegressionNet(), "fit")

