"""The French evaluation pack: benchmark tasks fetched from the Hub once (login node), run offline.

Each task is one YAML file in the shipped ``recipes/_eval/fr/`` folder (``_``: not a recipe, left out of the catalog) (``TaskSpec`` below): the Hub
dataset it comes from (id, config, split, optional revision), how one Hub record becomes an
affinage item (``question``/``choices``/``answer`` for multiple choice, ``context``/``question``/
``answers`` for extractive QA — str.format templates over the record's fields), the prompt
template, and the lm-eval task it mirrors. :func:`stage_eval_pack` (called by ``affinage stage`` on
a machine with network) fetches each task with ``datasets``, converts its records and writes::

    DEST/<task>.jsonl    the items, in affinage's layout (eval.sets / eval.extractive read them)
    DEST/eval.yaml       an ``eval:`` spec naming every staged task (``affinage eval RUN --spec DEST/eval.yaml``)
    DEST/STAGED.json     per task: Hub id, config, split, revision asked, records, sha256 of the .jsonl

so a compute node with no network evaluates from DEST alone. ``raw_dir`` stages from local files
in the Hub's own record layout instead (``<raw_dir>/<task>.jsonl``): the tests, and a site that
copies the datasets by hand.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import yaml
from pydantic import Field

from affinage.data.errors import DataError
from affinage.errors import UserError
from affinage.recipe.schema import Strict

PACK_LANG = "fr"


class HubSource(Strict):
    hub: str = Field(description="dataset id on the Hugging Face Hub, e.g. facebook/belebele")
    config: Optional[str] = Field(None, description="dataset configuration (subset), e.g. fra_Latn")
    split: str = "test"
    revision: Optional[str] = Field(None, description="git revision of the dataset repository (default: its main branch)")


class ChoiceFill(Strict):
    """Choices made by putting each answer field into ``text`` at ``placeholder`` (french_bench grammar/vocab).

    When the placeholder is absent the answer is appended after a space (french_bench reading_comp).
    """

    text: str = Field(description="field holding the sentence with the gap")
    placeholder: str = "<...>"
    fields: list[str] = Field(min_length=2)


class TaskSpec(Strict):
    name: str
    kind: Literal["mcq", "extractive"]
    description: str = ""
    source: HubSource
    lm_eval_task: Optional[str] = Field(None, description="the lm-eval task this one mirrors (prompt and target)")
    process: Optional[Literal["hellaswag", "paws"]] = Field(None, description="record clean-up of the lm-eval task")
    question: str = Field(description="template over the record's fields, e.g. '{premise}'")
    choices: Optional[list[str]] = Field(None, description="mcq: one template per choice (literal text allowed)")
    choices_field: Optional[str] = Field(None, description="mcq: field holding the list of choices")
    choices_fill: Optional[ChoiceFill] = None
    answer_field: Optional[str] = Field(None, description="mcq: field of the right answer (index, letter or text)")
    answer_map: dict[str, int] = Field(default_factory=dict, description="mcq: answer value (as text) -> choice index")
    context: Optional[str] = Field(None, description="extractive: template of the passage")
    answers_field: str = Field("answers", description="extractive: field of the gold answers (SQuAD layout or a list)")
    group: Optional[str] = Field(None, description="template naming the unit an item belongs to (the passage of several questions)")
    template: str = Field("{question}", description="prompt template of the eval set ({question}, and {context} for extractive)")
    max_new_tokens: int = 32


def pack_dir(lang: str = PACK_LANG) -> Path:
    from affinage.resources import resource_dir

    return resource_dir("recipes") / "_eval" / lang


def task_names(lang: str = PACK_LANG) -> list[str]:
    return sorted(p.stem for p in pack_dir(lang).glob("*.yaml"))


def load_task(name: str, lang: str = PACK_LANG) -> TaskSpec:
    from affinage.recipe.problems import validate

    path = pack_dir(lang) / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no task {name!r} in the {lang} evaluation pack. Tasks: {', '.join(task_names(lang))}")
    return validate(TaskSpec, yaml.safe_load(path.read_text(encoding="utf-8")), file=path)


# ------------------------------------------------------------------------------ conversion
def _fmt(template: str, rec: dict, where: str) -> str:
    try:
        return template.format(**rec)
    except KeyError as e:
        raise DataError(f"{where}: the record has no field {e.args[0]!r} (keys: {', '.join(sorted(rec))}); the task's "
                        "templates name fields of the Hub dataset", where=where, reason="no field") from None


def _detokenize(text: str) -> str:
    """lm-eval's ``general_detokenize`` (paws-x/utils.py)."""
    text = text.replace(" n't", "n't").replace(" )", ")").replace("( ", "(").replace('" ', '"').replace(' "', '"')
    return re.sub(r" (['.,])", r"\1", text)


