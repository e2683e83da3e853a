"""The eval harness's sample types: a task's definition, one prompt's sample and its questions,
and the prompt format that turns text into token ids for one tokenizer. Task builders
(tasks.py) and dataset loaders (loaders.py) both produce these, so neither imports the other's
types."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

CONTEXT_MARK = "<<<tokaccel-context>>>"


# ---------------------------------------------------------------- prompt assembly


def leading_special_ids(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before text (BOS for Gemma, nothing for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


class PromptFormat:
    """Turns (instruction, question, answer prefix) into head/tail token ids for one tokenizer.

    chat=None uses the chat template when the tokenizer has one; False forces plain completion.
    """

    def __init__(self, tokenizer, chat: bool | None = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("chat=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.chat = has_template if chat is None else bool(chat)
        self.lead = leading_special_ids(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def head_tail(self, pre: str, post: str, answer_prefix: str = "", sep: str = " ", chat: bool | None = None) -> tuple[list[int], list[int]]:
        """Token ids before and after the context. `chat=False` forces plain text for this prompt
        (LongBench's few-shot tasks); `sep` joins question and answer prefix in plain text."""
        if self.chat and chat is not False:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": pre + CONTEXT_MARK + post}], add_generation_prompt=True, tokenize=False
            )
            if rendered.count(CONTEXT_MARK) != 1:
                raise ValueError("the chat template altered the prompt; cannot place the context")
            head, tail = rendered.split(CONTEXT_MARK)
            return self.encode(head), self.encode(tail + answer_prefix)
        tail = post + (sep + answer_prefix if answer_prefix else "")
        return self.lead + self.encode(pre), self.encode(tail)


@dataclass
class Question:
    ids: list[int]  # token ids after the shared context (question, template end, answer prefix)
    answers: list
    text: str = ""


@dataclass
class Sample:
    """One context with one or more questions; prompt of question q = context_ids + questions[q].ids."""

    task: str
    index: int
    context_ids: list[int]
    questions: list[Question]
    metric: str
    max_new_tokens: int
    depth: float | None = None  # fraction of the haystack before the (first) target needle
    info: dict = field(default_factory=dict)  # facts recorded with the prediction
    metric_args: dict = field(default_factory=dict)  # extra arguments of the scorer

    def prompt_ids(self, q: int = 0) -> list[int]:
        return self.context_ids + self.questions[q].ids

    @property
    def prompt_tokens(self) -> int:
        return max(len(self.context_ids) + len(q.ids) for q in self.questions) if self.questions else len(self.context_ids)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # passkey | niah | vt | cwe | fwe | ppl | longbench | infbench
    metric: str
    max_new_tokens: int
    description: str = ""
    params: dict = field(default_factory=dict)
    has_depth: bool = False
    spec: str = ""  # the string the task was made from (name + options)

    @property
    def label(self) -> str:
        """Folder-safe name: the task name, plus a hash of its options when it has any."""
        base = self.name.replace(":", "-").replace("/", "-")
        if self.spec and self.spec != self.name:
            return f"{base}-{short_hash(self.spec)}"
        return base


def short_hash(obj, n: int = 6) -> str:
    """A short stable hash of a JSON-able object (folder labels)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
