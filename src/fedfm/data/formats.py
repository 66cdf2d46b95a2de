"""Data formats: validate raw rows, then turn them into tokenized examples.

Four formats (``DataConfig.format``):

``instruction``
    ``instruction`` + optional input (first present of ``instruction_fields.input``, e.g. Alpaca
    ``input`` or Dolly ``context``) + output (first present of ``instruction_fields.output``).
    The prompt uses the ``alpaca`` template (the Stanford Alpaca "Below is an instruction ..."
    text, with or without the ``### Input:`` block, ending in ``### Response:\\n``) or ``plain``
    (``{instruction}\\n{input}\\n``, the input line left out when empty).
``chat``
    ``messages_field`` holds ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``
    with at least one assistant turn. Rendered with ``tokenizer.apply_chat_template`` when the
    tokenizer has a chat template, else with ``"<role>: <content>\\n"`` lines (each assistant
    turn followed by the EOS token). Only assistant turns are supervised.
``classification``
    ``text_field`` (+ ``text_pair_field``) and an int or string label in ``label_field``.
``preference``
    ``prompt``, ``chosen``, ``rejected`` strings, tokenized as two sequences over one shared
    prompt for federated DPO (``algorithm.name: fed_dpo``).

Tokenized examples are plain dicts. Causal LM: ``input_ids = prompt_ids + response_ids + [eos]``
with ``labels`` equal to -100 on prompt tokens. Seq2seq: ``input_ids`` = prompt ids, ``labels`` =
response ids + eos. Classification: ``labels`` is an int. LM examples also carry ``prompt_ids``
and ``reference`` (for generation eval); every example carries ``row`` (index into the loaded
records). EOS is ``tokenizer.eos_token_id``, else ``sep_token_id``, else nothing is appended.

Truncation (causal LM, prompt + response longer than ``max_length``): the response is guaranteed
``r = min(len(response), max(1, max_length // 4))`` tokens; the prompt keeps its first
``min(len(prompt), max_length - r)`` tokens (its end is cut) and the response fills what is left
(its end is cut). An example left with no supervised token is dropped and counted, never kept.

All texts of a split are tokenized in one batched call of the (fast) tokenizer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fedfm.config import DataConfig
from fedfm.data.media import MEDIA_FORMATS, parse_audio, parse_image, tokenize_media
from fedfm.data.sources import DataError, OnError, RowError, SkipLog, iter_rows

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
DROP_NO_SUPERVISION = "no supervised token after truncation"

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# --------------------------------------------------------------------------- parsed items


class InstructionItem(NamedTuple):
    instruction: str
    input: str
    output: str


class ChatItem(NamedTuple):
    messages: tuple[tuple[str, str], ...]  # (role, content)


class ClassificationItem(NamedTuple):
    text: str
    pair: str | None
    label: int | str  # raw until mapped by a LabelSpace, then the class index


class PreferenceItem(NamedTuple):
    prompt: str
    chosen: str
    rejected: str


Item = InstructionItem | ChatItem | ClassificationItem | PreferenceItem


@dataclass
class Records:
    """Validated rows of one source: parsed items, their raw rows and locations."""

    source: str
    items: list[Any]
    rows: list[dict[str, Any]]
    locations: list[str]
    skips: SkipLog = field(default_factory=SkipLog)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, keep: Sequence[int]) -> Records:
        return Records(self.source, [self.items[i] for i in keep], [self.rows[i] for i in keep],
                       [self.locations[i] for i in keep], self.skips)


# --------------------------------------------------------------------------- validation


def _missing(where: str, name: str, what: str) -> RowError:
    return RowError(where, "missing field", f"missing field {name!r} (expected {what})")


def _get_str(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise _missing(where, name, "a string")
    if not isinstance(value, str):
        raise RowError(where, "wrong type",
                       f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _first_str(row: dict[str, Any], names: Sequence[str], where: str) -> str | None:
    for name in names:
        if row.get(name) is not None:
            return _get_str(row, name, where)
    return None


def parse_instruction(row: dict[str, Any], where: str, cfg: DataConfig) -> InstructionItem:
    fields = cfg.instruction_fields
    instruction = _get_str(row, fields.instruction, where)
    text_input = _first_str(row, fields.input, where) or ""
    output = _first_str(row, fields.output, where)
    if output is None:
        names = " or ".join(repr(name) for name in fields.output)
        raise RowError(where, "missing field", f"missing field {names} (expected the response "
                                               f"string)")
    return InstructionItem(instruction, text_input, output)


def parse_chat(row: dict[str, Any], where: str, cfg: DataConfig) -> ChatItem:
    name = cfg.messages_field
    messages = row.get(name)
    if messages is None:
        raise _missing(where, name, 'a list of {"role", "content"} messages')
    if not isinstance(messages, list) or not messages:
        raise RowError(where, "wrong type", f"field {name!r} must be a non-empty list of "
                                            f'{{"role", "content"}} messages, got '
                                            f"{type(messages).__name__}")
    parsed: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        at = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise RowError(where, "wrong type", f"{at} must be an object with 'role' and "
                                                f"'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(where, "bad role", f"{at}.role must be one of {', '.join(ROLES)}, "
                                              f"got {role!r}")
        if not isinstance(content, str):
            raise RowError(where, "wrong type", f"{at}.content must be a string, got "
                                                f"{type(content).__name__}")
        parsed.append((role, content))
    if not any(role == "assistant" for role, _ in parsed):
        raise RowError(where, "no assistant turn",
                       f"field {name!r} has no assistant message; nothing to learn from")
    return ChatItem(tuple(parsed))


def parse_classification(row: dict[str, Any], where: str, cfg: DataConfig) -> ClassificationItem:
    text = _get_str(row, cfg.text_field, where)
    pair = _get_str(row, cfg.text_pair_field, where) if cfg.text_pair_field else None
    label = row.get(cfg.label_field)
    if label is None:
        raise _missing(where, cfg.label_field, "an int or string label")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise RowError(where, "wrong type", f"label field {cfg.label_field!r} must be an int or "
                                            f"a string, got {type(label).__name__} {label!r}")
    return ClassificationItem(text, pair, label)


def parse_preference(row: dict[str, Any], where: str, cfg: DataConfig) -> PreferenceItem:
    return PreferenceItem(*(_get_str(row, name, where) for name in PREFERENCE_FIELDS))


PARSERS: dict[str, Callable[[dict[str, Any], str, DataConfig], Any]] = {
    "instruction": parse_instruction,
    "chat": parse_chat,
    "classification": parse_classification,
    "preference": parse_preference,
    "image": parse_image,  # fedfm.data.media
    "audio": parse_audio,
}


def _check_columns(row: dict[str, Any], where: str, columns: Sequence[str]) -> None:
    for column in columns:
        if row.get(column) is None:
            raise RowError(where, "missing field",
                           f"missing field {column!r} (the partition or group_by column)")


def load_records(path: str, cfg: DataConfig, *, columns: Sequence[str] = (),
                 max_rows: int | None = None) -> Records:
    """Read and validate the rows of ``path`` for ``cfg.format``.

    ``columns`` must be present (non-null) in every row (e.g. the partition column).
    ``max_rows`` keeps the first ``max_rows`` valid rows. Malformed rows raise ``DataError``
    naming file and line, or are counted in ``records.skips`` when ``cfg.on_error == "skip"``.
    """
    parse = PARSERS[cfg.format]
    skips = SkipLog()
    records = Records(path, [], [], [], skips)
    for where, row in iter_rows(path, skips, on_error=cfg.on_error):
        if max_rows is not None and len(records) >= max_rows:
            break
        try:
            item = parse(row, where, cfg)
            _check_columns(row, where, columns)
        except RowError as error:
            _raise_or_skip(error, cfg.on_error, skips)
            continue
        records.items.append(item)
        records.rows.append(row)
        records.locations.append(where)
    return records


def _raise_or_skip(error: RowError, on_error: OnError, skips: SkipLog) -> None:
    if on_error == "raise":
        raise error
    skips.add(error.reason, str(error))


# --------------------------------------------------------------------------- labels

_INT_RE = re.compile(r"^\s*-?\d+\s*$")


@dataclass(frozen=True)
class LabelSpace:
    """Class names in index order and how raw labels map to indices.

    With ``label_names`` given, strings are looked up by name and ints are indices into the
    names. Without, int labels (and integer-like strings, as CSV yields) are used as-is
    (``num_labels = max + 1``, names ``"0", "1", ...``) and other strings are sorted.
    """

    names: tuple[str, ...]
    ints: bool  # labels are class indices (no name lookup for int-like strings)

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def index(self, label: int | str, where: str) -> int:
        """The class index of a raw label; ``RowError`` naming the allowed labels if unknown."""
        if not self.ints and isinstance(label, str) and label in self.names:
            return self.names.index(label)
        value = _as_int(label)
        if value is not None and 0 <= value < len(self.names):
            return value
        shown = ", ".join(self.names[:20]) + (", ..." if len(self.names) > 20 else "")
        raise RowError(where, "unknown label",
                       f"unknown label {label!r}; allowed labels: {shown} "
                       f"(or their indices 0..{len(self.names) - 1})")


def _as_int(label: int | str) -> int | None:
    if isinstance(label, int):
        return label
    return int(label) if _INT_RE.match(label) else None


def infer_label_space(labels: Sequence[int | str], label_names: Sequence[str] | None,
                      *, source: str = "data") -> LabelSpace:
    """Build the label space from ``label_names`` or from the raw labels seen."""
    if label_names is not None:
        if len(set(label_names)) != len(label_names):
            raise DataError(f"data.label_names has duplicates: {list(label_names)}")
        return LabelSpace(tuple(label_names), ints=False)
    if not labels:
        raise DataError(f"{source}: no labelled rows to infer the label set from")
    as_ints = [_as_int(label) for label in labels]
    if all(value is not None for value in as_ints):
        low = min(v for v in as_ints if v is not None)
        if low < 0:
            raise DataError(f"{source}: integer labels must be >= 0, found {low}; "
                            f"set data.label_names to map them")
        high = max(v for v in as_ints if v is not None)
        return LabelSpace(tuple(str(i) for i in range(high + 1)), ints=True)
    if any(isinstance(label, int) for label in labels):
        raise DataError(f"{source}: labels mix integers and strings; set data.label_names "
                        f"to say how they map")
    return LabelSpace(tuple(sorted({str(label) for label in labels})), ints=False)


def apply_label_space(records: Records, space: LabelSpace, on_error: OnError) -> Records:
    """Replace raw labels by class indices; unknown labels raise or are skipped."""
    keep: list[int] = []
    for i, (item, where) in enumerate(zip(records.items, records.locations, strict=True)):
        try:
            records.items[i] = item._replace(label=space.index(item.label, where))
        except RowError as error:
            _raise_or_skip(error, on_error, records.skips)
            continue
        keep.append(i)
    return records if len(keep) == len(records) else records.subset(keep)


# --------------------------------------------------------------------------- tokenization


def eos_id(tokenizer: Any) -> int | None:
    """The id appended after responses: EOS, else SEP (BERT-style vocabularies), else None."""
    for value in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if value is not None:
            return int(value)
    return None


def encode(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool) -> list[list[int]]:
    """One batched tokenizer call over all ``texts``."""
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=add_special_tokens, verbose=False,
                    return_attention_mask=False, return_token_type_ids=False)
    return [list(ids) for ids in out["input_ids"]]


def render_prompt(item: InstructionItem, template: str) -> str:
    if template == "plain":
        return f"{item.instruction}\n{item.input}\n" if item.input.strip() else \
            f"{item.instruction}\n"
    if item.input.strip():
        return ALPACA_WITH_INPUT.format(instruction=item.instruction, input=item.input)
    return ALPACA_NO_INPUT.format(instruction=item.instruction)


def join_causal(prompt: list[int], response: list[int], max_length: int
                ) -> tuple[list[int], list[int], list[int]] | None:
    """``(input_ids, labels, kept_prompt)`` under the truncation rule of the module docstring,
    or ``None`` when no response token would remain."""
    if not response:
        return None
    reserve = min(len(response), max(1, max_length // 4))
    kept_prompt = prompt[: min(len(prompt), max_length - reserve)]
    kept_response = response[: max_length - len(kept_prompt)]
    if not kept_response:
        return None
    return (kept_prompt + kept_response, [IGNORE_INDEX] * len(kept_prompt) + kept_response,
            kept_prompt)


@dataclass
class Tokenized:
    """Examples aligned with the input records (``None`` where dropped) and drop counts."""

    examples: list[dict[str, Any] | None]
    dropped: Counter[str] = field(default_factory=Counter)


def _prompt_response(prompts: list[str], responses: list[str], rows: Sequence[int],
                     references: list[str], tokenizer: Any, task: str, max_length: int,
                     *, prompt_special: bool = True) -> Tokenized:
    prompt_ids = encode(tokenizer, prompts, add_special_tokens=prompt_special)
    eos = eos_id(tokenizer)
    tail = [eos] if eos is not None else []
    response_ids = [ids + tail for ids in encode(tokenizer, responses, add_special_tokens=False)]
    out = Tokenized([])
    for prompt, response, row, ref in zip(prompt_ids, response_ids, rows, references,
                                          strict=True):
        if task == "seq2seq":
            labels = response[:max_length]
            inputs = prompt[:max_length]
            joined = (inputs, labels, inputs) if labels else None
        else:
            joined = join_causal(prompt, response, max_length)
        if joined is None:
            out.examples.append(None)
            out.dropped[DROP_NO_SUPERVISION] += 1
            continue
        input_ids, labels, kept_prompt = joined
        out.examples.append({"input_ids": input_ids, "labels": labels,
                             "prompt_ids": kept_prompt, "reference": ref, "row": row})
    return out


def tokenize_instruction(items: Sequence[InstructionItem], rows: Sequence[int], tokenizer: Any,
                         *, task: str, max_length: int, template: str) -> Tokenized:
    prompts = [render_prompt(item, template) for item in items]
    responses = [item.output for item in items]
    return _prompt_response(prompts, responses, rows, responses, tokenizer, task, max_length)


def tokenize_classification(items: Sequence[ClassificationItem], rows: Sequence[int],
                            tokenizer: Any, *, max_length: int) -> Tokenized:
    if not items:
        return Tokenized([])
    texts = [item.text for item in items]
    pairs = [item.pair or "" for item in items] if items[0].pair is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, verbose=False,
                        return_attention_mask=False, return_token_type_ids=pairs is not None)
    out = Tokenized([])
    for i, (item, row) in enumerate(zip(items, rows, strict=True)):
        example: dict[str, Any] = {"input_ids": list(encoded["input_ids"][i]),
                                   "labels": int(item.label), "row": row}
        if pairs is not None and "token_type_ids" in encoded:
            example["token_type_ids"] = list(encoded["token_type_ids"][i])
        out.examples.append(example)
    return out


LabelledIds = tuple[list[int], list[int]]  # (input_ids, labels)


def join_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int
              ) -> tuple[LabelledIds, LabelledIds, list[int]] | None:
    """``((chosen ids, labels), (rejected ids, labels), kept prompt)``: ``join_causal``'s rule
    with the longer response's reserve, so both sides keep the *same* prompt (DPO compares two
    answers to one context); ``None`` when a side would keep no response token."""
    if not chosen or not rejected:
        return None
    reserve = min(max(len(chosen), len(rejected)), max(1, max_length // 4))
    kept_prompt = prompt[: min(len(prompt), max_length - reserve)]
    room = max_length - len(kept_prompt)
    sides = []
    for response in (chosen, rejected):
        kept = response[:room]
        sides.append((kept_prompt + kept, [IGNORE_INDEX] * len(kept_prompt) + kept))
    return sides[0], sides[1], kept_prompt


def tokenize_preference(items: Sequence[PreferenceItem], rows: Sequence[int], tokenizer: Any,
                        *, max_length: int) -> Tokenized:
    """Each pair as two causal-LM sequences over one shared (possibly cut) prompt, each response
    ending in EOS and alone supervised: ``chosen_input_ids`` / ``chosen_labels``,
    ``rejected_input_ids`` / ``rejected_labels``, the kept ``prompt_ids``, ``reference`` (the
    chosen text, for generation eval) and ``row``."""
    prompts = encode(tokenizer, [item.prompt for item in items], add_special_tokens=True)
    eos = eos_id(tokenizer)
    tail = [eos] if eos is not None else []
    answers = encode(tokenizer, [a for item in items for a in (item.chosen, item.rejected)],
                     add_special_tokens=False)
    out = Tokenized([])
    for i, (item, row) in enumerate(zip(items, rows, strict=True)):
        joined = join_pair(prompts[i], answers[2 * i] + tail, answers[2 * i + 1] + tail,
                           max_length)
        if joined is None:
            out.examples.append(None)
            out.dropped[DROP_NO_SUPERVISION] += 1
            continue
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels), prompt = joined
        out.examples.append({
            "chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
            "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels,
            "prompt_ids": prompt, "reference": item.chosen, "row": row,
        })
    return out


# --------------------------------------------------------------------------- chat


@dataclass
class RenderedChat:
    text: str
    spans: list[tuple[int, int]]  # supervised character spans (assistant turns)
    reference: str  # content of the last assistant turn


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used to locate assistant turns."""


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation: bool) -> str:
    if not messages and not generation:
        return ""
    conversation = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=generation)


