"""Where the trainer reads logits: the GLUE head at the last real token, QA scores at the last prompt token."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from ldmole import MoLEConfig, get_mole_model, mole_parameters
from ldmole.experiment.data import CLASSIFICATION_KIND, QA_KIND, collate, get_task
from ldmole.experiment.data.collation import answer_positions, eval_collate, train_collate
from ldmole.experiment.evaluation import evaluate, option_scores
from ldmole.experiment.selected_logits import SelectedLogits
from tests.helpers import tiny_model

LENGTHS = [5, 9, 3, 7]


def random_ids(length: int, gen: torch.Generator, vocab: int = 96) -> list[int]:
    """Token ids that never equal the tiny models' pad id 0."""
    return torch.randint(1, vocab, (length,), generator=gen).tolist()


def with_random_mole(model: torch.nn.Module, router: str, dropout: float = 0.0) -> torch.nn.Module:
    """``model`` (in eval mode) with MoLE injected and non-zero adapters, so the adapters change the logits."""
    get_mole_model(model, MoLEConfig(router=router, num_experts=1 if router == "lora" else 4, r=4, alpha=8,
                                     dropout=dropout, lambda_hidden=16))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in mole_parameters(model).items():
            if not name.startswith("score."):
                param.normal_(0, 0.1)
    return model.eval()


def test_last_token_index_points_at_last_real_token_with_right_padding():
    gen = torch.Generator().manual_seed(0)
    batch = [{"input_ids": random_ids(n, gen), "label": i % 2} for i, n in enumerate(LENGTHS)]
    out = collate(batch, pad_token_id=0)
    assert out["last_token_index"].tolist() == [n - 1 for n in LENGTHS], "expected the index of each row's last real token"
    rows = torch.arange(len(LENGTHS))
    last = out["input_ids"][rows, out["last_token_index"]]
    assert last.tolist() == [f["input_ids"][-1] for f in batch]
    assert out["attention_mask"][rows, out["last_token_index"]].all()


@pytest.mark.parametrize("mole", [None, "sparsegen", "lora"])
def test_selected_logits_at_last_token_equal_the_stock_classifier_on_each_row_alone(family, mole):
    model = tiny_model(family, task="seq_cls", num_layers=2)
    if mole is not None:
        with_random_mole(model, mole)
    gen = torch.Generator().manual_seed(1)
    batch = [{"input_ids": random_ids(n, gen), "label": 0, "example_index": i} for i, n in enumerate(LENGTHS)]
    collated = train_collate(batch, pad_token_id=0, task_kind=CLASSIFICATION_KIND)
    with torch.no_grad():
        got = SelectedLogits(model)(collated["input_ids"], collated["attention_mask"], collated["positions"])[:, 0]
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits for f in batch])
    assert got.shape == alone.shape == (len(LENGTHS), 2)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4,
                               msg="the head must read each right-padded row's last real token, as the stock model does alone")


def qa_batch(gen: torch.Generator) -> list[dict]:
    """QA features of mixed lengths: prompt, answer letter, end marker; options are ids 10..13."""
    features = []
    for i, n in enumerate(LENGTHS):
        prompt = random_ids(n, gen)
        answer_ids = [10 + i % 4, 2]
        features.append({"input_ids": prompt + answer_ids, "labels": [-100] * n + answer_ids, "prompt_length": n,
                         "option_token_ids": [[10], [11], [12], [13]], "answer": 0, "category": None,
                         "uid": str(i), "example_index": i})
    return features


def test_qa_collate_last_prompt_index_is_the_first_supervised_position():
    batch = qa_batch(torch.Generator().manual_seed(2))
    out = collate(batch, pad_token_id=0)
    assert out["last_prompt_index"].tolist() == [n - 1 for n in LENGTHS], "expected the position before the answer letter"
    positions, _ = answer_positions(out["labels"])
    assert torch.equal(positions[:, 0], out["last_prompt_index"]), "training and evaluation must read the same position"


def test_evaluation_scores_options_at_the_last_prompt_position(family):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Heavy adapter dropout: evaluation must switch it off (eval mode) and give the training mode back.
    model = with_random_mole(tiny_model(family, num_layers=2, seed=4), "softmax", dropout=0.9)
    batch = qa_batch(torch.Generator().manual_seed(3))
    padded = collate(batch, pad_token_id=0)
    with torch.no_grad():
        full = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    rows = torch.arange(len(batch))
    lpi = padded["last_prompt_index"]

    def predictions(index: torch.Tensor) -> list[int]:
        return option_scores(full[rows, index], padded["option_token_ids"], padded["option_mask"]).argmax(-1).tolist()

    expected = predictions(lpi)
    for shift in (-1, 1):
        assert predictions(lpi + shift) != expected, f"fixture: reading at offset {shift} must change a prediction"
    for feature, answer in zip(batch, expected):
        feature["answer"] = answer
    loader = torch.utils.data.DataLoader(batch, batch_size=len(batch), collate_fn=partial(
        eval_collate, pad_token_id=0, task_kind=QA_KIND))
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    examples = [SimpleNamespace(category=None) for _ in batch]
    model.train()
    torch.manual_seed(0)
    metrics = evaluate(SelectedLogits(model), loader, get_task("arc_c"), examples, autocast=accelerator.autocast,
                       gather=accelerator.gather_for_metrics)
    AcceleratorState._reset_state()
    assert model.training, "evaluate must put a model that was training back into training mode"
    assert metrics["num_examples"] == len(batch)
    assert metrics["accuracy"] == 1.0, (
        f"evaluation must predict {expected} (the option scores at last_prompt_index); it got "
        f"accuracy {metrics['accuracy']} with prediction counts {metrics['prediction_counts']}")


def test_eval_collate_scores_classification_at_each_rows_last_real_token():
    """``eval_collate`` pads on the right: each row is scored at its own last real token, not at the
    batch's last column nor at a pad, and the rows keep their example indices."""
    gen = torch.Generator().manual_seed(5)
    rows = [{"input_ids": random_ids(n, gen), "label": i % 2, "uid": f"u{i}", "example_index": 10 + i}
            for i, n in enumerate(LENGTHS)]
    batch = eval_collate(rows, pad_token_id=0, task_kind=CLASSIFICATION_KIND)
    assert batch["positions"].shape == (len(LENGTHS), 1)
    assert batch["positions"][:, 0].tolist() == [n - 1 for n in LENGTHS]
    picked = batch["input_ids"].gather(1, batch["positions"])[:, 0]
    assert picked.tolist() == [row["input_ids"][-1] for row in rows], "the last real token of each row"
    width = max(LENGTHS)
    for i, n in enumerate(LENGTHS):  # right padding: real tokens first, pads after the scored position
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert batch["example_index"].tolist() == [10, 11, 12, 13] and batch["label"].tolist() == [0, 1, 0, 1]
    assert "uid" not in batch, "host-side keys are dropped"
