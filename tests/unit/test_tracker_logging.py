"""What a run reports to its tracker (``report_to``): selection accuracy per epoch, final metrics and
the routing summary as scalar tags, and (where tensorboard is installed) the event files a run writes."""

from __future__ import annotations


from ldmole.experiment.metrics import RunMetrics
from ldmole.experiment.trainer import final_scalars, routing_scalars

SUMMARY = {
    "num_modules": 4, "avg_active_experts": 2.5, "zero_activation_rate": 0.0,
    "per_layer": {"0": {"avg_active_experts": 3.0, "zero_activation_rate": 0.0},
                  "11": {"avg_active_experts": 2.0, "zero_activation_rate": 0.0}},
    "per_module_type": {}, "per_module": {},
    "lambda": {"mean": -1.2, "quantiles": {"q05": -2.0, "q25": -1.5, "q50": -1.1, "q75": -0.8, "q95": -0.4},
               "per_layer_mean": {}, "per_layer_quantiles": {}},
}


def test_routing_scalars_flatten_overall_per_layer_and_lambda_quantiles():
    assert routing_scalars(SUMMARY) == {
        "routing/avg_active_experts": 2.5, "routing/zero_activation_rate": 0.0,
        "routing/layer_00/active_experts": 3.0, "routing/layer_11/active_experts": 2.0,
        "routing/lambda_mean": -1.2, "routing/lambda_q05": -2.0, "routing/lambda_q50": -1.1,
        "routing/lambda_q95": -0.4}


def test_routing_scalars_leave_out_lambda_for_routers_without_it_and_empty_summaries():
    without_lambda = {k: v for k, v in SUMMARY.items() if k != "lambda"}
    assert not any("lambda" in tag for tag in routing_scalars(without_lambda))
    assert routing_scalars({}) == {}


def test_final_scalars_hold_accuracy_and_only_the_task_metrics_present():
    metrics = RunMetrics(model="m", task="mmlu_pro", method="ldmole", seed=1, accuracy=0.4, best_selection_accuracy=0.5,
                         per_category={"computer science": {"accuracy": 0.25, "count": 4}})
    assert final_scalars(metrics) == {"final/accuracy": 0.4, "final/best_selection_accuracy": 0.5,
                                      "final/category/computer_science/accuracy": 0.25}
    cola = RunMetrics(model="m", task="cola", method="ldmole", seed=1, accuracy=0.7, mcc=0.3)
    assert final_scalars(cola) == {"final/accuracy": 0.7, "final/mcc": 0.3}
