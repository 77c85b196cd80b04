"""What training, evaluation, routing plots and the λ probe share: a run's config, task data (any
split), tokenizer and token features; its base model; batches; and prediction over a loader
(:func:`evaluate`, with routing statistics: :func:`evaluate_routing`)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..core.records import routing_records
from .adapter_info import AdapterInfo
from .data import (Example, TaskData, collate, encode_classification, encode_qa, get_chat_format, load_split_rows,
                   load_task, pad_token_id_for)
from .data.examples import rows_to_examples
from .data.features import IGNORE_INDEX
from .data.splits import carve_train_validation_test
from .data.tasks import TaskSpec, get_task
from .evaluation import classification_metrics, option_scores, qa_metrics
from .models import language_model_parts, load_base_model, load_tokenizer, resolve_model_source
from .routing_stats import RoutingStats
from .run_config import RunConfig

__all__ = ["SelectedLogits", "answer_positions", "train_collate", "eval_collate", "Encoder", "RunData",
           "load_run_config", "adapter_run_config", "load_run_task", "load_run_tokenizer", "load_run_data",
           "RUN_SPLITS", "load_split_examples", "build_base_model", "eval_loader", "autocast_for", "evaluate",
           "evaluate_routing"]

REPO_ROOT = Path(__file__).resolve().parents[2]
# --split names that mean what the run's protocol makes of the task (any other name is a source split).
RUN_SPLITS = ("evaluation", "selection")


class SelectedLogits(nn.Module):
    """Runs the decoder body and applies the head only at chosen positions (never the full vocab
    logits of every position). ``positions [B, K]`` -> logits ``[B, K, out]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # A plain tuple, not submodules: registered again, body and head would be reached twice, which
        # FSDP1's auto-wrap rejects ("Child module ... is already wrapped"), and the state dict would repeat them.
        self.parts = language_model_parts(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        body, head = self.parts
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return head(picked)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, K], targets [B, K]) of the supervised tokens: position t predicts labels[t+1].

    Computed on the host from the collated CPU labels; rows with fewer than K targets are padded
    with position 0 and target IGNORE_INDEX.
    """
    shifted = labels[:, 1:]
    supervised = shifted != IGNORE_INDEX
    width = max(int(supervised.sum(1).max()), 1)
    positions = torch.zeros(labels.shape[0], width, dtype=torch.long)
    targets = torch.full((labels.shape[0], width), IGNORE_INDEX, dtype=torch.long)
    for row in range(labels.shape[0]):
        index = supervised[row].nonzero().flatten()
        positions[row, : len(index)] = index
        targets[row, : len(index)] = shifted[row, index]
    return positions, targets


def train_collate(batch: list[dict], pad_token_id: int, kind: str) -> dict:
    """A padded batch plus the positions whose logits the loss needs and their targets (tensors only)."""
    out = collate(batch, pad_token_id)
    out["example_index"] = torch.tensor([item["example_index"] for item in batch], dtype=torch.long)
    if kind == "qa":
        out["positions"], out["targets"] = answer_positions(out["labels"])
    else:
        out["positions"] = out["last_token_index"].unsqueeze(1)
        out["targets"] = out["label"].unsqueeze(1)
    for key in ("uid", "category", "labels", "sequence_lengths"):
        out.pop(key, None)
    return out


def eval_collate(batch: list[dict], pad_token_id: int, kind: str) -> dict:
    """A training batch whose position is the one scored: the last prompt token (QA) or last token (GLUE)."""
    out = train_collate(batch, pad_token_id, kind)
    if kind == "qa":
        out["positions"] = out["last_prompt_index"].unsqueeze(1)
    return out


@dataclass
class Encoder:
    """Turns a task's examples into token features, each tagged with its index (to map gathered
    predictions back to examples)."""

    kind: str
    tokenizer: Any
    chat_format: Any
    max_length: int

    @classmethod
    def for_run(cls, config: RunConfig, spec: TaskSpec, tokenizer) -> "Encoder":
        """The encoder of a run: its chat format and max_length (the task's when unset)."""
        return cls(spec.kind, tokenizer, get_chat_format(config.backbone.chat_format),
                   config.data.max_length or spec.max_length)

    def __call__(self, examples, truncate: bool) -> list[dict]:
        encode = encode_qa if self.kind == "qa" else encode_classification
        features = []
        for index, example in enumerate(examples):
            item = encode(example, self.tokenizer, self.chat_format, self.max_length, truncate=truncate)
            item["example_index"] = index
            features.append(item)
        return features

    @property
    def pad_token_id(self) -> int:
        return pad_token_id_for(self.tokenizer)


def load_run_config(run_dir: Union[str, Path], data_dir: Optional[str] = None,
                    tokenizer: Optional[str] = None) -> RunConfig:
    """The run's config (config.yaml re-validated), with the given path overrides.

    A relative data_dir / tokenizer that does not exist from the current directory but does from
    the repository root (where run.sh and ldmole-sweep run) is taken from there.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder written by ldmole.cli.train")
    saved = yaml.safe_load(path.read_text()) or {}
    saved.pop("task_name", None)  # written by runs from before configs/tasks/ was replaced by the task registry
    for key in ("data_dir", "tokenizer"):
        value = saved.get(key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO_ROOT / value).exists():
            saved[key] = str(REPO_ROOT / value)
    if data_dir is not None:
        saved["data_dir"] = data_dir
    if tokenizer is not None:
        saved["tokenizer"] = tokenizer
    return RunConfig.from_flat(saved)


def adapter_run_config(info: AdapterInfo, data_dir: Optional[str] = None, tokenizer: Optional[str] = None) -> RunConfig:
    """A run config rebuilt from an adapter folder's record alone (no config.yaml): its model, task,
    method, seed and prompt format; data settings are the defaults (protocol "selection", all examples)."""
    flat = {"task": info.task, "method": info.method, "seed": info.seed, "model_source": info.base_model,
            "tokenizer": tokenizer or info.tokenizer, "chat_format": info.chat_format, "torch_dtype": info.torch_dtype,
            "random_init": dict(info.random_init or {}), "data_dir": data_dir}
    if info.model:
        flat["model"] = info.model
    return RunConfig.from_flat(flat)


def load_run_task(config: RunConfig, eval_only: bool = False) -> TaskData:
    """The run's task under its protocol and selection carve (``eval_only``: no training split needed)."""
    data = config.data
    return load_task(config.task, data.data_dir, protocol=data.protocol, selection_size=data.selection_size,
                     seed=config.seed, skip_bad_rows=data.skip_bad_rows, eval_only=eval_only)


def load_run_tokenizer(config: RunConfig):
    """The run's tokenizer: ``tokenizer`` when set, else the model's own."""
    return load_tokenizer(config.backbone.tokenizer or resolve_model_source(config.backbone.model_source))


@dataclass
class RunData:
    """A run's task, encoder and the examples it trains on, selects with and reports on."""

    task: TaskData
    encoder: Encoder
    train_examples: list
    selection_examples: list
    eval_examples: list


def load_run_data(config: RunConfig) -> RunData:
    """The task and tokenizer of a training run, its examples subsampled / capped as configured.

    Raises:
        ValueError: a split ends up empty (naming data_dir and the caps to lower).
    """
    task = load_run_task(config)
    train_examples = list(task.train)
    if config.data.train_max_examples:
        order = np.random.default_rng(config.seed).permutation(len(train_examples))
        train_examples = [train_examples[i] for i in order[: config.data.train_max_examples]]
    limit = config.data.eval_max_examples
    selection_examples = task.selection[:limit] if limit else task.selection
    eval_examples = task.evaluation[:limit] if limit else task.evaluation
    for name, examples in (("train", train_examples), ("selection", selection_examples), ("evaluation", eval_examples)):
        if not examples:
            raise ValueError(f"task {config.task!r}: the {name} split is empty; check the files under "
                             f"data_dir={config.data.data_dir!r} (or lower eval_max_examples / train_max_examples)")
    encoder = Encoder.for_run(config, task.spec, load_run_tokenizer(config))
    return RunData(task, encoder, train_examples, selection_examples, eval_examples)


def load_split_examples(config: RunConfig, split: str) -> list[Example]:
    """The examples of one split of the run's task, all of them, in file order.

    ``evaluation`` is the split a run reports (its metrics.json accuracy) and ``selection`` the one
    it picks its best epoch on, both as the run's protocol, selection_size and seed define them
    (docs/method.md §4); ``evaluation`` reads no training data, so it also works for tasks that have
    no local train split (HellaSwag). Any other name is a split of the task's source data (``train``,
    ``validation``, ``test``); for MMLU-Pro, which has one source split, those are its fixed 80/10/10
    carves. Training-split examples get the training prompts (they differ for MMLU-Pro).

    Raises:
        ValueError: ``selection`` without a training split (naming --split evaluation instead).
        FileNotFoundError: no local file for a source split (naming the path tried).
    """
    data = config.data
    if split == "evaluation":  # the same examples with or without training data, so none is read
        return load_run_task(config, eval_only=True).evaluation
    if split == "selection":
        try:
            return load_run_task(config).selection
        except FileNotFoundError as error:
            raise ValueError(f"--split selection is carved from the training split, which is missing ({error}); "
                             "use --split evaluation or a source split such as validation") from None
    spec = get_task(config.task)
    if spec.carved_from_one_split and split in ("train", "validation", "test"):
        rows = load_split_rows(spec, spec.train_split, data.data_dir)
        carve = dict(zip(("train", "validation", "test"), carve_train_validation_test(len(rows))))
        rows = [rows[i] for i in carve[split]]
    else:
        rows = load_split_rows(spec, split, data.data_dir)
    examples, _ = rows_to_examples(spec, rows, split, data.skip_bad_rows, training=split == "train")
    return examples


def build_base_model(config: RunConfig, spec: TaskSpec, tokenizer) -> nn.Module:
    """The run's base model (no MoLE yet), created right after seeding with the run seed, so that a
    random base, and the MoLE weights injected next, are the same in training and in every rerun."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    return load_base_model(config.backbone, "causal_lm" if spec.kind == "qa" else "classification", tokenizer,
                           num_labels=spec.num_labels or 2)


def eval_loader(features: list[dict], batch_size: int, pad_token_id: int, kind: str, seed: int) -> DataLoader:
    """Batches for :func:`evaluate`, in order. Its own generator: creating an iterator must not draw
    from the global RNG that dropout uses, or a resumed run would see other dropout masks."""
    return DataLoader(features, batch_size=batch_size, collate_fn=partial(eval_collate, pad_token_id=pad_token_id,
                                                                          kind=kind),
                      generator=torch.Generator().manual_seed(seed))


def autocast_for(mixed_precision: str, device: Union[str, torch.device]) -> Callable:
    """The autocast context factory of a run's ``mixed_precision`` (no, bf16, fp16) on ``device``,
    what accelerate's ``autocast`` gives the trainer, so that a rerun computes in the same precision."""
    if mixed_precision == "no":
        return nullcontext
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise ValueError(f"mixed_precision={mixed_precision!r} is unknown; choose no, bf16 or fp16")
    return partial(torch.autocast, device_type=torch.device(device).type, dtype=dtypes[mixed_precision])


def _same(value):
    return value


@torch.no_grad()
def evaluate(model: SelectedLogits, loader: DataLoader, kind: str, task: str, examples,
             autocast: Callable = nullcontext, gather: Callable = _same,
             observe: Optional[Callable[[dict], None]] = None) -> dict:
    """Accuracy and task metrics of ``model`` (in eval mode, restored after) on ``loader``.

    ``autocast`` and ``gather`` are accelerate's in a training run (gather drops the duplicates a
    distributed sampler pads with); ``observe(batch)`` runs after each forward, e.g. to read the
    routing records.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions, golds, indices = [], [], []
    for batch in loader:
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        with autocast():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["positions"])[:, 0].float()
        if observe is not None:
            observe(batch)
        if kind == "qa":
            scores = option_scores(logits, batch["option_token_ids"], batch["option_mask"])
            gold = batch["answer"]
        else:
            scores, gold = logits, batch["label"]
        pred, gold, index = gather((scores.argmax(-1), gold, batch["example_index"]))
        predictions.append(pred.cpu())
        golds.append(gold.cpu())
        indices.append(index.cpu())
    model.train(was_training)
    pred = torch.cat(predictions).numpy()
    gold = torch.cat(golds).numpy()
    index = torch.cat(indices).numpy()
    if kind == "qa":
        metrics = qa_metrics(pred, gold, [examples[i].category for i in index])
    else:
        metrics = classification_metrics(pred, gold, task)
    metrics["num_examples"] = int(len(pred))
    return metrics


def evaluate_routing(model: nn.Module, loader, kind: str, task: str, examples, routing: RoutingStats,
                     autocast: Callable = nullcontext, progress: Optional[str] = None) -> dict:
    """:func:`evaluate` of a MoLE model (not wrapped) that adds every forward's routing records to
    ``routing``; ``progress`` names a tqdm bar over the batches (None: no bar)."""
    if progress is not None:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=progress, unit="batch")
    return evaluate(SelectedLogits(model), loader, kind, task, examples, autocast=autocast,
                    observe=lambda batch: routing.update(routing_records(model), batch["input_ids"],
                                                         batch["attention_mask"]))