def render_chat_template(item: ChatItem, tokenizer: Any) -> RenderedChat:
    """Render with the tokenizer's template; assistant spans come from rendering prefixes:
    turn i covers ``render(m[:i], generation prompt)`` .. ``render(m[:i+1])``."""
    messages = item.messages
    text = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        try:
            start_text = _render(tokenizer, messages[:i], True)
        except Exception:  # some templates cannot render an empty or partial conversation
            start_text = ""
        end_text = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(end_text) and end_text.startswith(start_text)):
            raise ChatTemplateError(
                "the tokenizer's chat template is not prefix-stable (rendering the first "
                f"{i + 1} messages is not a prefix of rendering them all), so assistant "
                "turns cannot be located; use a template that only appends per message"
            )
        spans.append((len(start_text), len(end_text)))
    return RenderedChat(text, spans, _last_assistant(item))


def render_chat_plain(item: ChatItem, eos_token: str | None) -> RenderedChat:
    """``"<role>: <content>\\n"`` lines; assistant content (+ EOS) is supervised."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for role, content in item.messages:
        header = f"{role}: "
        body = content + (eos_token or "") if role == "assistant" else content
        if role == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        piece = f"{header}{body}\n"
        parts.append(piece)
        length += len(piece)
    return RenderedChat("".join(parts), spans, _last_assistant(item))


def _last_assistant(item: ChatItem) -> str:
    return next(content for role, content in reversed(item.messages) if role == "assistant")


def _chat_prompt_text(item: ChatItem, tokenizer: Any) -> str:
    """Everything before the last assistant turn, ending in the assistant header."""
    last = max(i for i, (role, _) in enumerate(item.messages) if role == "assistant")
    if tokenizer.chat_template:
        return _render(tokenizer, item.messages[:last], True)
    return "".join(f"{role}: {content}\n" for role, content in item.messages[:last]) + \
        "assistant: "


def render_chats(items: Sequence[ChatItem], locations: Sequence[str], tokenizer: Any
                 ) -> list[RenderedChat]:
    use_template = bool(getattr(tokenizer, "chat_template", None))
    rendered: list[RenderedChat] = []
    for item, where in zip(items, locations, strict=True):
        if not use_template:
            rendered.append(render_chat_plain(item, tokenizer.eos_token or
                                              getattr(tokenizer, "sep_token", None)))
            continue
        try:
            rendered.append(render_chat_template(item, tokenizer))
        except ChatTemplateError:
            raise
        except Exception as exc:  # jinja errors, e.g. "roles must alternate"
            raise DataError(f"{where}: the chat template rejected this conversation: {exc}") \
                from exc
    return rendered


def _supervised(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
                ) -> list[bool]:
    """A token is supervised when its last character lies inside an assistant span."""
    marks: list[bool] = []
    for start, end in offsets:
        last = end - 1
        marks.append(end > start and any(a <= last < b for a, b in spans))
    return marks


def tokenize_chat(items: Sequence[ChatItem], rows: Sequence[int], locations: Sequence[str],
                  tokenizer: Any, *, task: str, max_length: int) -> Tokenized:
    if task == "seq2seq":
        prompts = [_chat_prompt_text(item, tokenizer) for item in items]
        refs = [_last_assistant(item) for item in items]
        return _prompt_response(prompts, refs, rows, refs, tokenizer, task, max_length,
                                prompt_special=not tokenizer.chat_template)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chat data needs a fast tokenizer (offset mapping) to find the "
                         "assistant turns")
    rendered = render_chats(items, locations, tokenizer)
    encoded = tokenizer([r.text for r in rendered], return_offsets_mapping=True, verbose=False,
                        add_special_tokens=not tokenizer.chat_template,
                        return_attention_mask=False, return_token_type_ids=False)
    out = Tokenized([])
    for i, (chat, row) in enumerate(zip(rendered, rows, strict=True)):
        ids = list(encoded["input_ids"][i])[:max_length]
        marks = _supervised(encoded["offset_mapping"][i], chat.spans)[:max_length]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, marks, strict=True)]
        if not any(marks):
            out.examples.append(None)
            out.dropped[DROP_NO_SUPERVISION] += 1
            continue
        last_start = chat.spans[-1][0]
        offsets = encoded["offset_mapping"][i]
        cut = next((t for t, (s, e) in enumerate(offsets) if e > s and e - 1 >= last_start),
                   len(ids))
        out.examples.append({"input_ids": ids, "labels": labels, "prompt_ids": ids[:cut],
                             "reference": chat.reference, "row": row})
    return out


def tokenize_records(records: Records, tokenizer: Any, *, fmt: str, task: str,
                     max_length: int, template: str = "alpaca",
                     rows: Sequence[int] | None = None) -> Tokenized:
    """Tokenize all ``records`` of one format (one batched tokenizer call per text kind).

    ``rows`` are the ``row`` ids stored in the examples (default ``0..len-1``).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    row_ids = list(rows) if rows is not None else list(range(len(records)))
    items = records.items
    if fmt == "instruction":
        return tokenize_instruction(items, row_ids, tokenizer, task=task, max_length=max_length,
                                    template=template)
    if fmt == "chat":
        return tokenize_chat(items, row_ids, records.locations, tokenizer, task=task,
                             max_length=max_length)
    if fmt == "classification":
        return tokenize_classification(items, row_ids, tokenizer, max_length=max_length)
    if fmt == "preference":
        return tokenize_preference(items, row_ids, tokenizer, max_length=max_length)
    if fmt in MEDIA_FORMATS:  # pixels / audio features from the model's processor
        return Tokenized(tokenize_media(records, row_ids, tokenizer, fmt=fmt,
                                        max_length=max_length))
    raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(PARSERS)}")
