"""The ``preference:`` section of a recipe (``task: dpo`` and ``task: kto``).

The objectives are TRL's (``DPOTrainer``/``KTOTrainer`` in TRL 1.16); the names below are the values
TRL accepts, checked against TRL's own configuration by a test (tests/recipe/test_preference_schema.py)
so that a TRL upgrade that drops one fails there, not in the middle of a job.

Reference-free objectives: TRL 1.16's ``DPOTrainer`` has no reference-free switch, so
``reference: none`` feeds it reference log-probabilities of zero (``affinage.train.preference``): the
``sigmoid`` loss then is reference-free DPO and ``sigmoid_norm`` is SimPO without its target margin
(length-normalised log-likelihood difference). ORPO and CPO/SimPO proper live in ``trl.experimental``
with their own (older) tokenization path and are not wired.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# DPOConfig.loss_type choices of TRL 1.16 (trl/trainer/dpo_config.py)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# KTOConfig.loss_type choices of TRL 1.16 (trl/trainer/kto_config.py)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
# losses that only compare the chosen and rejected scores: meaningful with a zero reference
REFERENCE_FREE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo")
REFERENCES = ("auto", "adapter_disabled", "frozen_copy", "precomputed", "none")
PREFERENCE_TASKS = ("dpo", "kto")


class PreferenceSpec(BaseModel):
    """DPO/KTO hyper-parameters, the reference policy, the starting point and the truncation policy."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.1, description="strength of the pull towards the reference (higher: stay closer); IPO's tau")
    loss_type: Optional[Union[str, list[str]]] = Field(
        None,
        description="default sigmoid (dpo) or kto (kto); dpo: " + ", ".join(DPO_LOSS_TYPES) + " (a list combines several with loss_weights); kto: "
        + ", ".join(KTO_LOSS_TYPES),
    )
    loss_weights: Optional[list[float]] = Field(None, description="one weight per loss_type when several are combined")
    label_smoothing: float = Field(0.0, description="robust DPO: probability that a label is flipped, in [0, 0.5); exo_pair: epsilon (> 0)")
    reference: Literal["auto", "adapter_disabled", "frozen_copy", "precomputed", "none"] = Field(
        "auto",
        description="adapter_disabled (LoRA/QLoRA: the reference is the model with its adapter switched off, no second "
        "copy); frozen_copy (full fine-tuning: a second, frozen model in memory); precomputed (reference log-probs "
        "computed once before training and cached in the run directory, so a requeued job does not recompute them); "
        "none (reference-free: zero reference log-probs, dpo only). auto: adapter_disabled with LoRA, frozen_copy with full",
    )
    desirable_weight: float = Field(1.0, description="kto: weight of the desirable (label true) examples")
    undesirable_weight: float = Field(1.0, description="kto: weight of the undesirable (label false) examples")
    max_prompt_length: Optional[int] = Field(
        None, description="tokens of prompt always kept when a pair is too long (default: half of data.max_length)"
    )
    truncation: Literal["keep_prompt_end", "drop"] = Field(
        "keep_prompt_end",
        description="pairs longer than data.max_length: keep_prompt_end (cut the start of the prompt down to "
        "max_prompt_length, then cut the completions' ends) or drop (leave them out); counted in data_stats.json",
    )
    from_run: Optional[str] = Field(
        None, description="an SFT run directory (its final/ adapter or model) to start from; relative to the current directory"
    )
    start: Literal["merged", "stacked"] = Field(
        "merged",
        description="with from_run and a LoRA adapter: merged (the SFT adapter is merged into the base, written once to "
        "<run>/start/, and a new adapter is trained on it; the reference is the SFT model) or stacked (the SFT adapter "
        "itself keeps training; TRL keeps a frozen copy of it as the reference adapter)",
    )

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"preference.beta must be > 0 (got {v}); 0.1 is the usual DPO value")
        return v

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing(cls, v: float) -> float:
        if not 0 <= v < 0.5:
            raise ValueError(f"preference.label_smoothing must be in [0, 0.5) (got {v})")
        return v

    @field_validator("max_prompt_length")
    @classmethod
    def _prompt_len(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError(f"preference.max_prompt_length must be a positive number of tokens (got {v})")
        return v

    @model_validator(mode="after")
    def _weights(self) -> "PreferenceSpec":
        losses = self.losses
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(
                f"preference.loss_weights has {len(self.loss_weights)} values for {len(losses)} loss types; give one per loss_type"
            )
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("preference.desirable_weight and undesirable_weight must be > 0")
        return self

    @property
    def losses(self) -> list[str]:
        if self.loss_type is None:
            return []
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    def prompt_budget(self, max_length: int) -> int:
        return self.max_prompt_length if self.max_prompt_length is not None else max_length // 2

    def resolved_reference(self, method_kind: str) -> str:
        if self.reference != "auto":
            return self.reference
        return "adapter_disabled" if method_kind in ("lora", "qlora") else "frozen_copy"


def check_preference_recipe(recipe) -> None:
    """Cross-section rules of a preference recipe (called by ``Recipe``'s validator); raises ValueError."""
    task, p = recipe.task, recipe.preference
    if task not in PREFERENCE_TASKS:
        if p is not None:
            raise ValueError(f"a preference: section is set with task: {task} — it is for task: dpo or task: kto")
        for i, s in enumerate(recipe.data.sources):
            if s.format in ("preference", "unpaired"):
                raise ValueError(
                    f"data.sources[{i}].format: {s.format} with task: {task} — preference data trains with task: dpo or kto"
                )
        return
    if p is None:
        recipe.preference = p = PreferenceSpec()
    if recipe.training.loss.kind != "plain":
        raise ValueError(
            f"training.loss.kind: {recipe.training.loss.kind} with task: {task} — TRL's {task.upper()} trainer computes the "
            "log-probabilities itself, so affinage's chunked head would be ignored; it is for cpt and sft: remove training.loss"
        )
    allowed = DPO_LOSS_TYPES if task == "dpo" else KTO_LOSS_TYPES
    if p.loss_type is None:
        p.loss_type = allowed[0]  # sigmoid (DPO) or kto
    bad = [x for x in p.losses if x not in allowed]
    if bad:
        raise ValueError(
            f"preference.loss_type {bad[0]!r} is not a {task} loss; choose from {', '.join(allowed)}"
            + (" (for KTO losses write task: kto)" if task == "dpo" and bad[0] in KTO_LOSS_TYPES else "")
            + (" (for DPO losses write task: dpo)" if task == "kto" and bad[0] in DPO_LOSS_TYPES else "")
        )
    if task == "kto" and len(p.losses) > 1:
        raise ValueError("preference.loss_type: KTO takes a single loss type (kto or apo_zero_unpaired)")
    if "exo_pair" in p.losses and p.label_smoothing == 0:
        raise ValueError("preference.loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    kind = recipe.method.kind
    ref = p.resolved_reference(kind)
    if ref == "adapter_disabled" and kind == "full":
        raise ValueError(
            "preference.reference: adapter_disabled with method.kind: full — there is no adapter to switch off; use "
            "frozen_copy (a second frozen model) or precomputed (reference log-probs computed once)"
        )
    if ref == "frozen_copy" and kind != "full":
        raise ValueError(
            f"preference.reference: frozen_copy with method.kind: {kind} — the base with the adapter switched off already is "
            "the reference, a second copy only costs memory; use adapter_disabled (or leave reference: auto)"
        )
    if ref == "none":
        if task == "kto":
            raise ValueError("preference.reference: none with task: kto — KTO needs a reference model; use task: dpo for a reference-free objective")
        bad = [x for x in p.losses if x not in REFERENCE_FREE_LOSSES]
        if bad:
            raise ValueError(
                f"preference.reference: none with loss_type {bad[0]!r}: reference-free training is defined for "
                f"{', '.join(REFERENCE_FREE_LOSSES)} (sigmoid_norm is SimPO without its margin)"
            )
    if p.start == "stacked" and p.from_run is None:
        raise ValueError("preference.start: stacked needs preference.from_run (the SFT run whose adapter keeps training)")
    if p.start == "stacked" and kind == "full":
        raise ValueError("preference.start: stacked with method.kind: full — stacking continues a LoRA adapter; use start: merged")
    if p.max_prompt_length is not None and p.max_prompt_length >= recipe.data.max_length:
        raise ValueError(
            f"preference.max_prompt_length {p.max_prompt_length} leaves no room for completions within data.max_length "
            f"{recipe.data.max_length}; keep it below (half is the default)"
        )
    if recipe.data.packing == "concat":
        raise ValueError("data.packing: concat with a preference task — pairs are never concatenated; remove data.packing")
