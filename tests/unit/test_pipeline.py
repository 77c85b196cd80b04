"""Run configs, scoring, routing statistics, and end-to-end smoke runs of ldmole-train."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ldmole import RoutingRecord
from ldmole.experiment.routing_stats import RoutingStats
from ldmole.experiment.evaluation import classification_metrics, option_scores, qa_metrics
from ldmole.experiment.run_config import compose_config
from ldmole.experiment.data.collation import answer_positions
from ldmole.experiment.trainer import _lr_factor
from tests.helpers import scaled


@pytest.mark.parametrize("argument, message", [
    ("model=qwen3_17b", "unknown model 'qwen3_17b' (did you mean 'qwen3_1.7b'"),
    ("task=arc-c", "unknown task 'arc-c' (did you mean 'arc_c'"),
    ("method=mola8888", "unknown method 'mola8888' (did you mean 'mola_8888'"),
    ("max_step=3", "unknown key 'max_step' (did you mean 'max_steps'"),
    ("mole.num_expert=4", "unknown key 'mole.num_expert' (did you mean 'num_experts'"),
    ("method=mola_2468 mole.top_k=3", "top_k=3 exceeds num_experts"),
    ("oops", "is not key=value"),
    ("lb_probs=sofmax", "lb_probs='sofmax' is unknown (did you mean 'softmax'"),
    ("remole_l1=l2", "remole_l1='l2' is unknown"),
])
def test_bad_config_fails_before_loading_and_names_the_problem(argument, message):
    with pytest.raises(ValueError) as error:
        compose_config(argument.split())
    assert message in str(error.value)


def test_compose_layers_defaults_model_task_method_and_overrides():
    config = compose_config(["model=tiny_llama", "task=rte", "method=mola_2468", "mole.r=4", "max_steps=7",
                             "mixed_precision=no"])
    assert config.backbone.model_source == "random:llama" and config.task == "rte"
    assert config.mole.router == "topk" and config.mole.num_experts == "2468" and config.mole.r == 4
    assert config.optim.max_steps == 7 and config.optim.mixed_precision == "no"
    assert config.output_dir == "runs/tiny_llama/rte/mola_2468/seed42"
    assert compose_config(["model=llama3.1_8b"]).optim.num_epochs == 3


def test_baseline_methods_follow_their_codes_defaults():
    for method in ("mola_8888", "mola_2468"):
        config = compose_config([f"method={method}"])
        assert config.losses.lb_coef == 0.0 and config.losses.lb_probs == "softmax", "MoLA trains without load balance"
    assert compose_config(["method=ldmole"]).losses.lb_probs == "weights"
    assert compose_config(["method=remole"]).losses.remole_l1 == "balanced"


def test_answer_positions_point_at_tokens_before_targets():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    positions, targets = answer_positions(labels)
    assert positions.tolist() == [[1, 2], [0, 0]]
    assert targets.tolist() == [[7, 8], [5, -100]]


def test_lr_schedule_warmup_and_epoch_milestones():
    factors = [_lr_factor(s, steps_per_epoch=2, warmup=2, milestones=[2, 3], gamma=0.1) for s in range(8)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_option_scores_take_best_variant_and_mask_padding():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, 9.0]])
    ids = torch.tensor([[[1, 2], [3, -1], [4, -1]]])
    mask = torch.tensor([[True, True, False]])
    scores = option_scores(logits, ids, mask)
    assert scores.tolist() == [[5.0, 3.0, float("-inf")]]


def test_task_metrics():
    metrics = qa_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), ["law", "law", "math"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["per_category"] == {"law": {"accuracy": 1.0, "count": 2}, "math": {"accuracy": 0.0, "count": 1}}
    cola = classification_metrics(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]), ("mcc",))
    assert cola["accuracy"] == 0.75 and cola["mcc"] == pytest.approx(0.5773502691896258)
    assert classification_metrics(np.array([1, 0]), np.array([1, 1]), ("f1",))["f1"] == pytest.approx(2 / 3)
    assert metrics["prediction_counts"] == {"0": 1, "1": 1, "2": 1} and metrics["label_counts"] == {"0": 1, "1": 2}
    constant = classification_metrics(np.array([0, 0, 0]), np.array([0, 1, 0]))
    assert constant["prediction_counts"] == {"0": 3} and constant["label_counts"] == {"0": 2, "1": 1}


def test_routing_stats_counts_real_tokens_only():
    weights = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    lam = torch.tensor([[0.2, -0.4, 0.9]])
    record = RoutingRecord("model.layers.1.mlp.up_proj", 1, "up_proj", "relu", weights, weights, lam, mask)
    stats = RoutingStats()
    stats.update([record])
    stats.update([record])
    summary = stats.summary()
    assert summary["avg_active_experts"] == pytest.approx(1.0)  # tokens: 2 and 0 experts
    assert summary["zero_activation_rate"] == pytest.approx(0.5)
    assert summary["per_layer"]["1"]["avg_active_experts"] == pytest.approx(1.0)
    assert summary["lambda"]["mean"] == pytest.approx(-0.1)
    assert summary["lambda"]["per_layer_quantiles"]["1"]["q05"] == pytest.approx(-0.4, abs=0.006)  # a 0.01-wide bin
    assert summary["lambda"]["per_layer_quantiles"]["1"]["q95"] == pytest.approx(0.2, abs=0.006)
    assert summary["per_module"]["model.layers.1.mlp.up_proj"]["expert_share"] == pytest.approx([0.5, 0.5, 0.0])


# docs/data.md's tiny-model command on the shared data; on the 8-row fixture (7 training rows) one epoch holds at
# most 7 steps, so it runs 6 steps of batch 1 and evaluates the 8 rows there are.
SMOKE_STEPS, SMOKE_LOG_EVERY, SMOKE_EVAL = scaled(20, 6), scaled(10, 3), scaled(64, 8)
