"""Task data for LD-MoLE fine-tuning: rows -> prompts -> token features -> padded batches."""

from .chat import CHAT_FORMATS, ChatFormat, get_chat_format
from .examples import Example
from .features import (collate, encode_classification, encode_prompt, encode_qa, end_token_id, letter_token_ids,
                       pad_token_id_for)
from .rows import load_split_rows
from .splits import TaskData, load_task
from .tasks import TASKS, TaskSpec, get_task

__all__ = [
    "TaskSpec", "TASKS", "get_task", "load_split_rows", "Example", "TaskData", "load_task",
    "ChatFormat", "CHAT_FORMATS", "get_chat_format", "encode_qa", "encode_classification",
    "encode_prompt", "end_token_id", "letter_token_ids", "collate", "pad_token_id_for",
]
