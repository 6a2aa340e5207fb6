#!/usr/bin/env python
"""Fault campaign: every bad input and every fault must get a clear answer (issue 10).

Parts, each printed as a table, then the totals the issue asks to be zero:

1. **Bad inputs** (about 100 rows): recipes (hostile YAML, out-of-range keys, impossible combinations),
   data files, chat records, command-line arguments, model folders, run directories. Each runs as a
   subprocess of the real ``affinage`` command (forked from a parent that imported the libraries once,
   so a row costs a fraction of a second) and is classified **clear** (exit != 0, one ``affinage:`` or
   usage error line, the expected words, no traceback), **traceback**, **hang** (past the timeout),
   **silent** (exit 0) or **vague** (refused, but without the words that say why).
2. **Kills**: ``affinage train`` SIGKILLed at random moments, half of them while a checkpoint is being
   written, then rerun until complete; final weights must be bitwise equal to an uninterrupted run and
   ``metrics.jsonl`` one line per step (else: *lost run*, *weight mismatch*, *metrics duplicate*).
3. **Full disk** on a small tmpfs (root only): during a checkpoint write and during a cache write.
4. **Corruption**: bytes flipped, files truncated, ``trainer_state.json`` broken in the newest
   checkpoint; token ids, loss masks and row boundaries damaged in the data cache.
5. **Concurrency**: two ``train`` on one run directory, two ``prepare`` of one cache, a killed
   ``prepare``'s temporary folder.

    python bench/faults.py                 # everything (about 15 minutes on 2 CPU cores)
    python bench/faults.py --quick         # the bad-input table and 2 kills (tests/bench/test_faults_quick.py)
    python bench/faults.py --kills 40 --json faults.json

Exit status 0 only when every total is zero.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
STEPS = 24  # optimizer steps of every training run (12 with --quick); a checkpoint every 4


def train_sets() -> list[str]:
    return ["--set", f"training.duration={STEPS} steps", "--set", "training.save_every=4", "--set", "training.logging_steps=1",
            "--set", "training.report_to=[none]", "--set", "data.num_proc=1"]


# ============================================================================ running a command
@dataclass
class Outcome:
    rc: Optional[int]
    out: str
    err: str
    seconds: float
    hung: bool = False


def setup_env() -> None:
    """What every command of the campaign runs with (inherited by the forked children): offline, one thread."""
    os.environ.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def preload() -> None:
    """Import what the commands import, once, so that forked rows start in milliseconds."""
    import affinage.cli  # noqa: F401
    import affinage.data.prepare  # noqa: F401
    import affinage.eval.runner  # noqa: F401
    import affinage.model.load  # noqa: F401
    import affinage.plan  # noqa: F401
    import affinage.train.trainer  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401


class Forked:
    """``affinage ARGV`` in a forked child of this (pre-imported) process, as the console script runs it.

    A real process (its own pid and process group, killable with SIGKILL) that starts in milliseconds
    because the libraries are already imported.
    """

    def __init__(self, argv: list[str], cwd: Path, env: Optional[dict] = None):
        self.out_f = tempfile.TemporaryFile()
        self.err_f = tempfile.TemporaryFile()
        self.t0 = time.perf_counter()
        self.rc: Optional[int] = None
        pid = os.fork()
        if pid == 0:  # child: behave like `python -m affinage.cli ARGV`
            code = 1
            try:
                os.setpgid(0, 0)
                os.chdir(cwd)
                os.environ.update(env or {})
                os.dup2(self.out_f.fileno(), 1)
                os.dup2(self.err_f.fileno(), 2)
                # sys.stdout/stderr may be a test runner's in-memory capture: write to the real fds
                sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
                sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
                sys.argv = ["affinage", *argv]
                from affinage.cli import main

                try:
                    code = main(argv)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        self.pid = pid

    def poll(self) -> Optional[int]:
        if self.rc is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.rc = os.waitstatus_to_exitcode(status)
        return self.rc

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 600) -> Outcome:
        hung = False
        while self.poll() is None:
            if time.perf_counter() - self.t0 > timeout:
                hung = True
                self.kill()
                self.rc = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                break
            time.sleep(0.01)
        self.kill()  # anything the command left running in its group (tokenization workers)
        self.out_f.seek(0)
        self.err_f.seek(0)
        return Outcome(self.rc, self.out_f.read().decode("utf-8", "replace"), self.err_f.read().decode("utf-8", "replace"),
                       time.perf_counter() - self.t0, hung)


def run_forked(argv: list[str], cwd: Path, timeout: float, env: Optional[dict] = None) -> Outcome:
    return Forked(argv, cwd, env).wait(timeout)


# ============================================================================ the bad-input table
@dataclass
class Case:
    group: str
    name: str
    argv: list[str]
    expect: str  # words the error must contain (case-insensitive)
    result: str = ""
    rc: Optional[int] = None
    seconds: float = 0.0
    message: str = ""


def classify(o: Outcome, expect: str) -> str:
    text = o.err + o.out
    if o.hung:
        return "hang"
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if o.rc == 0:
        return "silent"
    if expect.lower() not in text.lower() or not ("affinage: error:" in o.err or "error: argument" in o.err):
        return "vague"
    return "clear"


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))


def _chat(n: int = 4) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i} : quelle est la capitale de la France ?"},
                          {"role": "assistant", "content": f"Réponse {i} : Paris, sur la Seine."}]} for i in range(n)]


def build_cases(w: Path) -> list[Case]:
    """About 100 bad inputs, written under ``w``; each row names what its error must say."""
    cpt = str(DEMO / "full" / "cpt.yaml")
    good_model = w / "models" / "good"
    cases: list[Case] = []

    def add(group, name, argv, expect):
        cases.append(Case(group, name, [str(a) for a in argv], expect))

    # ---- recipes: hostile or broken YAML files
    y = w / "recipes"
    laughs = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    files = {
        "billion laughs": ("\n".join(laughs) + "\n", "expand to more than"),
        "deep flow nesting": ("name: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than"),
        "deep block nesting": ("".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "v: 1\n", "nested more than"),
        "alias loop": ("a: &x\n  - 1\n  - *x\n", "refers to the mapping or list that contains it"),
        "huge file": ("# " + "x" * (2 << 20) + "\nname: t\n", "a recipe is at most"),
        "empty file": ("", "the file is empty"),
        "top level list": ("- name: t\n- task: sft\n", "top level must be a mapping"),
        "unclosed bracket": ("name: t\ntraining: [1, 2\n", "YAML syntax error"),
        "tab indentation": ("name: t\ntraining:\n\tglobal_batch_size: 8\n", "YAML syntax error"),
        "duplicate key": ("name: a\nname: b\n", "duplicate key"),
        "missing sections": ("name: t\ntask: sft\n", "missing required key"),
        "typo in key": (f"base: {cpt}\ntrainig: {{global_batch_size: 8}}\n", "Did you mean 'training'"),
        "missing base": ("base: nowhere.yaml\nname: t\n", "not found"),
        "wrong type": (f"base: {cpt}\ntraining: {{global_batch_size: lots}}\n", "expected a whole number"),
        "task unknown": (f"base: {cpt}\ntask: pretrain\n", "Valid choices"),
    }
    for name, (text, expect) in files.items():
        add("recipe file", name, ["plan", _write(y / f"{name.replace(' ', '_')}.yaml", text)], expect)
    add("recipe file", "not UTF-8", ["plan", _write(y / "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))], "cannot read the file")
    _write(y / "cyc_a.yaml", "base: cyc_b.yaml\nname: a\n")
    add("recipe file", "base cycle", ["plan", _write(y / "cyc_b.yaml", "base: cyc_a.yaml\nname: b\n")], "form a cycle")
    add("recipe file", "recipe is a folder", ["plan", y], "is a folder")
    add("recipe file", "recipe missing", ["plan", y / "absent.yaml"], "not found")

    # ---- recipes: out-of-range values and impossible combinations (--set on the demo recipe)
    sets = [
        ("seed=-1", "seed must be in"), (f"seed={2**40}", "seed must be in"),
        ("training.save_every=0", "save_every must be >= 1"), ("training.save_every=-3", "save_every must be >= 1"),
        ("training.max_grad_norm=-1", "max_grad_norm must be >= 0"), ("training.warmup_steps=-5", "warmup_steps must be >= 0"),
        ("training.weight_decay=.nan", "finite number"), ("training.learning_rate=0", "learning_rate must be in"),
        ("training.learning_rate=5", "learning_rate must be in"), ("training.global_batch_size=0", "positive integer"),
        ("training.micro_batch_size=3", "not a multiple"), ("training.duration=0 steps", "must be positive"),
        ("training.duration=10", "has no unit"), ("training.duration=999999999999 steps", "beyond any run"),
        ("training.duration=2.5 steps", "whole number"), ("training.keep_checkpoints=0", "positive integer"),
        ("training.eval_every=0", "eval_every must be >= 1"), ("training.logging_steps=0", "positive integer"),
        ("training.adam_beta2=1", "adam_beta2 must be in"), ("training.optimizer=adam", "Valid choices"),
        ("training.report_to=[nope]", "invalid value 'nope'"), ("data.max_length=4", "at least 8"),
        ("data.max_length=100000000", "max_length must be <="), ("data.heldout_fraction=1.5", "heldout_fraction must be in"),
        ("data.sources.0.weight=-1", "weight must be > 0"), ("data.sources.0.weight=.inf", "finite number"),
        ("data.sources.5.weight=2", "index 5 is out of range"), ("data.num_proc=0", "positive integer"),
        ("data.filters.min_chars=-1", "min_chars must be >= 0"), ("data.filters.near_dedup_threshold=2", "must be in (0, 1)"),
        ("output.dir=runs/{nmae}", "unknown placeholder {nmae}"), ("output.dir=runs/{}", "unknown placeholder {}"),
        ("output.dir=runs/{name", "literal braces"), ("method.kind=qlora", "qlora with model.init: random"),
        ("method.lora.r=8", "method.lora is set with method.kind: full"), ("task=sft", "format: text with task: sft"),
        ("distributed.strategy=ring", "Valid choices"), ("training.learning_rat=1e-3", "Did you mean 'learning_rate'"),
        ("training.learning_rate", "expected --set path.to.key=value"), ("eval.seed=-2", "seed must be in"),
        ("training.global_batch_size=[1, &a [2]]", "expected a whole number"),
    ]
    for s, expect in sets:
        add("recipe value", s, ["plan", cpt, "--set", s], expect)
    add("recipe value", "alias bomb in --set", ["plan", cpt, "--set", "training.report_to=[" + ", ".join(
        ["&a [x, x, x, x, x, x, x, x, x, x]"] + [f"&{c} [" + ", ".join([f"*{p}"] * 10) + "]" for p, c in zip("abcd", "bcde")]) + "]"],
        "expand to more than")
    add("plan", "tokens per step beyond any run", ["plan", cpt, "--set", "data.max_length=1000000", "--set",
                                                    "training.global_batch_size=1024", "--set", "training.micro_batch_size=1"],
        "tokens per optimizer step")
    add("plan", "memory beyond the GPU", ["plan", cpt, "--set", "data.max_length=100000", "--gpu", "v100-16"], "will not fit")
    add("plan", "world size that does not divide", ["plan", cpt, "--world-size", "3"], "cannot be split over 3 processes")

    # ---- command-line arguments and run directories
    a_file = _write(w / "cli" / "notes.txt", "my notes")
    foreign = w / "cli" / "foreign"
    _write(foreign / "thesis.tex", "years of work")
    (foreign / "checkpoints" / "checkpoint-5").mkdir(parents=True, exist_ok=True)
    other = w / "cli" / "other-run"
    _write(other / "recipe.yaml", "name: someone-else\n")
    (other / "checkpoints").mkdir(parents=True, exist_ok=True)
    local_run = w / "cli" / "local-run"
    _write(local_run / "recipe.yaml", "name: demo-cpt\n")
    cli_rows = [
        ("plan --world-size 0", ["plan", cpt, "--world-size", "0"], "must be at least 1"),
        ("plan --world-size -1", ["plan", cpt, "--world-size", "-1"], "must be at least 1"),
        ("plan --world-size two", ["plan", cpt, "--world-size", "two"], "expected a whole number"),
        ("plan --gpu unknown", ["plan", cpt, "--gpu", "tpu"], "invalid choice"),
        ("smoke --steps 0", ["smoke", cpt, "--steps", "0"], "must be at least 1"),
        ("train --nproc 0", ["train", cpt, "--nproc", "0"], "must be at least 1"),
        ("train --run-dir is a file", ["train", cpt, "--run-dir", a_file], "is an existing file"),
        ("prepare --run-dir is a file", ["prepare", cpt, "--run-dir", a_file], "is an existing file"),
        ("smoke --run-dir is a file", ["smoke", cpt, "--run-dir", a_file], "is an existing file"),
        ("train into a foreign folder", ["train", cpt, "--run-dir", foreign], "affinage did not write"),
        ("train --fresh into a foreign folder", ["train", cpt, "--run-dir", foreign, "--fresh"], "affinage did not write"),
        ("train --fresh into another recipe's run", ["train", cpt, "--run-dir", other, "--fresh"], "a run of recipe 'someone-else'"),
        ("eval --limit -5", ["eval", local_run, "--limit", "-5"], "must be at least 1"),
        ("eval --batch-size 0", ["eval", local_run, "--batch-size", "0"], "must be at least 1"),
        ("eval of a missing folder", ["eval", w / "cli" / "no-such-run"], "no such run directory"),
        ("eval of a missing run, relative", ["eval", "runs/no-such-run"], "no such run directory"),
        ("status of a missing folder", ["status", w / "cli" / "no-such-run"], "does not exist"),
        ("status of a folder that is not a run", ["status", w / "cli"], "not an affinage run directory"),
        ("status of a run never submitted", ["status", local_run], "not submitted"),
        ("status of a file", ["status", a_file], "is a file"),
        ("merge of a folder that is not a run", ["merge", w / "cli"], ""),
        ("card of a missing folder", ["card", w / "cli" / "no-such-run"], ""),
        ("unknown command", ["trian", cpt], "invalid choice"),
    ]
    for name, argv, expect in cli_rows:
        add("cli", name, argv, expect)

    # ---- data files (prepare of the CPT demo with one source replaced)
    d = w / "data"
    txt_empty = d / "txt-empty"
    txt_empty.mkdir(parents=True, exist_ok=True)
    data_rows = [
        ("source missing", d / "absent.jsonl", "not found"),
        ("empty file", _write(d / "empty.jsonl", ""), "no usable record"),
        ("bad JSON line", _jsonl(d / "badjson.jsonl", [{"text": "Bonjour tout le monde."}, '{"text": "coupé']), "badjson.jsonl:2"),
        ("binary garbage", _write(d / "garbage.jsonl", os.urandom(4096)), "garbage.jsonl"),
        ("not UTF-8", _write(d / "latin1.jsonl", '{"text": "caf\xe9 cr\xe8me"}\n'.encode("latin-1")), "UTF-8"),
        ("text field missing", _jsonl(d / "nofield.jsonl", [{"body": "Un texte."}]), "'text'"),
        ("text is a number", _jsonl(d / "number.jsonl", [{"text": 42}]), "expected a string"),
        ("empty text", _jsonl(d / "emptytext.jsonl", [{"text": ""}]), "is empty"),
        ("line is a list", _jsonl(d / "list.jsonl", [["a", "b"]]), "list.jsonl:1"),
        ("garbage parquet", _write(d / "garbage.parquet", b"PAR1" + os.urandom(2000)), "garbage.parquet"),
        ("empty txt folder", txt_empty, "no .txt files"),
        ("json file holding a number", _write(d / "num.json", "42"), "num.json"),
        ("only blank lines", _write(d / "blank.jsonl", "\n\n  \n"), "no usable record"),
        ("chat data for cpt", _jsonl(d / "chat-for-cpt.jsonl", _chat()), "text"),
    ]
    for name, path, expect in data_rows:
        add("data file", name, ["prepare", cpt, "--set", f"data.sources.0.path={path}", "--set", "data.num_proc=1",
                                "--run-dir", w / "prep-run"], expect)

    # ---- chat records (prepare of a small SFT recipe)
    sft = _write(w / "recipes" / "sft.yaml", textwrap.dedent(f"""\
        name: faults-sft
        task: sft
        model: {{name_or_path: {DEMO / 'model'}, init: random, dtype: float32}}
        method: {{kind: full}}
        data: {{sources: [{{path: {d / 'chat-ok.jsonl'}, format: chat}}], max_length: 128, num_proc: 1}}
        training: {{global_batch_size: 2, micro_batch_size: 1, duration: 2 steps}}
        output:
          dir: {w / 'runs' / '{name}'}
        """))
    _jsonl(d / "chat-ok.jsonl", _chat())
    u = {"role": "user", "content": "Bonjour ?"}
    a = {"role": "assistant", "content": "Bonjour !"}
    chat_rows = [
        ("ends on a user turn", [{"messages": [u, a, u]}], "ends on a user turn"),
        ("bad role", [{"messages": [u, {"role": "bot", "content": "x"}]}], "role 'bot'"),
        ("messages not a list", [{"messages": "bonjour"}], "non-empty list"),
        ("empty messages", [{"messages": []}], "non-empty list"),
        ("content not a string", [{"messages": [u, {"role": "assistant", "content": 3}]}], "content"),
        ("system not first", [{"messages": [u, {"role": "system", "content": "x"}, a]}], "system message is only allowed first"),
        ("ShareGPT keys", [{"messages": [{"from": "human", "value": "x"}]}], "ShareGPT"),
        ("no assistant turn", [{"messages": [u]}], "no assistant turn"),
        ("empty assistant reply", [{"messages": [u, {"role": "assistant", "content": "  "}]}], "empty assistant reply"),
        ("starts with assistant", [{"messages": [a, u, a]}], "must start with a user turn"),
        ("message not an object", [{"messages": [u, "Bonjour !"]}], "expected an object"),
    ]
    for name, rows, expect in chat_rows:
        path = _jsonl(d / f"chat-{name.replace(' ', '-')}.jsonl", rows)
        add("chat record", name, ["prepare", sft, "--set", f"data.sources.0.path={path}", "--run-dir", w / "prep-run"], expect)
    for name, rows, expect in [("alpaca without output", [{"instruction": "Dis bonjour."}], "without 'output'"),
                               ("alpaca empty instruction", [{"instruction": "", "output": "Bonjour"}], "non-empty string")]:
        path = _jsonl(d / f"{name.replace(' ', '-')}.jsonl", rows)
        add("chat record", name, ["prepare", sft, "--set", f"data.sources.0.path={path}", "--set",
                                  "data.sources.0.format=alpaca", "--run-dir", w / "prep-run"], expect)

    # ---- model folders (a real tiny model, then broken copies)
    from affinage.model.tiny import save_tiny_model_folder

    save_tiny_model_folder(good_model, "llama", seed=0)
    ppl = _jsonl(d / "ppl.jsonl", [{"text": "La Seine traverse Paris."}] * 3)
    broken: list[tuple[str, Callable[[Path], None], str, str]] = []

    def cfg(**changes):
        def edit(f: Path):
            c = json.loads((f / "config.json").read_text())
            for k, v in changes.items():
                if v is None:
                    c.pop(k, None)
                else:
                    c[k] = v
            (f / "config.json").write_text(json.dumps(c))
        return edit

    def weights(fn):
        def edit(f: Path):
            p = f / "model.safetensors"
            p.write_bytes(fn(p.read_bytes()))
        return edit

    broken += [
        ("config.json not JSON", lambda f: (f / "config.json").write_text('{"model_type": "llama",,}'), "plan", "not valid JSON"),
        ("config.json garbage bytes", lambda f: (f / "config.json").write_bytes(os.urandom(300)), "plan", "config.json"),
        ("no model_type", cfg(model_type=None), "plan", "no model_type"),
        ("unknown model_type", cfg(model_type="lama"), "plan", "unknown model_type"),
        ("negative dimension", cfg(hidden_size=-64), "plan", "hidden_size is -64"),
        ("zero layers", cfg(num_hidden_layers=0), "plan", "num_hidden_layers is 0"),
        ("no config.json", lambda f: (f / "config.json").unlink(), "plan", "config.json"),
        ("no weights file", lambda f: (f / "model.safetensors").unlink(), "eval", "no weights file"),
        ("truncated safetensors", weights(lambda b: b[: len(b) // 2]), "eval", "truncated"),
        ("garbage safetensors", weights(lambda b: os.urandom(len(b))), "eval", "model.safetensors"),
        ("empty safetensors", weights(lambda b: b""), "eval", "too short"),
        ("zeroed safetensors header", weights(lambda b: b[:8] + b"\0" * (len(b) - 8)), "eval", "model.safetensors"),
        ("missing shard", lambda f: (f / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})), "eval", "missing"),
        ("vocab smaller than tokenizer", cfg(vocab_size=100), "train", "smaller than the tokenizer"),
        ("tokenizer.json garbage", lambda f: (f / "tokenizer.json").write_bytes(os.urandom(500)), "plan-sft", "tokenizer.json"),
        ("tokenizer.json truncated", lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text()[:300]),
         "plan-sft", "tokenizer.json"),
        ("tokenizer.json not a tokenizer", lambda f: (f / "tokenizer.json").write_text('{"version": "1.0"}'), "plan-sft",
         "tokenizer files cannot be loaded"),
        ("tokenizer_config.json broken", lambda f: (f / "tokenizer_config.json").write_text("{"), "plan-sft", "tokenizer_config.json"),
    ]
    for name, damage, how, expect in broken:
        folder = w / "models" / name.replace(" ", "-").replace(".", "")
        shutil.copytree(good_model, folder)
        damage(folder)
        if how == "plan":
            argv = ["plan", cpt, "--set", f"model.name_or_path={folder}"]
        elif how == "plan-sft":
            argv = ["prepare", sft, "--set", f"model.name_or_path={folder}", "--run-dir", w / "prep-run"]
        elif how == "train":
            argv = ["train", sft, "--set", f"model.name_or_path={folder}", "--set", "model.init=pretrained",
                    "--run-dir", w / "runs" / f"vocab-{len(cases)}"]
        else:
            argv = ["eval", folder, "--ppl", f"x={ppl}", "--no-base", "--device", "cpu", "--out", w / "eval-out"]
        add("model folder", name, argv, expect)
    add("model folder", "model folder is a file", ["plan", cpt, "--set", f"model.name_or_path={a_file}"], "is a file")
    add("model folder", "model id not staged", ["plan", cpt, "--set", "model.name_or_path=someorg/absent-model"], "hf download")
    return cases


def run_table(w: Path, timeout: float = 60.0, say=print) -> list[Case]:
    cases = build_cases(w)
    env = {"AFFINAGE_CACHE": str(w / "cache-table")}
    for c in cases:
        o = run_forked(c.argv, cwd=w, timeout=timeout, env=env)
        c.result, c.rc, c.seconds = classify(o, c.expect), o.rc, round(o.seconds, 2)
        lines = [l for l in (o.err or o.out).strip().splitlines() if l.strip()]
        c.message = (next((l for l in lines if "error" in l), lines[-1] if lines else ""))[:160]
        if c.result != "clear":
            say(f"  [{c.result}] {c.group}: {c.name}\n{textwrap.indent((o.err + o.out)[-1500:], '      ')}")
    return cases


# ============================================================================ training runs
def _tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    import numpy as np

    x, y = _tensors(a), _tensors(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["step"] for r in rows if "loss" in r]


def train_proc(run: Path, w: Path, extra: Optional[list[str]] = None, env: Optional[dict] = None) -> Forked:
    args = ["train", str(DEMO / "full" / "cpt.yaml"), *train_sets(), "--run-dir", str(run), *(extra or [])]
    return Forked(args, w, {"AFFINAGE_CACHE": str(w / "cache"), **(env or {})})


def train_to_end(run: Path, w: Path, timeout: float = 600, extra=None, env=None) -> Outcome:
    return train_proc(run, w, extra, env).wait(timeout)


def _writing(run: Path) -> bool:
    """A checkpoint folder exists without its COMPLETE marker: the Trainer is writing it."""
    ck = run / "checkpoints"
    try:
        return any(p.name.startswith("checkpoint-") and not (p / "COMPLETE").exists() for p in ck.iterdir())
    except OSError:
        return False


def _complete_steps(run: Path) -> list[int]:
    ck = run / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in ck.iterdir()
                  if p.name.startswith("checkpoint-") and (p / "COMPLETE").exists())


def kill_during(run: Path, w: Path, mode: str, rng: random.Random, limit: float = 300) -> dict:
    """Start training and SIGKILL it: at a random moment after training starts, or while a checkpoint is written."""
    p = train_proc(run, w)
    t0 = time.perf_counter()
    start_steps = _complete_steps(run)
    delay = rng.uniform(0.5, 8.0)
    started = None
    killed, during_write = False, False
    while p.poll() is None and time.perf_counter() - t0 < limit:
        metrics = run / "metrics.jsonl"
        if started is None and (metrics.exists() and metrics.stat().st_size > 0 or _writing(run)):
            started = time.perf_counter()
        if mode == "checkpoint-write" and _writing(run):
            during_write = True
            p.kill()
            killed = True
            break
        if mode == "random" and started is not None and time.perf_counter() - started > delay:
            during_write = _writing(run)
            p.kill()
            killed = True
            break
        time.sleep(0.002)
    o = p.wait()
    return {"mode": mode, "killed": killed, "during_checkpoint_write": during_write, "exit": o.rc,
            "complete_before": start_steps, "complete_after": _complete_steps(run)}


def reference_run(w: Path) -> Path:
    ref = w / "runs" / "reference"
    o = train_to_end(ref, w)
    print(f"reference run: {o.seconds:.1f} s")
    if o.rc != 0:
        raise SystemExit(f"the uninterrupted reference run failed:\n{o.err[-3000:]}")
    return ref


def run_kills(w: Path, ref: Path, kills: int, seed: int, say=print) -> dict:
    rng = random.Random(seed)
    runs: list[dict] = []
    done = 0
    i = 0
    while done < kills:
        run = w / "runs" / f"killed-{i}"
        per_run = min(kills - done, rng.choice([1, 2, 2, 3]))
        events = []
        for attempt in range(3):
            events = []
            for k in range(per_run):
                mode = "checkpoint-write" if (done + k) % 2 == 1 else "random"
                events.append(kill_during(run, w, mode, rng))
            if all(e["killed"] for e in events):
                break
            # A checkpoint write lasts milliseconds: on a loaded machine this poller can miss every one and
            # the run ends unkilled. That run proves nothing about a kill: start it again from scratch.
            say(f"  run {run.name}: a kill missed its moment (the run ended first); again from scratch")
            shutil.rmtree(run, ignore_errors=True)
        done += per_run
        o = train_to_end(run, w)
        final = run / "final"
        entry = {"run": run.name, "kills": events, "rerun_exit": o.rc,
                 "lost": o.rc != 0 or not (final / "model.safetensors").exists(),
                 "resumed": "resuming from" in o.out, "corrupt_reported": "is corrupt" in o.out}
        entry["mismatch"] = (not entry["lost"]) and not same_weights(ref / "final", final)
        steps = metric_steps(run)
        entry["metrics_duplicates"] = len(steps) - len(set(steps))
        if entry["lost"]:
            entry["stderr"] = o.err[-2000:]
        runs.append(entry)
        say(f"  run {run.name}: {len(events)} kill(s) "
            f"({', '.join(e['mode'] + ('*' if e['during_checkpoint_write'] else '') for e in events)}), "
            f"rerun exit {o.rc}, {'LOST' if entry['lost'] else ('MISMATCH' if entry['mismatch'] else 'equal')}, "
            f"{entry['metrics_duplicates']} duplicate metric lines")
        shutil.rmtree(run, ignore_errors=True)
        i += 1
    flat = [e for r in runs for e in r["kills"] if e["killed"]]
    return {"runs": runs, "kills": len(flat), "during_checkpoint_write": sum(e["during_checkpoint_write"] for e in flat),
            "lost": sum(r["lost"] for r in runs), "mismatch": sum(r["mismatch"] for r in runs),
            "metrics_duplicates": sum(r["metrics_duplicates"] for r in runs)}


# ============================================================================ scenario rows
@dataclass
class Scenario:
    group: str
    name: str
    result: str = ""  # clear (handled as it must be) / traceback / hang / silent / lost / mismatch / skipped
    detail: str = ""


def _judge(o: Outcome, must_fail: bool, expect: str = "") -> str:
    text = o.err + o.out
    if o.hung:
        return "hang"
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if must_fail and o.rc == 0:
        return "silent"
    if not must_fail and o.rc != 0:
        return "lost"
    if expect and expect.lower() not in text.lower():
        return "vague"
    return "clear"


def _killed_at(w: Path, name: str, step: int) -> Path:
    """A run SIGKILLed right after checkpoint-``step`` became complete."""
    run = w / "runs" / name
    p = train_proc(run, w)
    while p.poll() is None:
        if step in _complete_steps(run):
            p.kill()
            break
        time.sleep(0.005)
    p.wait()
    return run


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def run_corruption(w: Path, ref: Path) -> list[Scenario]:
    base = _killed_at(w, "corrupt-base", 8)
    rows = []
    cases: list[tuple[str, Callable[[Path], None]]] = [
        ("flipped bytes in model.safetensors", lambda c: _flip(c / "model.safetensors", 3000)),
        ("flipped bytes in optimizer.pt", lambda c: _flip(c / "optimizer.pt", 5000)),
        ("truncated model.safetensors", lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000])),
        ("trainer_state.json not JSON", lambda c: (c / "trainer_state.json").write_text("{broken")),
        ("wrong step in trainer_state.json", lambda c: (c / "trainer_state.json").write_text(
            (c / "trainer_state.json").read_text().replace('"global_step": 8', '"global_step": 7'))),
        ("rng state file missing", lambda c: next(c.glob("rng_state*")).unlink()),
    ]
    for name, damage in cases:
        run = w / "runs" / "corrupt-case"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        damage(run / "checkpoints" / "checkpoint-8")
        o = train_to_end(run, w)
        r = _judge(o, must_fail=False, expect="checkpoint-8 is corrupt")
        if r == "clear" and not same_weights(ref / "final", run / "final"):
            r = "mismatch"
        if r == "clear" and "resuming from" not in o.out:
            r = "vague"
        steps = metric_steps(run)
        if r == "clear" and len(steps) != len(set(steps)):
            r = "metrics duplicate"
        rows.append(Scenario("corruption", f"checkpoint: {name}", r, "said so, fell back to checkpoint-4, final weights equal"))
    shutil.rmtree(run, ignore_errors=True)

    # the data cache: damage, prepare refuses and removes it, prepare again rebuilds the same arrays
    import numpy as np

    cache = w / "cache-corrupt"
    env = {"AFFINAGE_CACHE": str(cache)}
    prep = ["prepare", str(DEMO / "full" / "cpt.yaml"), "--set", "data.num_proc=1", "--run-dir", str(w / "prep-run")]
    o = run_forked(prep, w, 300, env)
    folder = next(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    original = {n: np.load(folder / "train" / f"{n}.npy").copy() for n in ("input_ids", "loss_mask", "seq_offsets", "row_seq")}

    def zero(path: Path):
        b = bytearray(path.read_bytes())
        b[-64:] = b"\0" * 64
        path.write_bytes(bytes(b))

    for name, file, damage in [("flipped token ids", "input_ids", lambda p: _flip(p, -5)),
                               ("zeroed loss masks", "loss_mask", zero),
                               ("flipped row boundaries", "seq_offsets", lambda p: _flip(p, -9)),
                               ("truncated row index", "row_seq", lambda p: p.write_bytes(p.read_bytes()[:-8]))]:
        damage(folder / "train" / f"{file}.npy")
        first = run_forked(prep, w, 300, env)
        r = _judge(first, must_fail=True, expect="is corrupt")
        second = run_forked(prep, w, 300, env)
        if r == "clear":
            r = _judge(second, must_fail=False)
        if r == "clear":
            rebuilt = {n: np.load(folder / "train" / f"{n}.npy") for n in original}
            r = "clear" if all(np.array_equal(original[n], rebuilt[n]) for n in original) else "mismatch"
        rows.append(Scenario("corruption", f"data cache: {name}", r, "refused and removed; the rerun rebuilt the same arrays"))
    return rows


def _mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def run_disk_full(w: Path, ref: Path) -> list[Scenario]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return [Scenario("full disk", "checkpoint write", "skipped", "needs root to mount a tmpfs"),
                Scenario("full disk", "cache write", "skipped", "needs root to mount a tmpfs")]
    rows = []
    mnt = w / "tmpfs-run"
    if not _mount(mnt, "30m"):  # two 12 MiB checkpoints fit, the third does not
        return [Scenario("full disk", "checkpoint write", "skipped", "mount -t tmpfs failed")]
    try:
        run = mnt / "run"
        o = train_to_end(run, w)
        r = _judge(o, must_fail=True, expect="no space left")
        kept = _complete_steps(run)
        if r == "clear":
            subprocess.run(["mount", "-o", "remount,size=200m", str(mnt)], check=True)
            again = train_to_end(run, w)
            r = _judge(again, must_fail=False, expect="resuming from")
            if r == "clear" and not same_weights(ref / "final", run / "final"):
                r = "mismatch"
        rows.append(Scenario("full disk", "checkpoint write on a 30 MiB tmpfs", r,
                             f"clear error; complete checkpoints kept {kept}; after freeing space the rerun resumed, equal weights"
                             if r == "clear" else (o.err + o.out)[-600:]))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    cmnt = w / "tmpfs-cache"
    if _mount(cmnt, "128k"):  # the demo's cache is about 260 KiB
        try:
            env = {"AFFINAGE_CACHE": str(cmnt)}
            prep = ["prepare", str(DEMO / "full" / "cpt.yaml"), "--set", "data.num_proc=1", "--run-dir", str(w / "prep-run")]
            o = run_forked(prep, w, 300, env)
            r = _judge(o, must_fail=True, expect="no space left")
            leftovers = [p.name for p in cmnt.iterdir() if p.is_dir()]
            if r == "clear" and leftovers:
                r = "vague"
            if r == "clear":
                subprocess.run(["mount", "-o", "remount,size=100m", str(cmnt)], check=True)
                r = _judge(run_forked(prep, w, 300, env), must_fail=False)
            rows.append(Scenario("full disk", "cache write on a 128 KiB tmpfs", r, "clear error, no half-written cache, rerun builds"))
        finally:
            subprocess.run(["umount", "-l", str(cmnt)], capture_output=True)
    return rows


def run_concurrency(w: Path, ref: Path) -> list[Scenario]:
    rows = []
    # two trains on one run directory
    run = w / "runs" / "twice"
    first = train_proc(run, w)
    lock = run / ".affinage.lock"
    t0 = time.time()
    while time.time() - t0 < 120 and not (lock.exists() and lock.stat().st_size > 0) and first.poll() is None:
        time.sleep(0.05)
    second = train_to_end(run, w, timeout=120)
    first_out = first.wait(600)
    r = _judge(second, must_fail=True, expect=f"pid {first.pid}")
    if r == "clear":
        r = "lost" if first_out.rc != 0 else ("clear" if same_weights(ref / "final", run / "final") else "mismatch")
    rows.append(Scenario("concurrency", "two train on one run directory", r,
                         "the second refused with the first's host and pid; the first ended equal to the reference"))
    # two prepares of one cache
    cache = w / "cache-twice"
    args = ["prepare", str(DEMO / "full" / "cpt.yaml"), "--set", "data.num_proc=1"]
    procs = [Forked([*args, "--run-dir", str(w / f"prep-{i}")], w, {"AFFINAGE_CACHE": str(cache)}) for i in range(2)]
    results = [p.wait(600) for p in procs]
    codes = [o.rc for o in results]
    built = sum("(built in" in o.out for o in results)
    hit = sum("(hit in" in o.out for o in results)
    r = "traceback" if any("Traceback" in o.err for o in results) else ("clear" if codes == [0, 0] and (built, hit) == (1, 1) else "lost")
    rows.append(Scenario("concurrency", "two prepare of one cache", r, f"exits {codes}: {built} built, {hit} waited and reused"))
    # a killed prepare's temporary folder
    cache = w / "cache-killed"
    p = Forked([*args, "--run-dir", str(w / "prep-k")], w, {"AFFINAGE_CACHE": str(cache)})
    orphan = None
    while p.poll() is None:
        tmp = [q for q in cache.glob(".*") if q.is_dir()] if cache.is_dir() else []
        if tmp:
            orphan = tmp[0]
            p.kill()
            break
        time.sleep(0.002)
    p.wait()
    o = run_forked([*args, "--run-dir", str(w / "prep-k")], w, 300, {"AFFINAGE_CACHE": str(cache)})
    left = [q.name for q in cache.glob(".*") if q.is_dir()]
    r = _judge(o, must_fail=False)
    if r == "clear" and (orphan is None or left):
        r = "vague" if orphan is None else "silent"
    rows.append(Scenario("concurrency", "killed prepare leaves a temporary folder", r,
                         f"orphan {orphan.name if orphan else 'not caught'} removed by the next prepare"))
    return rows


# ============================================================================ report
def print_table(cases: list[Case], scenarios: list[Scenario], kills: Optional[dict], say=print) -> dict:
    say(f"\n{'group':<14} {'input':<44} {'result':<10} {'exit':>4} {'s':>5}  message")
    for c in cases:
        say(f"{c.group:<14} {c.name[:44]:<44} {c.result:<10} {str(c.rc):>4} {c.seconds:>5.1f}  {c.message[:110]}")
    for s in scenarios:
        say(f"{s.group:<14} {s.name[:44]:<44} {s.result:<10} {'':>4} {'':>5}  {s.detail[:110]}")
    everything = [c.result for c in cases] + [s.result for s in scenarios]
    totals = {
        "bad_inputs": len(cases),
        "clear": everything.count("clear"),
        "tracebacks": everything.count("traceback"),
        "hangs": everything.count("hang"),
        "silent_acceptances": everything.count("silent"),
        "vague": everything.count("vague"),
        "skipped": everything.count("skipped"),
        "kills": kills["kills"] if kills else 0,
        "kills_during_checkpoint_write": kills["during_checkpoint_write"] if kills else 0,
        "lost_runs": (kills["lost"] if kills else 0) + everything.count("lost"),
        "weight_mismatches": (kills["mismatch"] if kills else 0) + everything.count("mismatch"),
        "metrics_duplicates": (kills["metrics_duplicates"] if kills else 0) + everything.count("metrics duplicate"),
    }
    by_group: dict[str, list[int]] = {}
    for c in cases:
        by_group.setdefault(c.group, [0, 0])
        by_group[c.group][0] += 1
        by_group[c.group][1] += c.result == "clear"
    say("\nbad inputs by group: " + ", ".join(f"{g} {ok}/{n} clear" for g, (n, ok) in by_group.items()))
    say(f"totals: {totals['bad_inputs']} bad inputs + {len(scenarios)} fault scenarios; {totals['kills']} SIGKILLs "
        f"({totals['kills_during_checkpoint_write']} during a checkpoint write); "
        f"{totals['lost_runs']} lost runs, {totals['weight_mismatches']} weight mismatches, {totals['tracebacks']} tracebacks, "
        f"{totals['hangs']} hangs, {totals['silent_acceptances']} silent acceptances, {totals['vague']} vague, "
        f"{totals['metrics_duplicates']} duplicate metric lines, {totals['skipped']} skipped")
    return totals


def campaign(work: Path, *, quick: bool = False, kills: int = 24, seed: int = 0, say=print) -> dict:
    global STEPS
    STEPS = 12 if quick else 24
    work.mkdir(parents=True, exist_ok=True)
    setup_env()
    t0 = time.perf_counter()
    preload()
    say(f"bad-input table (preloaded in {time.perf_counter() - t0:.1f} s)")
    cases = run_table(work, say=say)
    say(f"  {len(cases)} rows in {time.perf_counter() - t0:.1f} s")
    ref = reference_run(work)
    say(f"reference run: {metric_steps(ref)[-1]} steps; kills")
    kill_stats = run_kills(work, ref, kills=2 if quick else kills, seed=seed, say=say)
    scenarios: list[Scenario] = []
    if not quick:
        for part in (run_corruption, run_disk_full, run_concurrency):
            say(part.__name__.replace("run_", "") + " …")
            scenarios += part(work, ref)
    totals = print_table(cases, scenarios, kill_stats, say=say)
    totals["seconds"] = round(time.perf_counter() - t0, 1)
    return {"totals": totals, "cases": [asdict(c) for c in cases], "scenarios": [asdict(s) for s in scenarios],
            "kills": kill_stats}


def failures(totals: dict) -> int:
    keys = ("lost_runs", "weight_mismatches", "tracebacks", "hangs", "silent_acceptances", "vague", "metrics_duplicates")
    return sum(totals[k] for k in keys)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the bad-input table and 2 kills only")
    p.add_argument("--kills", type=int, default=24, help="SIGKILLs in the kill campaign (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--json", help="write every row and the totals here")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="affinage-faults-"))
    try:
        result = campaign(work, quick=args.quick, kills=args.kills, seed=args.seed)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if failures(result["totals"]) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