def _hellaswag(text: str) -> str:
    """french_bench's ``preprocess`` of HellaSwag text (WikiHow artefacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _process(task: TaskSpec, rec: dict) -> dict:
    rec = dict(rec)
    if task.process == "hellaswag":
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
        rec["query"] = _hellaswag(rec["activity_label"] + ": " + ctx)
        rec["endings"] = [_hellaswag(e) for e in rec["endings"]]
    elif task.process == "paws":
        s1, s2 = _detokenize(rec["sentence1"]).strip(), _detokenize(rec["sentence2"]).strip()
        rec["sentence1"] = s1[:-1] if s1.endswith((".", ",", ";")) else s1
        rec["sentence2"] = s2[:1].lower() + s2[1:]
    return rec


def convert(task: TaskSpec, record: dict, where: str) -> dict:
    """One Hub record as an affinage item (``question``/``choices``/``answer`` or ``context``/``question``/``answers``)."""
    rec = _process(task, record)
    item: dict = {"question": _fmt(task.question, rec, where).strip()}
    if task.group:
        item["group"] = _fmt(task.group, rec, where)
    if task.kind == "extractive":
        answers = rec.get(task.answers_field)
        item["context"] = _fmt(task.context or "{context}", rec, where)
        item["answers"] = answers.get("text") if isinstance(answers, dict) else answers
        return item
    if task.choices_fill is not None:
        f = task.choices_fill
        text = rec.get(f.text, "")
        choices = [text.replace(f.placeholder, str(rec[k])) if f.placeholder in text else f"{text} {rec[k]}" for k in f.fields]
    elif task.choices_field:
        choices = list(rec.get(task.choices_field) or [])
    else:
        choices = [_fmt(c, rec, where) for c in task.choices or []]
    answer = rec.get(task.answer_field) if task.answer_field else None
    if task.answer_map:
        if str(answer) not in task.answer_map:
            raise DataError(f"{where}: answer {answer!r} is not among {sorted(task.answer_map)} (the task's answer_map)",
                            where=where, reason="bad answer")
        answer = task.answer_map[str(answer)]
    item.update(choices=choices, answer=answer)
    return item


# ---------------------------------------------------------------------------------- staging
def _hub_records(task: TaskSpec) -> Iterable[dict]:
    import datasets

    s = task.source
    return datasets.load_dataset(s.hub, s.config, split=s.split, revision=s.revision)


def _local_records(raw_dir: Path, task: TaskSpec) -> Iterable[dict]:
    path = raw_dir / f"{task.name}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no raw file for task {task.name!r} (records of {task.source.hub} as JSON lines)")
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def stage_eval_pack(dest, *, tasks: Optional[Sequence[str]] = None, raw_dir=None, limit: Optional[int] = None,
                    lang: str = PACK_LANG, records: Optional[Callable[[TaskSpec], Iterable[dict]]] = None) -> Path:
    """Fetch, convert and write the pack's tasks under ``dest``; returns the ``eval.yaml`` written there.

    For ``affinage stage`` on a login node (network): each task's Hub dataset is read with
    ``datasets.load_dataset`` (its own cache applies). ``raw_dir``: read ``<raw_dir>/<task>.jsonl``
    instead (no network). ``limit``: the first N records of each task. Every record is converted and
    checked by the same readers eval uses, so a staged pack that loads here runs on the compute node.
    """
    from affinage.eval.extractive import read_qa
    from affinage.eval.sets import read_mcq
    from affinage.hashing import sha256_file

    dest = Path(dest).expanduser().absolute()
    dest.mkdir(parents=True, exist_ok=True)
    names = list(tasks) if tasks else task_names(lang)
    fetch = records or ((lambda t: _local_records(Path(raw_dir), t)) if raw_dir else _hub_records)
    spec: dict = {"mcq": [], "extractive": []}
    staged: dict = {}
    for name in names:
        task = load_task(name, lang)
        out = dest / f"{task.name}.jsonl"
        n = 0
        with open(out, "w", encoding="utf-8") as fh:
            for i, rec in enumerate(fetch(task)):
                if limit and n >= limit:
                    break
                fh.write(json.dumps(convert(task, dict(rec), f"{task.source.hub}[{i}]"), ensure_ascii=False) + "\n")
                n += 1
        group = {"group_field": "group"} if task.group else {}
        if task.kind == "mcq":
            read_mcq(str(out), **group)  # the check eval will make, now, where it can be fixed
            spec["mcq"].append({"name": task.name, "path": str(out), "template": task.template, **group})
        else:
            read_qa(str(out), **group)
            spec["extractive"].append({"name": task.name, "path": str(out), "template": task.template,
                                       "max_new_tokens": task.max_new_tokens, **group})
        staged[task.name] = {"kind": task.kind, **task.source.model_dump(), "lm_eval_task": task.lm_eval_task,
                             "records": n, "file": out.name, "sha256": sha256_file(out)}
    (dest / "STAGED.json").write_text(json.dumps({"staged": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lang": lang,
                                                  "tasks": staged}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    spec = {k: v for k, v in spec.items() if v}
    path = dest / "eval.yaml"
    path.write_text("# written by affinage stage (eval pack); evaluate with: affinage eval RUN --spec "
                    f"{path}\n" + yaml.safe_dump({"eval": spec}, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path
