"""The recipe schema: every key a researcher may write, with its type, default and limits.

Strict on purpose (llm-foundry style): unknown keys are errors (``extra="forbid"``), impossible
combinations are rejected here, before any model or data is loaded. Loading YAML, ``base:``
composition, ``--set`` overrides and the file:line error messages live in ``recipe.loader``.

One cohesive thing (over 400 lines): the one strict schema of a recipe, section by section.
"""

from __future__ import annotations

import math
import re
import string
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from affinage.recipe.preference import PreferenceSpec, check_preference_recipe
from affinage.sharding import StrategyName, strategy
from affinage.sharding import describe as describe_strategies


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, v):
        """No NaN or infinity anywhere (YAML reads ``.nan`` and ``.inf``): every range check below assumes numbers."""
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number (got {v})")
        return v


# Upper bounds: values past them are typing mistakes no run can use (they overflow numpy seeds, allocate
# absurd buffers or never finish); each says what is usual.
SEED_MAX = 2**32 - 1  # numpy's and torch's seed range
MAX_LENGTH_MAX = 1 << 20  # tokens per sequence (1M: beyond any model's context)
BATCH_MAX = 1 << 20  # sequences per optimizer step
STEPS_MAX = 10**9
EPOCHS_MAX = 10_000
TOKENS_MAX = 1e15  # 1,000 T tokens: beyond any fine-tune


def _seed(v: int) -> int:
    if not 0 <= v <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**32-1] = [0, {SEED_MAX}] (got {v}); any small number such as 42 will do")
    return v


def _at_least(v, low, what: str, usual: str = ""):
    if v is not None and v < low:
        raise ValueError(f"{what} must be >= {low} (got {v})" + (f"; {usual}" if usual else ""))
    return v


def _at_most(v, high, what: str, usual: str = ""):
    if v is not None and v > high:
        raise ValueError(f"{what} must be <= {high:,} (got {v:,})" + (f"; {usual}" if usual else ""))
    return v


# --------------------------------------------------------------------------------------- model
class ModelSpec(Strict):
    """Which base model, and how to load it offline."""

    name_or_path: str = Field(description="local folder, HF id (read from the HF cache or a mirror), or a mirror-relative org/name")
    revision: Optional[str] = Field(None, description="HF cache revision (branch, tag or commit); default: the cache's main ref")
    mirrors: list[str] = Field(
        default_factory=lambda: ["$DSDIR/HuggingFace_Models"],
        description="folders laid out as <mirror>/<org>/<name> (Jean Zay's $DSDIR layout); env vars expanded",
    )
    tokenizer: Optional[str] = Field(None, description="tokenizer folder or id when it differs from the model's")
    chat_template: Optional[str] = Field(
        None, description="named template (see affinage.data.templates) or a .jinja file, for a base model without one"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = "sdpa"
    trust_remote_code: bool = False
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: build the architecture from config.json with random weights (demos, from-scratch)"
    )


# -------------------------------------------------------------------------------------- method
class LoraSpec(Strict):
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: list[str] | Literal["all-linear"] = "all-linear"
    dora: bool = False
    modules_to_save: list[str] = Field(default_factory=list)

    @field_validator("r")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"LoRA rank must be a positive integer (got {v}); typical values are 8, 16, 64")
        return _at_most(v, 65536, "LoRA rank", "typical values are 8, 16, 64")

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"LoRA alpha must be positive (got {v}); a common choice is 2 × r")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {v})")
        return v


class QuantizationSpec(Strict):
    """bitsandbytes 4-bit quantisation of the frozen base (QLoRA)."""

    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class MethodSpec(Strict):
    kind: Literal["lora", "qlora", "full"] = "lora"
    lora: Optional[LoraSpec] = None
    quantization: Optional[QuantizationSpec] = None

    @model_validator(mode="after")
    def _consistent(self) -> "MethodSpec":
        if self.kind == "full":
            if self.quantization is not None:
                raise ValueError(
                    "method.quantization is set with method.kind: full — a 4-bit base cannot be fully "
                    "fine-tuned; use kind: qlora (4-bit base + LoRA) or remove method.quantization"
                )
            if self.lora is not None:
                raise ValueError("method.lora is set with method.kind: full — use kind: lora, or remove method.lora")
        if self.kind in ("lora", "qlora") and self.lora is None:
            self.lora = LoraSpec()
        if self.kind == "qlora" and self.quantization is None:
            self.quantization = QuantizationSpec()
        if self.kind == "lora" and self.quantization is not None:
            raise ValueError("method.quantization is set with method.kind: lora — did you mean kind: qlora?")
        return self


