"""The training tasks, one module each, registered by name (:mod:`lorakit.training.registry`): ``builtin`` and
``causal_lm`` (:mod:`.causal_lm`), ``seq_cls``, ``seq2seq``, ``qa`` and ``token_cls``; the preference tasks ``dpo``,
``orpo``, ``simpo`` and ``kto`` (what they share is in :mod:`.preference_base`). A new task is one new module
here that defines a :class:`Task` subclass decorated with ``@register`` and is imported below.
"""

# Importing a task module registers it, in this order (dpo before orpo, simpo and kto: the flags they share are
# made from dpo's fields).
from . import causal_lm, dpo, kto, orpo, qa, seq2seq, seq_cls, simpo, token_cls  # noqa: F401
from .base import MicroBatch, Task, build_task, check_before_loading
from .causal_lm import BuiltinTask, CausalLMTask
from .loading import (AUTO_CLASSES, Start, enable_checkpointing, give_pad_token, lora_config_of, meta_model_of,
                      progress_bar, streams)
from .qa import QuestionAnsweringTask
from .seq2seq import Seq2SeqTask
from .seq_cls import ClassificationTask
from .token_cls import TokenClassificationTask

__all__ = ["AUTO_CLASSES", "BuiltinTask", "CausalLMTask", "ClassificationTask", "MicroBatch", "QuestionAnsweringTask",
           "Seq2SeqTask", "Start", "Task", "TokenClassificationTask", "build_task", "check_before_loading",
           "enable_checkpointing", "give_pad_token", "lora_config_of", "meta_model_of", "progress_bar", "streams"]
