"""Behaviours a review of the suite found untested: the sparsity hinge is zero exactly when at most k
experts are active, checkpoint pruning keeps the newest by step number, and a ``lambda_sharing=layer``
adapter round-trips through save and load."""

from __future__ import annotations

import torch

from ldmole import MoLEConfig, get_mole_model, load_mole, mole_parameters, save_mole
from ldmole.core.losses import sparsity_loss
from ldmole.core.records import RoutingRecord
from ldmole.core.sparsegen import lambda_bounds, sparsegen
from ldmole.experiment import checkpointing
from tests.helpers import tiny_model


def test_the_sparsity_hinge_is_zero_exactly_when_at_most_k_experts_are_active():
    torch.manual_seed(0)
    scores = torch.randn(4000, 8)
    lam = torch.empty(4000).uniform_(-4.0, 0.99)
    active = (sparsegen(scores, lam) > 0).sum(-1)
    for k in (1, 2, 3, 5):
        lower, _ = lambda_bounds(scores, k)
        hinge = torch.relu(lower - lam)
        assert torch.equal(hinge == 0, active <= k), f"k={k}: hinge zero must mean at most k active experts"
        # Both sides occur, so the equivalence is not met by one side alone.
        assert 0 < int((active <= k).sum()) < len(active)
        # The loss of a record is zero exactly when every token keeps at most k experts.
        for rows in (active <= k).nonzero().flatten()[:50], torch.arange(len(active)):
            record = RoutingRecord("m", 0, "q_proj", "sparsegen", scores[rows], sparsegen(scores[rows], lam[rows]),
                                   lam[rows], None)
            zero = bool(sparsity_loss([record], k) == 0)
            assert zero == bool((active[rows] <= k).all())


def test_pruning_keeps_the_newest_complete_checkpoints_by_step_number(tmp_path):
    for step in (3, 12, 7, 100, 9):
        tmp = checkpointing.new_checkpoint_tmp(tmp_path, step)
        torch.save({"step": step}, tmp / "trainer_state.pt")
        checkpointing.finalize_checkpoint(tmp, step, {})
    root = tmp_path / "checkpoints"
    (root / "step-00000200").mkdir()  # a directory whose write never completed: not a checkpoint, left alone
    (root / ".tmp-step-00000300-crashed").mkdir()  # an interrupted assembly: removed
    checkpointing.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000012", "step-00000100", "step-00000200"]
    checkpointing.prune_checkpoints(tmp_path, keep=1)
    assert checkpointing.latest_checkpoint(tmp_path).name == "step-00000100"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000100", "step-00000200"]


def test_a_per_layer_lambda_adapter_round_trips(tmp_path):
    config = MoLEConfig(lambda_sharing="layer", num_experts=4, r=2)
    model = get_mole_model(tiny_model("qwen3", num_layers=3), config)
    # One λ-MLP per decoder layer and input width: hidden 32 (q,k,v,gate,up,o) and 48 (down).
    assert sorted(model.ldmole_lambda_mlps.keys()) == sorted(
        f"layer{layer}_width{width}" for layer in range(3) for width in (32, 48))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in mole_parameters(model).values():
            param.normal_(0, 0.1)
    save_mole(model, tmp_path / "adapter")
    loaded = load_mole(tiny_model("qwen3", num_layers=3), tmp_path / "adapter")
    saved_params, loaded_params = mole_parameters(model), mole_parameters(loaded)
    assert saved_params.keys() == loaded_params.keys()
    for name, param in saved_params.items():
        assert torch.equal(loaded_params[name], param), name
    ids = torch.randint(1, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)