# ---------------------------------------------------------------------------------------- data
#: record fields a source's ``columns`` may map (canonical name -> the dataset's field); data.formats reads them
COLUMN_KEYS = ("text", "messages", "conversations", "instruction", "input", "output", "system", "tools",
               "role", "content", "from", "value")


class SourceSpec(Strict):
    path: str = Field(description="a .jsonl/.json file, a .parquet file, a folder of .txt files, or a datasets.save_to_disk folder")
    format: Literal["auto", "text", "chat", "alpaca", "sharegpt", "preference", "unpaired"] = "auto"
    weight: float = Field(1.0, description="repeat factor: 0.5 keeps half the records, 2 uses them twice")
    name: Optional[str] = None
    text_field: str = "text"
    messages_field: str = "messages"
    columns: Optional[dict[str, str]] = Field(
        None, description="the dataset's field names, canonical -> yours: {messages: dialogue, content: text, from: speaker, ...}"
    )
    max_records: Optional[int] = None
    licence: Optional[str] = Field(None, description="SPDX id or free text, copied into the data manifest and model card")
    origin: Optional[str] = Field(None, description="where the data comes from (URL, repository and commit, ...)")

    @field_validator("columns")
    @classmethod
    def _columns_known(cls, v: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        bad = sorted(set(v or {}) - set(COLUMN_KEYS))
        if bad:
            raise ValueError(f"columns maps unknown field(s) {bad}; the canonical names are {', '.join(COLUMN_KEYS)}")
        return v

    @field_validator("weight")
    @classmethod
    def _weight_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"source weight must be > 0 (got {v}); remove the source to leave it out")
        return _at_most(v, 1000, "source weight", "it is a repeat factor: 2 uses the records twice")

    @field_validator("max_records")
    @classmethod
    def _max_records_positive(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v <= 0:
            raise ValueError(f"max_records must be > 0 (got {v})")
        return v


class FilterSpec(Strict):
    """Documents kept out of training before tokenization (counted per source in data_stats.json)."""

    min_chars: int = Field(0, description="drop documents shorter than this (characters of text, or of all chat turns)")
    max_chars: Optional[int] = Field(None, description="drop documents longer than this (characters)")
    min_tokens: int = Field(0, description="drop documents with fewer tokens (whole document, before splitting/truncation)")
    max_tokens: Optional[int] = Field(None, description="drop documents with more tokens (instead of truncating/splitting them)")
    exact_dedup: bool = Field(False, description="drop exact duplicates (after NFC and whitespace normalisation), across all sources")
    near_dedup: bool = Field(False, description="drop near-duplicates (MinHash LSH on word 5-grams, needs datasketch)")
    near_dedup_threshold: float = Field(0.8, description="estimated Jaccard similarity above which a document is a near-duplicate")
    near_dedup_num_perm: int = Field(128, description="MinHash permutations (more: more precise, slower)")
    near_dedup_ngram: int = Field(5, description="word n-gram size of the MinHash shingles")

    @field_validator("min_chars", "min_tokens")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        return _at_least(v, 0, f"filters.{info.field_name}")

    @field_validator("max_chars", "max_tokens")
    @classmethod
    def _max_positive(cls, v: Optional[int], info) -> Optional[int]:
        return _at_least(v, 1, f"filters.{info.field_name}", "leave it out for no limit")

    @field_validator("near_dedup_num_perm")
    @classmethod
    def _num_perm(cls, v: int) -> int:
        return _at_most(v, 4096, "filters.near_dedup_num_perm", "128 is usual")

    @field_validator("near_dedup_ngram")
    @classmethod
    def _ngram_max(cls, v: int) -> int:
        return _at_most(v, 100, "filters.near_dedup_ngram", "5 is usual")

    @field_validator("near_dedup_threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"near_dedup_threshold must be in (0, 1) (got {v}); 0.8 is a common choice")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> "FilterSpec":
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"filters.max_chars {self.max_chars} is below min_chars {self.min_chars}")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"filters.max_tokens {self.max_tokens} is below min_tokens {self.min_tokens}")
        if self.near_dedup_num_perm < 16 or self.near_dedup_ngram < 1:
            raise ValueError("filters.near_dedup_num_perm must be >= 16 and near_dedup_ngram >= 1")
        return self


