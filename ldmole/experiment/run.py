"""One run's config and everything built from it: its task, tokenizer and token features, its examples and
scoring batches, its base model and MoLE model. The trainer and the commands that rerun a run
(ldmole-eval, the routing plots, the λ probe) all start from :class:`Run`."""

from __future__ import annotations

from functools import cached_property, partial
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.adapter_io import load_mole
from ..core.injection import get_mole_model
from .data.chat import get_chat_format
from .data.collation import eval_collate
from .data.examples import Example, rows_to_examples
from .data.features import FeatureEncoder
from .data.rows import load_split_rows
from .data.splits import TaskData, carve_train_validation_test, load_task
from .data.tasks import TaskSpec, get_task
from .models import load_base_model, load_tokenizer, resolve_model_source
from .run_config import RunConfig
from .saved_config import load_run_config

__all__ = ["Run", "RUN_SPLITS", "PROTOCOL_SPLITS"]

# The examples a run uses: it trains on "train", picks its best epoch on "selection", reports "evaluation".
RUN_SPLITS = ("train", "selection", "evaluation")
# Split names that mean what the run's protocol makes of the task (any other name is a source split).
PROTOCOL_SPLITS = ("evaluation", "selection")


class Run:
    """A run's config with its task (:class:`TaskSpec`), tokenizer, feature encoder, examples, batches and
    models, each built on first use (data and tokenizer once)."""

    def __init__(self, config: RunConfig) -> None:
        """Raises ValueError when ``config.task`` is not a registered task (naming the closest)."""
        self.config = config
        self.task: TaskSpec = get_task(config.task)
        self._task_data: dict[bool, TaskData] = {}
        self._examples: dict[str, list[Example]] = {}

    @classmethod
    def from_folder(cls, run_dir: Union[str, Path], data_dir: Optional[str] = None,
                    tokenizer: Optional[str] = None) -> "Run":
        """The run of a run folder (its config.yaml, see :func:`load_run_config`)."""
        return cls(load_run_config(run_dir, data_dir, tokenizer))

    @cached_property
    def tokenizer(self) -> Any:
        """The run's tokenizer: ``tokenizer`` when set, else the model's own."""
        backbone = self.config.backbone
        return load_tokenizer(backbone.tokenizer or resolve_model_source(backbone.model_source))

    @cached_property
    def encoder(self) -> FeatureEncoder:
        """The task kind's encoding with the run's chat format and max_length (the task's when unset)."""
        return FeatureEncoder(self.task.task_kind.encode, self.tokenizer,
                              get_chat_format(self.config.backbone.chat_format),
                              self.config.data.max_length or self.task.max_length)

    @property
    def pad_token_id(self) -> int:
        """The id batches are padded with."""
        return self.encoder.pad_token_id

    def task_data(self, eval_only: bool = False) -> TaskData:
        """The task under the run's protocol, selection carve and seed (``eval_only``: only the evaluation
        split, which needs no training data)."""
        if eval_only not in self._task_data:
            data = self.config.data
            self._task_data[eval_only] = load_task(
                self.task, data.data_dir, protocol=data.protocol, selection_size=data.selection_size,
                seed=self.config.seed, skip_bad_rows=data.skip_bad_rows, eval_only=eval_only)
        return self._task_data[eval_only]

    def examples(self, split: str) -> list[Example]:
        """The examples the run trains on (``train``: ``train_max_examples`` of the training split, drawn
        with the seed), picks its best epoch on (``selection``) or reports (``evaluation``), those two
        capped at ``eval_max_examples``.

        Raises:
            ValueError: ``split`` is not one of RUN_SPLITS, or the split is empty (naming data_dir and the caps).
        """
        if split not in RUN_SPLITS:
            raise ValueError(f"split {split!r} is not one of the run's {RUN_SPLITS}; source splits are read with "
                             "Run.source_examples")
        if split not in self._examples:
            self._examples[split] = self._capped(split)
        return self._examples[split]

    def _capped(self, split: str) -> list[Example]:
        """The examples of one of RUN_SPLITS, subsampled / capped as configured, checked to be non-empty."""
        data, task = self.config.data, self.task_data()
        if split == "train":
            examples = list(task.train)
            if data.train_max_examples:
                order = np.random.default_rng(self.config.seed).permutation(len(examples))
                examples = [examples[i] for i in order[: data.train_max_examples]]
        else:
            examples = task.selection if split == "selection" else task.evaluation
            if data.eval_max_examples:
                examples = examples[: data.eval_max_examples]
        if not examples:
            raise ValueError(f"task {self.task.name!r}: the {split} split is empty; check the files under "
                             f"data_dir={data.data_dir!r} (or lower eval_max_examples / train_max_examples)")
        return examples

    def source_examples(self, split: str) -> list[Example]:
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
        data, spec = self.config.data, self.task
        if split == "evaluation":  # the same examples with or without training data, so none is read
            return self.task_data(eval_only=True).evaluation
        if split == "selection":
            try:
                return self.task_data().selection
            except FileNotFoundError as error:
                raise ValueError(f"--split selection is carved from the training split, which is missing ({error}); "
                                 "use --split evaluation or a source split such as validation") from None
        if spec.carved_from_one_split and split in ("train", "validation", "test"):
            rows = load_split_rows(spec, spec.train_split, data.data_dir)
            carve = dict(zip(("train", "validation", "test"), carve_train_validation_test(len(rows))))
            rows = [rows[i] for i in carve[split]]
        else:
            rows = load_split_rows(spec, split, data.data_dir)
        examples, _ = rows_to_examples(spec, rows, split, data.skip_bad_rows, training=split == "train")
        return examples

    def features(self, examples: Sequence[Example], truncate: Optional[bool] = None) -> list[dict]:
        """Token features of ``examples`` (``truncate``: default the run's ``truncate_long``)."""
        return self.encoder(examples, truncate=self.config.data.truncate_long if truncate is None else truncate)

    def loader(self, split: Union[str, Sequence[Example]], batch_size: Optional[int] = None) -> DataLoader:
        """Scoring batches of a split (one of RUN_SPLITS, see :meth:`examples`) or of given examples, in
        order, of ``batch_size`` (default ``eval_batch_size``). Its own generator: creating an iterator
        must not draw from the global RNG that dropout uses, or a resumed run would see other masks."""
        examples = self.examples(split) if isinstance(split, str) else split
        collate = partial(eval_collate, pad_token_id=self.pad_token_id, task_kind=self.task.task_kind)
        return DataLoader(self.features(examples), batch_size=batch_size or self.config.optim.eval_batch_size,
                          collate_fn=collate, generator=torch.Generator().manual_seed(self.config.seed))

    def base_model(self) -> nn.Module:
        """The run's base model (no MoLE yet; the task kind's model class), created right after seeding with
        the run seed, so that a random base, and the MoLE weights injected next, are the same in training
        and in every rerun."""
        from accelerate.utils import set_seed

        tokenizer = self.tokenizer  # loaded before seeding: nothing may draw between the seed and the weights
        set_seed(self.config.seed)
        return load_base_model(self.config.backbone, self.task.task_kind.model_kind, tokenizer,
                               num_labels=self.task.num_labels or 2)

    def mole_model(self, adapter: Optional[Union[str, Path]] = None) -> nn.Module:
        """The base model with MoLE: injected as training initialises it (``adapter`` None) or with the
        adapter folder's weights loaded."""
        model = self.base_model()
        if adapter is None:
            return get_mole_model(model, self.config.mole)
        return load_mole(model, adapter)
