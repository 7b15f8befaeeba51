"""Prompt datasets from files: JSONL / JSON / parquet, one file or a folder of them, in the
layouts users bring. Parquet is read with the ``datasets`` library (local files only); JSON with
Python's ``json``, value for value: ``datasets`` gives each column one type, and a column that
mixes them (integer answers beside ``"1/2"``) came back changed (``"007"`` as 7, ``"1e3"`` as
1000.0, ``"[1, 2]"`` as a list) or failed 250k rows into a file.

Every row becomes an example ``{"id", "question" | "messages", "answer", "reward"?, ...}``:
``question`` is the problem text (the prompt template and chat template are applied later,
with the run's tokenizer), ``messages`` a chat conversation given by the file itself, ``answer``
the ground truth the reward compares with, ``reward`` (optional) the registered reward that
scores this row. Presets name the common layouts:

==============  ==================================================  ===========================
preset          prompt                                              answer
==============  ==================================================  ===========================
``gsm8k``       ``question``                                        after ``####`` of ``answer``
``math``        ``problem``                                         the ``\\boxed{}`` of ``solution``
``dapo``        ``prompt`` (chat), DAPO's instruction taken off     ``reward_model.ground_truth``
``deepscaler``  ``problem``                                         ``answer``
``countdown``   built from ``nums`` and ``target`` (reward countdown)  the target
``verl``        ``prompt`` (chat messages), reward from ``data_source``  ``reward_model.ground_truth``
==============  ==================================================  ===========================

A MATH solution with several different ``\\boxed{}`` (a multi-part answer) is a bad row (the
same box repeated is its answer); a float answer
is written positionally (``0.00001``, not ``1e-05``); countdown numbers must be integers; a
verl ground truth ``{"target", "numbers"}`` (TinyZero's countdown) gives the countdown fields.

Without a preset, ``prompt_key`` / ``answer_key`` name the columns (default ``prompt`` /
``answer``). A row's own ``reward`` field (or verl's ``data_source``) routes it to a reward.
Bad rows (a missing key, an empty prompt, chat messages that do not end with the user's turn,
an answer that cannot be parsed) are skipped and counted, with the first offending row's file
and row in the report; a file where most rows are bad is an error, since then the layout is
almost certainly not what the user thinks it is. A folder's files are read one by one (their
columns may differ); an example's id is its ``"file:row"``.
"""
from __future__ import annotations

import dataclasses
import decimal
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from r1fast.rewards.extract import last_boxed

log = logging.getLogger("r1fast.data")

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

#: verl data sources -> r1fast reward names (rows of other sources use the run's default)
VERL_SOURCES = {"openai/gsm8k": "math_accuracy", "lighteval/MATH": "math_accuracy",
                "DigitalLearningGmbH/MATH-lighteval": "math_accuracy",
                "math_dapo": "math_accuracy", "countdown": "countdown"}


class BadRow(ValueError):
    """A row that does not fit the layout (skipped and counted)."""


@dataclasses.dataclass
class LoadReport:
    """What reading a dataset found."""

    path: str
    rows: int
    kept: int
    bad: int
    first_bad_row: Optional[int]
    first_bad_reason: Optional[str]
    first_bad_where: Optional[str] = None
    """The first bad row as ``"file:row"`` (its file and its row there), when known."""

    def first_bad(self) -> str:
        """The first bad row, named: ``b.jsonl row 1 (counting from 0)`` (or ``row 4 ...`` of
        the one list of rows)."""
        if self.first_bad_where is None:
            return f"row {self.first_bad_row}{FROM_ZERO}"
        return row_name(self.first_bad_where.rsplit(":", 1)[0], self.first_bad_where)

    def summary(self) -> str:
        s = f"{self.path}: {self.kept} of {self.rows} rows kept"
        if self.bad:
            s += (f"; {self.bad} bad rows skipped (first: {self.first_bad()}, "
                  f"{self.first_bad_reason})")
        return s


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"{what} is empty or not text ({value!r:.60})")
    return value


def _get(row: dict, key: str) -> Any:
    """``row[key]`` (dotted keys reach into nested columns); None counts as missing, since
    ``datasets`` fills the columns a row lacks with None."""
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            raise BadRow(f"missing key {key!r}")
        node = node[part]
    return node


def _gsm8k_answer(text: Any) -> str:
    text = _text(text, "answer")
    if "####" not in text:
        raise BadRow("answer has no '####' final-answer marker")
    return _text(text.rsplit("####", 1)[1].strip().replace(",", ""), "final answer")