class DecontaminationSpec(Strict):
    """Training documents sharing a long word n-gram with an evaluation file."""

    eval_files: list[str] = Field(min_length=1, description="evaluation files (.jsonl/.json/.parquet/txt folder; text, chat or alpaca)")
    ngram: int = Field(13, description="words per n-gram (GPT-3 used 13); evaluation texts shorter than this are matched whole")
    action: Literal["drop", "report"] = Field("drop", description="drop contaminated documents, or only count and list them")

    @field_validator("ngram")
    @classmethod
    def _ngram(cls, v: int) -> int:
        if v < 4:
            raise ValueError(f"decontamination.ngram must be at least 4 words (got {v}); 13 is usual")
        return _at_most(v, 1000, "decontamination.ngram", "13 is usual")


class DataSpec(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    max_length: int = Field(1024, description="sequence length in tokens; longer samples are truncated (SFT) or split (CPT)")
    heldout_fraction: float = Field(0.0, description="share of records kept out of training for evaluation")
    heldout_max: Optional[int] = Field(None, description="cap on held-out records")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="error: stop on the first malformed line; skip: count and report skipped lines"
    )
    shuffle: bool = True
    packing: Literal["bfd", "concat", "none"] = Field(
        "bfd",
        description="bfd: best-fit-decreasing rows of samples that never attend to each other; concat (cpt only): "
        "documents joined with EOS and cut into full rows; none: one sample per row",
    )
    document_mask: bool = Field(
        True,
        description="with packing: concat, restart positions at each document so documents do not attend to each "
        "other; false: plain causal attention across the EOS-separated documents of a row (classic pretraining)",
    )
    cache_dir: Optional[str] = Field(
        None, description="prepared-data cache root (default: $AFFINAGE_CACHE, else ~/.cache/affinage); use work storage on clusters"
    )
    num_proc: Optional[int] = Field(None, description="tokenization processes (default: the CPU cores this process may use)")
    filters: FilterSpec = Field(default_factory=FilterSpec)
    system: Literal["keep", "merge_into_first_user", "drop"] = Field(
        "keep", description="a conversation's system message: keep, fold into the first user turn (templates that refuse one), or drop"
    )
    decontamination: Optional[DecontaminationSpec] = None

    @field_validator("num_proc")
    @classmethod
    def _num_proc(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v <= 0:
            raise ValueError(f"data.num_proc must be a positive integer (got {v})")
        return _at_most(v, 4096, "data.num_proc", "the CPU cores of the machine")

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v < 8:
            raise ValueError(f"data.max_length must be at least 8 tokens (got {v})")
        return _at_most(v, MAX_LENGTH_MAX, "data.max_length", "the model's context, e.g. 2048 or 4096 tokens")

    @field_validator("heldout_max")
    @classmethod
    def _heldout_max(cls, v: Optional[int]) -> Optional[int]:
        return _at_least(v, 1, "data.heldout_max", "use heldout_fraction: 0 for no held-out split")

    @field_validator("heldout_fraction")
    @classmethod
    def _heldout(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"data.heldout_fraction must be in [0, 1) (got {v})")
        return v


# ------------------------------------------------------------------------------------ training
_DURATION = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<mult>[kKMBG]?)\s*(?P<unit>steps?|epochs?|tokens?)\s*$")
_MULT = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}


class Duration(Strict):
    """How long to train: ``200 steps``, ``3 epochs``, ``1.5M tokens`` (one of them)."""

    unit: Literal["steps", "epochs", "tokens"]
    value: float

    @classmethod
    def parse(cls, text: str) -> "Duration":
        m = _DURATION.match(str(text))
        if not m:
            raise ValueError(
                f"cannot read duration {text!r}: write a number and a unit, e.g. '200 steps', '3 epochs' or '50M tokens'"
            )
        unit = m["unit"].rstrip("s") + "s"
        value = float(m["n"]) * _MULT[m["mult"]]
        if m["mult"] and unit != "tokens":
            raise ValueError(f"duration {text!r}: k/M/B multipliers are for token budgets (e.g. '50M tokens')")
        if value <= 0:
            raise ValueError(f"duration {text!r} must be positive")
        if unit == "steps" and value != int(value):
            raise ValueError(f"duration {text!r}: steps must be a whole number")
        limit = {"steps": STEPS_MAX, "epochs": EPOCHS_MAX, "tokens": TOKENS_MAX}[unit]
        if value > limit:
            raise ValueError(f"duration {text!r} is beyond any run (at most {limit:,.0f} {unit}); check the number")
        return cls(unit=unit, value=value)

    def __str__(self) -> str:
        v = int(self.value) if self.value == int(self.value) else self.value
        return f"{v} {self.unit}"


