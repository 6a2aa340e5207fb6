"""Which sets an evaluation scores: the recipe's ``eval:``, a ``--spec`` file, command-line sets, ``--tasks``.

Command-line sets are added to the recipe's (``--replace``: they are the whole spec); a set given on
the command line takes the same keys as in a recipe (``--mcq NAME=PATH,answer_field=answer_index``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from affinage.errors import UserError
from affinage.paths import expand
from affinage.recipe.schema import EvalSpec

KINDS = ("perplexity", "mcq", "generation", "lm_eval")

NO_SPEC = (
    "nothing to evaluate: the recipe has no `eval:` section and no --spec/--ppl/--mcq/--prompts was given. "
    "Add for example\n"
    "eval:\n"
    "  perplexity:\n"
    "    - {name: domain-heldout, path: data/heldout.jsonl}\n"
    "    - {name: general, path: data/general.jsonl, role: forgetting}\n"
    "  mcq:\n"
    "    - {name: quiz, path: data/quiz.jsonl, num_fewshot: 3}\n"
    "  generation: {prompts: ['La Constitution de 1958']}\n"
    "to the recipe (or to a YAML file given with --spec)."
)


def load_spec_file(path: str) -> EvalSpec:
    import yaml

    from affinage.recipe.problems import validate

    p = expand(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise UserError(f"--spec {path}: cannot read ({e.strerror})") from None
    if isinstance(data, dict) and "eval" in data and len(data) == 1:
        data = data["eval"]
    return validate(EvalSpec, data, file=p)


_SET_OPTIONS = {
    "perplexity": ("text_field", "role", "max_records", "group_field"),
    "mcq": ("role", "num_fewshot", "fewshot_path", "template", "max_items", "question_field", "choices_field",
            "answer_field", "group_field"),
}


def _set_from_cli(text: str, kind: str, flag: str, **fixed) -> dict:
    """``NAME=PATH[,key=value...]`` (or a bare path) as an eval set's keys; unknown keys are refused."""
    head, *options = text.split(",")
    name, sep, path = head.partition("=")
    if not sep:
        path, name = head, Path(head).stem
    entry: dict[str, Any] = {"name": name.strip(), "path": path.strip(), **fixed}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in _SET_OPTIONS[kind]:
            raise UserError(f"{flag} {text!r}: {key!r} is not an option of a {kind} set. Write {flag} NAME=PATH[,key=value…] "
                            f"with keys among {', '.join(_SET_OPTIONS[kind])} (a value with a comma: use --spec FILE)")
        entry[key] = int(value) if value.strip().isdigit() else value.replace("\\n", "\n")
    return entry


def adhoc_spec(ppl: Sequence[str] = (), forgetting: Sequence[str] = (), mcq_sets: Sequence[str] = (),
               prompts: Optional[str] = None) -> Optional[EvalSpec]:
    """An :class:`EvalSpec` from command-line sets: ``NAME=PATH`` or a bare path, then ``,key=value`` options.

    ``--mcq culture=qcm.jsonl,answer_field=answer_index,role=forgetting`` sets what a recipe's
    ``eval.mcq`` entry would (``template`` too, with ``\\n`` for a newline).
    """
    from affinage.recipe.problems import validate

    if not (ppl or forgetting or mcq_sets or prompts):
        return None
    data = {
        "perplexity": [_set_from_cli(t, "perplexity", "--ppl") for t in ppl]
        + [_set_from_cli(t, "perplexity", "--forgetting", role="forgetting") for t in forgetting],
        "mcq": [_set_from_cli(t, "mcq", "--mcq") for t in mcq_sets],
        "generation": {"path": prompts} if prompts else None,
    }
    return validate(EvalSpec, data, hint="(from the command line: --ppl, --forgetting, --mcq, --prompts)")


def combine(recipe_spec: Optional[EvalSpec], extra: Optional[EvalSpec], replace: bool = False) -> Optional[EvalSpec]:
    """The recipe's eval sets plus the command line's (``replace``: the command line's alone).

    A command-line set with the name of a recipe set replaces that one, so ``--mcq culture=new.jsonl``
    can point an existing set at another file.
    """
    if extra is None or recipe_spec is None or replace:
        return extra or recipe_spec
    def merged(mine, theirs):
        names = {s.name for s in theirs}
        return [s for s in mine if s.name not in names] + list(theirs)
    return recipe_spec.model_copy(update={
        "perplexity": merged(recipe_spec.perplexity, extra.perplexity),
        "mcq": merged(recipe_spec.mcq, extra.mcq),
        "generation": extra.generation or recipe_spec.generation,
    })


def select(spec: EvalSpec, tasks: Optional[Sequence[str]]) -> EvalSpec:
    """Keep the kinds (perplexity, mcq, generation, lm_eval) or set names listed in ``tasks``."""
    if not tasks:
        return spec
    wanted = {t.strip() for t in tasks if t.strip()}
    names = {s.name for s in spec.perplexity} | {s.name for s in spec.mcq}
    unknown = wanted - set(KINDS) - names
    if unknown:
        raise UserError(
            f"--tasks: unknown {', '.join(sorted(unknown))}. Valid: {', '.join(KINDS)}"
            + (f", or set names {', '.join(sorted(names))}" if names else "")
        )
    return spec.model_copy(update={
        "perplexity": [s for s in spec.perplexity if "perplexity" in wanted or s.name in wanted],
        "mcq": [s for s in spec.mcq if "mcq" in wanted or s.name in wanted],
        "generation": spec.generation if "generation" in wanted else None,
        "lm_eval": spec.lm_eval if "lm_eval" in wanted else None,
    })
