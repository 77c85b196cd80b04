"""Task data for LD-MoLE fine-tuning: rows -> prompts -> token features -> padded batches, and the task
registry (each task's kind, converter and splits)."""

from .chat import CHAT_FORMATS, ChatFormat, get_chat_format
from .collation import collate, eval_collate, train_collate
from .examples import Example
from .features import (FeatureEncoder, encode_classification, encode_prompt, encode_qa, end_token_id,
                       letter_token_ids, pad_token_id_for)
from .rows import load_split_rows
from .splits import TaskData, load_task
from .task_kinds import CLASSIFICATION_KIND, QA_KIND, TaskKind, task_kind_for_model
from .tasks import TASKS, TaskSpec, get_task, register_task

__all__ = [
    "TaskSpec", "TASKS", "get_task", "register_task", "TaskKind", "QA_KIND", "CLASSIFICATION_KIND",
    "task_kind_for_model", "load_split_rows", "Example", "TaskData", "load_task", "ChatFormat", "CHAT_FORMATS",
    "get_chat_format", "encode_qa", "encode_classification", "encode_prompt", "end_token_id", "letter_token_ids",
    "FeatureEncoder", "collate", "train_collate", "eval_collate", "pad_token_id_for",
]