def _boxed_answer(text: Any) -> str:
    # a few MATH solutions box their answer with \fbox, which Hendrycks' extractor accepts
    text = _text(text, "solution").replace("\\fbox{", "\\boxed{")
    boxed = last_boxed(text)
    if boxed is None:
        raise BadRow("solution has no \\boxed{} answer")
    pieces = text.split("\\boxed")[1:]
    answers = {"".join(a.split()) if a else a for a in
               (last_boxed("\\boxed" + piece) for piece in pieces)}  # spacing aside
    if len(answers) > 1:  # a multi-part answer: its last box alone would be scored as the whole
        raise BadRow(f"solution has {len(pieces)} different \\boxed{{}} answers: which is "
                     f"meant is ambiguous")
    return _text(boxed, "boxed answer")


def _plain_answer(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRow(f"answer is {value}")
        if value.is_integer() and abs(value) > 2 ** 53:
            # a parquet column mixing integers and decimals holds 64-bit floats: above 2^53 an
            # integer may have lost digits (12345678901234567891 reads 1.2345678901234567e+19,
            # 10000000000000001 reads 1e16), and the float cannot tell which it was (JSON is
            # read exactly: such numbers come as integers, see _json_number)
            raise BadRow(f"answer {value!r} is a float above 2^53, where an integer answer "
                         f"loses digits (its column mixes integers and decimals); write such "
                         f"answers as strings")
        # positional, as a model writes it: str() would give '1e-05' or '1e+16'
        return format(decimal.Decimal(repr(value)), "f")
    return _not_a_solution(_text(value, "answer").strip())


def _not_a_solution(answer: str) -> str:
    """``answer``, unless it is a GSM8K worked solution (its ``#### <number>`` line), which no
    final answer ever equals: every reward would be 0, silently. (A MATH solution around a
    ``\\boxed{}`` is not refused: math-verify reads the boxed answer out of the gold.)"""
    if "####" in answer:
        raise BadRow(f"answer {answer[-60:]!r} holds GSM8K's '####' line: the column is a "
                     f"worked solution (data.preset = \"gsm8k\" takes the number after it)")
    return answer


def _integer(value: Any, key: str) -> int:
    """An integer-valued number; a fractional or non-numeric value is a bad row naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not value.is_integer()):
        raise BadRow(f"{key} must hold integers, got {value!r:.60}")
    return int(value)


def prompt_fields(value: Any) -> dict:
    """``{"question"}`` of a text prompt, or ``{"messages", "question"}`` of a list of chat
    messages ``[{"role", "content"}]`` ending with the user's turn; else :class:`BadRow`."""
    if isinstance(value, (list, tuple)):
        if not value or any(not isinstance(m, dict) or not isinstance(m.get("content"), str)
                            or "role" not in m for m in value):
            raise BadRow("prompt messages must be a non-empty list of {role, content}")
        msgs = [dict(m) for m in value]
        if msgs[-1]["role"] != "user":  # e.g. an SFT conversation: the answer would be shown
            raise BadRow(f"prompt messages must end with the user's turn, not "
                         f"{msgs[-1]['role']!r}")
        return {"messages": msgs, "question": _text(msgs[-1]["content"], "prompt's last message")}
    return {"question": _text(value, "prompt")}


def _countdown_fields(nums: Any, target: Any) -> dict:
    """The countdown checker's fields: integer ``numbers`` and ``target``."""
    if not isinstance(nums, (list, tuple)) or not nums:
        raise BadRow("nums must be a non-empty list")
    numbers, goal = [_integer(n, "nums") for n in nums], _integer(target, "target")
    return {"numbers": numbers, "target": goal, "answer": str(goal), "reward": "countdown"}


def _countdown(row: dict) -> dict:
    fields = _countdown_fields(_get(row, "nums"), _get(row, "target"))
    question = (f"Using the numbers {fields['numbers']}, create an equation that equals "
                f"{fields['target']}. Use each number once, with + - * /.")
    return {"question": question, **fields}


def _verl(row: dict) -> dict:
    out = prompt_fields(_get(row, "prompt"))
    truth = _get(row, "reward_model.ground_truth")
    if isinstance(truth, dict):  # TinyZero's countdown: {"target", "numbers"}
        out.update(_countdown_fields(_get(truth, "numbers"), _get(truth, "target")))
    else:
        out["answer"] = _plain_answer(truth)
    source = row.get("data_source")
    if source in VERL_SOURCES:
        out["reward"] = VERL_SOURCES[source]
    out["data_source"] = source
    return out


#: DAPO-Math-17k wraps every problem in its own instruction (the answer on an "Answer:" line,
#: no \boxed{}); the ``dapo`` preset keeps the bare problem, so that ``data.template`` (e.g.
#: r1-zero's) is the one instruction the model reads. ``verl`` keeps the prompt as written.
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the "
               "answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def _dapo(row: dict) -> dict:
    """BytedTsinghua-SIA/DAPO-Math-17k (and its AIME-2024 test file): verl's layout (a chat
    ``prompt``, ``reward_model.ground_truth``, ``data_source`` math_dapo), the problem taken
    out of DAPO's instruction when it is there."""
    out = _verl(row)
    text = out["question"]
    if text.startswith(DAPO_PREFIX) and text.endswith(DAPO_SUFFIX):
        out["question"] = text[len(DAPO_PREFIX):-len(DAPO_SUFFIX)]
        out["messages"][-1]["content"] = out["question"]
        if len(out["messages"]) == 1:
            del out["messages"]  # a plain question: the run's template and system prompt apply
    return out


def _keyed(prompt_key: str, answer_key: str, parse: Callable[[Any], str]):
    def convert(row: dict) -> dict:
        out = prompt_fields(_get(row, prompt_key))
        out["answer"] = parse(_get(row, answer_key))
        return out
    return convert


PRESETS: dict[str, Callable[[dict], dict]] = {
    "gsm8k": _keyed("question", "answer", _gsm8k_answer),
    "math": _keyed("problem", "solution", _boxed_answer),
    "dapo": _dapo,
    "deepscaler": _keyed("problem", "answer", _plain_answer),
    "countdown": _countdown,
    "verl": _verl,
}


def data_files(path: str | Path) -> tuple[str, list[str]]:
    """(``datasets`` builder, sorted file list) of a file or a folder of data files; a folder's
    other files (not hidden ones) are named in a warning, never read."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"data folder {path} has no .jsonl/.json/.parquet files")
        _check_one_split(path, files)
        other = sorted(p.name for p in path.iterdir()
                       if p.suffix not in SUFFIXES and not p.name.startswith("."))
        if other:
            log.warning("data folder %s: %d entries not read (only %s files are): %s", path,
                        len(other), "/".join(SUFFIXES), ", ".join(other[:5])
                        + (", ..." if len(other) > 5 else ""))
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"data file {path} must end in one of {sorted(SUFFIXES)}")
        files = [path]
    else:
        raise ValueError(f"data path {path} does not exist")
    kinds = {SUFFIXES[p.suffix] for p in files}
    if len(kinds) > 1:
        raise ValueError(f"data folder {path} mixes file types {sorted(kinds)}; use one kind")
    return kinds.pop(), [str(p) for p in files]


#: a file named as one split of a dataset (Hugging Face's ``test-00000-of-00001.parquet``,
#: ``validation.jsonl``, ``train_0.json``)
_SPLIT_NAME = re.compile(r"^(train|test|validation|valid|val|dev|eval)(?:[-_.]|$)", re.I)


def _check_one_split(folder: Path, files: list[Path]) -> None:
    """A folder of one dataset's splits (a Hugging Face snapshot holds train-*.parquet beside
    test-*.parquet) is refused: read whole, training would see the held-out rows."""
    splits: dict[str, list[str]] = {}
    for f in files:
        if m := _SPLIT_NAME.match(f.stem):
            splits.setdefault(m.group(1).lower(), []).append(f.name)
    if len(splits) > 1:
        named = "; ".join(f"{k}: {', '.join(v[:2])}" + (", ..." if len(v) > 2 else "")
                          for k, v in sorted(splits.items()))
        raise ValueError(f"data folder {folder} holds the files of {len(splits)} splits "
                         f"({named}) and would read them all; give the training split's file "
                         f"(data.path) and the held-out one's (data.test_path)")


def _json_number(text: str) -> float | int:
    """A JSON number with a fraction or exponent: a float, except a whole one beyond 2^53,
    which is the exact integer written (``6.02e23`` is 602000000000000000000000, where a
    float holds 601999999999999995805696)."""
    value = float(text)
    if value.is_integer() and abs(value) > 2 ** 53:
        exact = decimal.Decimal(text)
        if exact == exact.to_integral_value():  # 1e16, not 12345678901234567891.5
            return int(exact)
    return value


def _json_rows(path: str) -> list[dict]:
    """The rows of a JSON-lines file (read line by line), or of a JSON file holding a list of
    rows, exactly as written (see the module docstring); a UTF-8 byte-order mark is skipped; a
    line that is not JSON is an error naming it."""
    import json

    def parsed(text: str, n: int):
        try:
            return json.loads(text, parse_float=_json_number)
        except json.JSONDecodeError as e:
            raise ValueError(f"data file {path} cannot be read as json: line {n + e.lineno - 1}:"
                             f" {e.msg} (JSON parse error; one object per line, or one list of "
                             f"objects)") from e

    try:
        with open(path, encoding="utf-8-sig") as f:
            if f.read(4096).lstrip().startswith("["):  # one JSON list of rows
                f.seek(0)
                rows = parsed(f.read(), 1)
            else:
                f.seek(0)
                rows = [parsed(line.rstrip("\r\n"), n) for n, line in enumerate(f, 1)
                        if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} cannot be read as json: it is not UTF-8 text "
                         f"({e.reason})") from e
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"data file {path}: row {bad} is a {type(rows[bad]).__name__}, not a "
                         f"JSON object")
    return rows


def read_rows(path: str | Path, *, origins: bool = False):
    """The rows of a data file or folder, as dicts, in file order; with ``origins``,
    ``(rows, where)`` where ``where[i]`` is row ``i``'s ``"file:row"`` (its row in its own
    file). Each file is read on its own (files of a folder may differ in columns); a file that
    cannot be read is an error naming it."""
    import datasets
    import pyarrow

    builder, files = data_files(path)
    rows: list[dict] = []
    where: list[str] = []
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a progress bar per tiny file is noise
    try:
        for f in files:
            if builder == "json":
                file_rows = _json_rows(f)
            else:
                try:
                    file_rows = datasets.load_dataset(builder, data_files=[f],
                                                      split="train").to_list()
                except (datasets.exceptions.DatasetsError, pyarrow.lib.ArrowException) as e:
                    raise ValueError(f"data file {f} cannot be read as {builder}: "
                                     f"{e.__cause__ or e}") from e
            rows += file_rows
            where += [f"{Path(f).name}:{j}" for j in range(len(file_rows))]
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return (rows, where) if origins else rows


FROM_ZERO = " (counting from 0)"
"""Said after a row number: "b.jsonl:1" would read as a line, which counts from 1."""


def row_name(path: str | Path, where: str) -> str:
    """A row for messages, from the data path and its ``"file:row"`` (:func:`read_rows`):
    ``data/b.jsonl row 1 (counting from 0)``."""
    name, row = where.rsplit(":", 1)
    path = Path(path)
    return f"{path if path.name == name else path / name} row {row}{FROM_ZERO}"


def convert_rows(rows: list[dict], path: str, *, preset: Optional[str] = None,
                 prompt_key: Optional[str] = None, answer_key: Optional[str] = None,
                 max_bad_fraction: float = 0.5,
                 where: Optional[Sequence[str]] = None) -> tuple[list[dict], LoadReport]:
    """Rows -> examples (see the module docstring) and the report of what was skipped.
    ``where``: each row's ``"file:row"`` (:func:`read_rows`), the examples' ids and what the
    report names; default ``"<path name>:<index>"``."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"data.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if preset is not None and (prompt_key or answer_key):
        raise ValueError(f"data.prompt_key/answer_key cannot be combined with data.preset "
                         f"({preset!r} fixes the columns)")
    convert = PRESETS[preset] if preset else _keyed(prompt_key or "prompt",
                                                    answer_key or "answer", _plain_answer)
    examples, bad, first = [], 0, None
    for i, row in enumerate(rows):
        try:
            ex = convert(row)
        except BadRow as e:
            bad += 1
            first = first or (i, str(e))
            continue
        if isinstance(row.get("reward"), str):
            ex["reward"] = row["reward"]
        examples.append({"id": where[i] if where else f"{Path(path).name}:{i}", "row": i, **ex})
    report = LoadReport(str(path), len(rows), len(examples), bad,
                        None if first is None else first[0], None if first is None else first[1],
                        None if first is None or not where else where[first[0]])
    if not rows or bad > max_bad_fraction * len(rows):
        raise ValueError(f"data {path}: {bad} of {len(rows)} rows do not fit the layout "
                         f"(preset={preset!r}, prompt_key={prompt_key!r}, "
                         f"answer_key={answer_key!r}); first bad: {report.first_bad()}: "
                         f"{report.first_bad_reason}")
    if bad:
        log.warning("%s", report.summary())
    if preset == "verl":
        other = sorted({str(ex.get("data_source")) for ex in examples
                        if ex.get("data_source") not in VERL_SOURCES})
        if other:
            log.warning("%s: rows of data_source %s have no reward of their own: the run's "
                        "accuracy checker scores them", path, other[:5])
    return examples, report


def load_examples(path: str | Path, **kw) -> tuple[list[dict], LoadReport]:
    """Read and convert a dataset (see :func:`convert_rows` for the keywords)."""
    rows, where = read_rows(path, origins=True)
    return convert_rows(rows, str(path), where=where, **kw)