class LossSpec(Strict):
    """How the LM head and cross-entropy are computed (``affinage.train.loss``); same loss either way."""

    kind: Literal["plain", "chunked"] = Field("plain", description="chunked: head + cross-entropy per chunk of tokens, "
                                              "full logits never held (CPT memory peak); fused Liger/CCE kernels on GPU")
    chunk_tokens: int = Field(4096, gt=0, description="tokens per chunk of the chunked head (PyTorch path)")
    backend: Literal["auto", "torch", "liger", "cce"] = Field("auto", description="auto: Cut Cross-Entropy, else Liger "
                                                               "on CUDA when installed, else the chunked PyTorch path")


class KernelsSpec(Strict):
    """Faster kernels for the same computation (``affinage.train.kernels``); each tested equal to the plain path."""

    liger: Literal["auto", "on", "off"] = Field("auto", description="Liger's Triton RMSNorm, RoPE and SwiGLU, applied to "
                                                "this model instance only (llama, mistral, qwen2, qwen3). auto: on with CUDA "
                                                "and liger-kernel installed (pip install 'affinage[gpu]'), else off")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the model (the HF Trainer's torch_compile). "
                                                  "auto: off — measured slower on CPU (compile time, recompiles on packed rows "
                                                  "of varying length), not yet measured on GPU; on: compile (sft/cpt)")

    @field_validator("liger", "compile", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        """YAML 1.1 reads an unquoted on/off (and yes/no, true/false) as a boolean: they mean on/off here."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class TrainingSpec(Strict):
    global_batch_size: int = Field(description="sequences per optimizer step, summed over all GPUs and accumulation")
    micro_batch_size: int = Field(1, description="sequences per forward pass on one GPU")
    duration: Duration
    learning_rate: float = 2e-4
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "wsd"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    gradient_checkpointing: bool = False
    loss: LossSpec = Field(default_factory=LossSpec)
    kernels: KernelsSpec = Field(default_factory=KernelsSpec)
    logging_steps: int = 1
    save_every: Optional[int] = Field(None, description="checkpoint every N optimizer steps (default: only at the end)")
    keep_checkpoints: int = Field(2, description="complete checkpoints kept on disk (oldest deleted first)")
    eval_every: Optional[int] = Field(None, description="evaluate the held-out split every N steps")
    max_lost_minutes: float = Field(30.0, gt=0, description="checkpoint often enough that a crash loses at most this much work (measured step and save times; save_every stays an upper bound)")
    exit_margin_s: float = Field(60.0, ge=0, description="seconds kept after the last checkpoint for the job to exit before its SLURM time limit")
    eval_on_start: bool = Field(
        False, description="also evaluate the held-out split before the first step: the untouched model's held-out "
        "loss (step 0 in metrics.jsonl), the baseline the final held-out loss is compared with"
    )
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(default_factory=lambda: ["tensorboard"])

    @field_validator("duration", mode="before")
    @classmethod
    def _parse_duration(cls, v):
        if isinstance(v, str):
            return Duration.parse(v)
        if isinstance(v, int):
            raise ValueError(f"duration {v!r} has no unit: write '{v} steps' or '{v} epochs'")
        return v

    @field_validator("global_batch_size", "micro_batch_size", "logging_steps", "keep_checkpoints")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    @field_validator("global_batch_size", "micro_batch_size")
    @classmethod
    def _batch_max(cls, v: int, info) -> int:
        return _at_most(v, BATCH_MAX, f"training.{info.field_name}", "global batches are usually 8..1024 sequences")

    @field_validator("save_every", "eval_every")
    @classmethod
    def _every(cls, v: Optional[int], info) -> Optional[int]:
        return _at_least(v, 1, f"training.{info.field_name}", "a number of optimizer steps; leave it out for the default")

    @field_validator("warmup_steps", "weight_decay", "max_grad_norm")
    @classmethod
    def _non_negative(cls, v, info):
        usual = {"warmup_steps": "0 for no warm-up", "weight_decay": "0.0 or 0.01..0.1 are usual",
                 "max_grad_norm": "1.0 is usual; 0 turns clipping off"}[info.field_name]
        return _at_least(v, 0, f"training.{info.field_name}", usual)

    @field_validator("weight_decay")
    @classmethod
    def _wd_max(cls, v: float) -> float:
        return _at_most(v, 10, "training.weight_decay", "0.0 or 0.01..0.1 are usual")

    @field_validator("adam_beta1", "adam_beta2")
    @classmethod
    def _beta(cls, v: float, info) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"training.{info.field_name} must be in [0, 1) (got {v}); 0.9 and 0.999 are usual")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"learning_rate must be in (0, 1) (got {v}); LoRA typically 1e-4..3e-4, full 1e-5..5e-5")
        return v

    @model_validator(mode="after")
    def _batches(self) -> "TrainingSpec":
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}: choose sizes so that global = micro × GPUs × accumulation"
            )
        return self

    def gradient_accumulation(self, world_size: int) -> int:
        """Accumulation steps that keep the global batch fixed on ``world_size`` processes."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            valid = [w for w in range(1, self.global_batch_size // self.micro_batch_size + 1)
                     if (self.global_batch_size // self.micro_batch_size) % w == 0]
            raise ValueError(
                f"training.global_batch_size {self.global_batch_size} cannot be split over {world_size} processes "
                f"with micro_batch_size {self.micro_batch_size} (micro × world = {per_step} does not divide it). "
                f"World sizes that work with these sizes: {valid}; or change global_batch_size/micro_batch_size."
            )
        return self.global_batch_size // per_step


class OutputSpec(Strict):
    dir: str = Field("runs/{name}", description="run directory; {name} is the recipe name")
    sharing: Literal["user", "group"] = Field(
        "user", description="user: files and folders follow your umask; group: run directory and data cache are also "
        "group read/write (setgid folders), for a project sharing $WORK/$SCRATCH through its Unix group",
    )

    @field_validator("dir")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"output.dir {v!r}: {e}; write {{{{ and }}}} for literal braces") from None
        bad = [f for f in fields if f != "name"]
        if bad:
            raise ValueError(f"output.dir {v!r}: unknown placeholder {{{bad[0]}}}; the only one is {{name}} (the recipe "
                             "name); write {{ and }} for literal braces, $VAR for environment variables")
        if not v.strip():
            raise ValueError("output.dir is empty: give a folder, e.g. runs/{name}")
        return v


# --------------------------------------------------------------------------------- distributed
class DistributedSpec(Strict):
    """How the model is spread over the processes (GPUs): the same recipe runs on 1 GPU, one node or many.

    The process count comes from the launch (``affinage train --nproc N``, torchrun, SLURM), never from
    here. Files: ``configs/deepspeed/<strategy>.json`` and ``configs/accelerate/fsdp2.yaml`` (see
    ``affinage.distributed``); batch sizes, accumulation, clipping, dtype and optimizer are always the recipe's.
    """

    strategy: StrategyName = Field("ddp", description=describe_strategies())
    offload_optimizer: Optional[bool] = Field(
        None, description="optimizer states and step in CPU RAM (zero2, zero3; default true for zero3_offload)"
    )
    offload_params: Optional[bool] = Field(
        None,
        description="parameters in CPU RAM between uses (zero3; default true for zero3_offload); fsdp2: CPU offload "
        "of parameters, gradients and the optimizer step together",
    )
    config: Optional[str] = Field(
        None,
        description="your own DeepSpeed JSON (zero*) or accelerate YAML (fsdp2) instead of the shipped one; values the "
        "recipe owns (batch sizes, accumulation, clipping, dtype, optimizer) must be absent or \"auto\"",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "DistributedSpec":
        s = self.strategy
        if s in ("single", "ddp"):
            for key in ("offload_optimizer", "offload_params"):
                if getattr(self, key):
                    raise ValueError(
                        f"distributed.{key}: true with strategy {s} — a replicated model keeps everything on the GPU; "
                        "use zero2/zero3/zero3_offload (or fsdp2 with offload_params) to offload"
                    )
            if self.config is not None:
                raise ValueError(f"distributed.config is for fsdp2 and zero* strategies; {s} has no config file")
        if s == "zero2" and self.offload_params:
            raise ValueError(
                "distributed.offload_params: true with strategy zero2 — ZeRO-2 keeps a full copy of the parameters on "
                "every GPU; use zero3 (or zero3_offload) to offload parameters"
            )
        if s == "fsdp2" and self.offload_optimizer is not None and self.offload_optimizer != bool(self.offload_params):
            raise ValueError(
                "distributed.offload_optimizer with strategy fsdp2 — FSDP2 offloads parameters, gradients and the "
                "optimizer step together: set offload_params: true (and leave offload_optimizer out)"
            )
        if s == "zero3_offload" and self.offload_optimizer is False and self.offload_params is False:
            raise ValueError("strategy zero3_offload with both offloads false is zero3: write strategy: zero3")
        return self

    def offloads(self) -> tuple[bool, bool]:
        """(optimizer, parameters) offloaded to CPU RAM, with the strategy's defaults applied."""
        default = strategy(self.strategy).offload_by_default
        opt = default if self.offload_optimizer is None else self.offload_optimizer
        params = default if self.offload_params is None else self.offload_params
        if self.strategy == "fsdp2":
            opt = params
        return bool(opt), bool(params)

    @property
    def sharded(self) -> bool:
        """Whether the strategy needs a process group even on one process (FSDP2 and DeepSpeed)."""
        return strategy(self.strategy).sharded


# ---------------------------------------------------------------------------------- evaluation
class PerplexitySetSpec(Strict):
    """Held-out text scored by perplexity and bits per byte (``affinage eval``)."""

    name: str = Field(description="label in the report, e.g. droit-heldout")
    path: str = Field(description="a .jsonl/.json/.parquet file or a folder of .txt files; relative paths: from the current directory")
    text_field: str = "text"
    role: Literal["domain", "forgetting"] = Field(
        "domain", description="domain: the text the training should improve; forgetting: general or other text that should not get much worse"
    )
    max_records: Optional[int] = Field(None, ge=1, description="score only the first N records")
    group_field: Optional[str] = Field(
        None, description="field naming the unit records were cut from (book, source document): the bootstrap "
        "resamples these groups, since passages of one book are not independent"
    )


class McqSetSpec(Strict):
    """Multiple-choice items scored by log-likelihood (lm-eval style).

    An item is ``{"question": str, "choices": [str, ...], "answer": 0}``; the answer may be an index
    (from 0), a letter (``"B"``) or the text of the right choice, and the three field names can be
    mapped for sets with other names (``answer_field: answer_index``).
    """

    name: str
    path: str
    role: Literal["domain", "forgetting"] = "domain"
    question_field: str = "question"
    choices_field: str = "choices"
    answer_field: str = Field("answer", description="field of the right answer: an index from 0, a letter A-Z, or the choice's text")
    group_field: Optional[str] = Field(None, description="field naming the unit items come from; the bootstrap resamples these groups")
    num_fewshot: int = Field(0, ge=0, description="solved examples put before each question")
    fewshot_path: Optional[str] = Field(None, description="items the examples are drawn from (default: the same file, never the item itself)")
    template: str = Field("Question : {question}\nRéponse :", description="prompt; {question} is replaced")
    max_items: Optional[int] = Field(None, ge=1)


class ExtractiveSetSpec(Strict):
    """Extractive QA (FQuAD/PIAF style) answered greedily, scored by exact match and F1 (``eval.extractive``).

    An item is ``{"context": str, "question": str, "answers": [str, ...]}`` (or SQuAD's ``{"text": [...]}``).
    """

    name: str
    path: str
    role: Literal["domain", "forgetting"] = "domain"
    context_field: str = "context"
    question_field: str = "question"
    answers_field: str = "answers"
    group_field: Optional[str] = Field(None, description="field naming the unit items come from (e.g. the article); the bootstrap resamples these groups")
    template: str = Field("Contexte : {context}\n\nQuestion : {question}\n\nRéponse :", description="prompt; {context} and {question} are replaced")
    max_new_tokens: int = Field(32, ge=1, le=512)
    max_items: Optional[int] = None


class GenerationSpec(Strict):
    """French prompts completed greedily (fixed seed) by both models, shown in the report."""

    prompts: list[str] = Field(default_factory=list, description="prompts written here")
    path: Optional[str] = Field(None, description="more prompts: a .jsonl with a 'prompt' field, or a .txt file with one prompt per line")
    max_new_tokens: int = Field(48, ge=1, le=4096)


class LmEvalSpec(Strict):
    """lm-evaluation-harness tasks from local task folders (needs the lm-eval extra; skipped with a message otherwise)."""

    tasks: list[str] = Field(min_length=1)
    include_path: Optional[str] = Field(None, description="folder of task YAML files (french_bench style, data read from local files)")
    num_fewshot: Optional[int] = Field(None, ge=0)
    limit: Optional[int] = Field(None, ge=1, description="at most N documents per task (quick checks)")


class EvalSpec(Strict):
    """What ``affinage eval RUN_DIR`` measures, on the fine-tuned model and on its base."""

    perplexity: list[PerplexitySetSpec] = Field(default_factory=list)
    mcq: list[McqSetSpec] = Field(default_factory=list)
    extractive: list[ExtractiveSetSpec] = Field(default_factory=list)
    generation: Optional[GenerationSpec] = None
    lm_eval: Optional[LmEvalSpec] = None
    compare_base: bool = Field(True, description="evaluate the base model too and report differences with confidence intervals")
    base: Optional[str] = Field(None, description="model to compare with (default: the recipe's model.name_or_path)")
    max_length: Optional[int] = Field(None, ge=8, le=MAX_LENGTH_MAX, description="tokens per scoring window (default: data.max_length of the recipe)")
    batch_size: int = Field(8, ge=1)
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples for confidence intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 1234

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        return _seed(v)

    @model_validator(mode="after")
    def _unique_names(self) -> "EvalSpec":
        names = [s.name for s in self.perplexity] + [s.name for s in self.mcq] + [s.name for s in self.extractive]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"evaluation set names must be unique (repeated: {', '.join(dup)})")
        return self


# ---------------------------------------------------------------------------------------- card
class SourceCardSpec(Strict):
    """What the manifest cannot find out about a data source (also readable from a sidecar file)."""

    category: Optional[Literal["public", "licensed", "private", "crawled", "user", "synthetic", "other"]] = Field(
        None, description="AI Act template category: public dataset, commercially licensed, other private, web-crawled, user data, synthetic, other"
    )
    description: Optional[str] = None
    domains: list[str] = Field(default_factory=list, description="main web domains (crawled data)")
    opt_out: Optional[str] = Field(None, description="how text-and-data-mining opt-outs were respected")
    collected: Optional[str] = Field(None, description="date of the last data collection")
    licence: Optional[str] = None
    origin: Optional[str] = None


class CardSpec(Strict):
    """Model card and EU AI Act summary: what only the person releasing the model knows."""

    license: Optional[str] = Field(None, description="licence of the released model (SPDX id)")
    provider: Optional[str] = Field(None, description="name and contact of the provider (AI Act summary, section 1.1)")
    intended_use: Optional[str] = None
    out_of_scope: Optional[str] = None
    limitations: list[str] = Field(default_factory=list)
    language: list[str] = Field(default_factory=lambda: ["fr"])
    sources: dict[str, SourceCardSpec] = Field(default_factory=dict, description="per data source name (as in data_stats.json)")
    base_model_training_flops: Optional[float] = Field(None, description="training compute of the base model (FLOP), for the one-third check")
    gpu_power_w: Optional[float] = Field(None, description="power per GPU in watts (default: the GPU's TDP, see affinage.provenance.energy)")
    pue: Optional[float] = Field(None, description="data-centre power usage effectiveness (default 1.2)")
    grid_gco2_per_kwh: Optional[float] = Field(None, description="grid carbon intensity (default: France, 60 gCO2e/kWh, see affinage.provenance.energy)")
    location: str = "France"

    @field_validator("base_model_training_flops", "gpu_power_w", "pue", "grid_gco2_per_kwh")
    @classmethod
    def _positive(cls, v: Optional[float], info) -> Optional[float]:
        if v is not None and v <= 0:
            raise ValueError(f"card.{info.field_name} must be positive (got {v})")
        return v


# -------------------------------------------------------------------------------------- recipe
#: Recipe fields that may change when a run resumes: they change how a run is logged, checked,
#: kept or described, not what it trains. Every other field (and the model's files and the data
#: cache key) makes up the run's identity (``affinage.train.identity``); a resume with another
#: value is refused unless ``--allow-change KEY`` records it. ``training.duration`` is here so a
#: finished run can be extended on purpose (it can never be cut below a checkpoint's step).
RESUMABLE_FIELDS = frozenset({
    "name", "description", "output", "eval", "card",
    "training.duration", "training.logging_steps", "training.save_every", "training.keep_checkpoints",
    "training.eval_every", "training.report_to",
    "training.kernels",  # how fast the same computation runs (tested equal to the plain path), not what it trains
    "model.mirrors", "data.num_proc", "data.cache_dir",
    "distributed.offload_optimizer", "distributed.offload_params",
})


class Recipe(Strict):
    name: str
    description: Optional[str] = None
    task: Literal["sft", "cpt", "dpo", "kto"] = Field(
        description="sft: chat/instruction data, loss on assistant turns; cpt: raw text; dpo/kto: preference data (see preference:)"
    )
    seed: int = 42
    model: ModelSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec
    training: TrainingSpec
    output: OutputSpec = Field(default_factory=OutputSpec)
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="sharding strategy over GPUs/processes (ddp, fsdp2, zero2, zero3, zero3_offload)"
    )
    eval: Optional[EvalSpec] = Field(None, description="what `affinage eval` measures (perplexity, MCQ, samples, lm-eval)")
    card: Optional[CardSpec] = Field(None, description="model card and AI Act summary fields only the releaser knows")
    preference: Optional[PreferenceSpec] = Field(None, description="dpo/kto: objective, reference policy, starting run, truncation")

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        return _seed(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(
                f"name {v!r} must be letters, digits, '.', '_' or '-' (it names the run folder and jobs)"
            )
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "Recipe":
        if self.method.kind == "qlora" and self.model.init == "random":
            raise ValueError("method.kind: qlora with model.init: random — quantising an untrained model makes no sense; use lora or full")
        if self.method.kind == "qlora" and self.distributed.offloads()[1]:
            raise ValueError(
                f"method.kind: qlora with distributed.strategy {self.distributed.strategy} and parameter offload — "
                "offloading bitsandbytes 4-bit weights to CPU RAM is not supported (not by DeepSpeed nor accelerate for "
                "Params4bit, and not tested by affinage). Use strategy zero3 (4-bit weights partitioned) or fsdp2 with "
                "distributed.offload_params: false; optimizer offload (offload_optimizer: true with zero2/zero3) is fine"
            )
        check_preference_recipe(self)
        if self.task in ("dpo", "kto") and self.training.kernels.compile == "on":
            raise ValueError(
                f"training.kernels.compile: on with task: {self.task} — compiling TRL's preference trainers is not tested "
                "by affinage; use compile: auto or off (liger applies to dpo/kto)"
            )
        if self.training.micro_batch_size > self.training.global_batch_size:
            raise ValueError("training.micro_batch_size is larger than training.global_batch_size")
        if self.training.eval_every and self.data.heldout_fraction == 0:
            raise ValueError("training.eval_every is set but data.heldout_fraction is 0: set a held-out fraction (e.g. 0.05)")
        if self.training.eval_on_start and self.data.heldout_fraction == 0:
            raise ValueError("training.eval_on_start is set but data.heldout_fraction is 0: set a held-out fraction (e.g. 0.05)")
        if self.task == "sft" and self.data.packing == "concat":
            raise ValueError(
                "data.packing: concat with task: sft — concatenation cuts conversations at row boundaries; "
                "use packing: bfd (whole samples, no attention between them) or none"
            )
        if self.task == "sft":
            for i, s in enumerate(self.data.sources):
                if s.format == "text":
                    raise ValueError(
                        f"data.sources[{i}].format: text with task: sft — supervised fine-tuning learns assistant replies "
                        "from chat or alpaca records; use format: chat/alpaca, or task: cpt for raw text"
                    )
        if self.task == "cpt":
            for i, s in enumerate(self.data.sources):
                if s.format in ("chat", "alpaca"):
                    raise ValueError(
                        f"data.sources[{i}].format: {s.format} with task: cpt — continued pretraining reads raw text; "
                        "use task: sft for chat/alpaca data"
                    )
        return self

    def run_dir(self) -> str:
        """``output.dir`` with ``{name}``, ``~`` and environment variables (``$WORK``) expanded."""

        from affinage.errors import UserError

        from affinage.paths import expand_str

        path = expand_str(self.output.dir.format(name=self.name))
        if "$" in path:
            raise UserError(
                f"output.dir {self.output.dir!r} uses an environment variable that is not set here ({path}): "
                "set it (e.g. export WORK=/path/to/storage) or pass --run-dir / --set output.dir=..."
            )
        return path
