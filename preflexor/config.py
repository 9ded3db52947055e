"""Configuration: one dataclass per concern, YAML files, dotted `key=value` overrides.

    cfg = load_config(RunConfig, "configs/stage1_orpo.yaml", ["train.lr=1e-4", "lora.r=8"])

An unknown key, a value of the wrong type or one outside its range (a dataclass's `RANGES`) is a one-line
`UserError` naming the key and what it accepts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from preflexor import losses
from preflexor.errors import UserError
from preflexor.lora import PROJECTIONS


@dataclass
class ModelConfig:
    source: str = "smollm2-135m-instruct"  # HF dir, .gguf file, or an embedded default name
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16
    add_reasoning_tokens: bool = True
    gradient_checkpointing: bool = False
    fast: bool = True  # install the speed paths (preflexor/fast/); PREFLEXOR_FAST=0/1 overrides


def at_least(lo: float) -> tuple:
    return (lambda v: v >= lo), f">= {lo}"


def above(lo: float) -> tuple:
    return (lambda v: v > lo), f"> {lo}"


def within(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> tuple:
    ok = lambda v: (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)  # noqa: E731
    return ok, f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"


@dataclass
class LoraConfig:
    RANGES: ClassVar[dict] = {"r": at_least(1), "alpha": above(0), "dropout": within(0, 1, open_hi=True),
                              "new_rows_lr": above(0)}
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))  # may add embed_tokens, lm_head
    rslora: bool = False
    train_new_token_rows: bool = True  # stage 1: rows of the reasoning tokens in the embedding/head are trained
    new_rows_lr: float | None = None  # their learning rate (None = train.lr); see configs/stage1_orpo.yaml


@dataclass
class DataConfig:
    RANGES: ClassVar[dict] = {"kg_triples": at_least(0), "section_lines": at_least(1), "context_chunks": at_least(1),
                              "retrieve_k": at_least(0), "pairs_per_iteration": at_least(1),
                              "heldout_pairs": at_least(0), "max_prompt_len": at_least(1), "max_length": at_least(2)}
    pairs: str | None = None  # a preference JSONL; None = the active loop generates pairs
    corpus: str = "ontology"  # "ontology" (embedded default), a folder of .txt/.md, or a .jsonl with "text"
    retrieval: str = "tfidf"  # tfidf | dense | hybrid | graph (reasoning teacher: facts from the graph) | none
    teacher: str = "grounded"  # reasoning (KG tasks, checkable answers) | grounded | http | local
    teacher_url: str = "http://127.0.0.1:8000/v1"
    teacher_model: str = "default"
    teacher_source: str | None = None  # checkpoint for the local teacher
    rejected_source: str = "model"  # model | teacher_incorrect
    only_include_wrong_answers: bool = False  # train only on pairs whose model-written rejected answer is wrong
    #                                          (checkable tasks: meta.rejected_correct); the reference's switch
    kg_triples: int = 8  # graph triples in the Knowledge Graph thinking section; 0 = no such section (the paper's six)
    topics: list[str] | None = None  # instead of random chunks: the context retrieved for each topic in turn
    context_chunks: int = 3  # random chunks a question is drawn from (the reference takes 3)
    retrieve_k: int = 3  # chunks retrieved over the whole corpus for the question (retrieval: none = no enrichment)
    section_lines: int | None = None  # grounded teacher: at most this many lines per thinking section (short data)
    pairs_per_iteration: int = 16
    refresh: bool = True  # the active loop: each iteration's pairs made with the current model; false: all made
    #                       at the start by the starting model (static data)
    heldout_pairs: int = 16
    max_prompt_len: int = 256
    max_length: int = 768
    system_prompt: str | None = None
    seed: int = 0


@dataclass
class LossConfig:
    """`name` picks a loss of `losses.LOSSES`; the losses' hyperparameters (beta, epsilon, label_smoothing, ... as
    each `LossSpec.hparams` declares them) sit beside it as `loss.<key>` and are kept in `params`. A config may carry
    those of several losses (so `loss.name=...` can switch); the run uses and prints the selected loss's."""
    RANGES: ClassVar[dict] = {"mask_fraction": within(0, 1)}
    name: str = "orpo"  # orpo | exo_pair | sigmoid | ipo (losses.LOSSES); stage 3: grpo | dr_grpo | dapo
    mask: str = "none"  # answer_only | random_fraction | none (stage 2 thinking masks)
    keep_delimiter: bool = True
    mask_fraction: float = 0.2
    precompute_ref: bool = False  # stage 2: reference log-probs once per generated batch
    nll_prompt: bool = False  # ORPO's NLL over prompt + response (TRL, the official code); ours: the response only
    params: dict = field(default_factory=dict)

    @staticmethod
    def extra_keys() -> dict[str, type]:
        specs = [*losses.LOSSES.values(), *losses.POLICY_LOSSES.values()]
        return {k: float for spec in specs for k in spec.hparams}

    def hparams(self) -> dict[str, float]:
        return losses.hparams(self.name, self.params)


@dataclass
class SampleConfig:
    RANGES: ClassVar[dict] = {"temperature": at_least(0), "top_k": at_least(1), "top_p": within(0, 1, open_lo=True),
                              "max_new_tokens": at_least(1)}
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = 0.9
    max_new_tokens: int = 128


@dataclass
class TrainConfig:
    RANGES: ClassVar[dict] = {
        "dist_timeout_s": above(0), "lr": above(0), "warmup_steps": at_least(0), "weight_decay": at_least(0),
        "batch_size": at_least(1), "grad_accum": at_least(1), "max_grad_norm": at_least(0), "iterations": at_least(1),
        "steps_per_iteration": at_least(1), "eval_every": at_least(0), "save_every": at_least(0),
        "keep_last": at_least(0), "log_every": at_least(1), "eval_generations": at_least(0),
        "eval_max_new_tokens": at_least(1), "eval_answers": at_least(0), "eval_answer_tokens": at_least(1)}
    out_dir: str = "runs/stage1"
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    dist_timeout_s: float = 1800.0  # torchrun: how long a collective may wait (rank 0 alone may be saving)
    fsdp: bool = False  # torchrun: shard the model over the ranks with FSDP2 (preflexor/fsdp.py), for big models
    lr: float = 5e-5
    schedule: str = "constant"  # constant | cosine (warmup + cosine)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 1  # pairs per micro-batch
    grad_accum: int = 2
    max_grad_norm: float = 1.0
    iterations: int = 1  # active loop: regenerate data this many times
    steps_per_iteration: int = 10  # optimizer steps on each iteration's pairs
    eval_every: int = 0  # optimizer steps; 0 = at the end of every iteration only
    save_every: int = 0  # optimizer steps; 0 = at the end of every iteration only
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint dir>
    # a resume whose settings differ from the checkpoint's (lr, loss, data, LoRA scale, ...; resume.FREE_KEYS are
    # exempt) is refused; true = continue with the new ones, the changes printed
    allow_resume_changes: bool = False
    log_every: int = 1
    eval_generations: int = 8  # held-out greedy generations for the thinking-format rate
    eval_max_new_tokens: int = 96
    eval_answers: int = 0  # held-out questions with a gold answer (teacher reasoning) scored exactly, before and after
    eval_answer_tokens: int = 256  # their generation budget (room for the thinking)
    save_merged: bool = True


@dataclass
class RLConfig:
    """Stage 3 (train_rl.py): every optimizer step samples `group_size` responses (with `sample.*`) to each of
    `questions_per_step` training questions per rank, scores them with the rewards of preflexor/rewards.py weighted by
    `reward_<name>` (0 = off), and updates once on them."""
    RANGES: ClassVar[dict] = {"group_size": at_least(2), "questions_per_step": at_least(1),
                              "overlong_buffer": at_least(1)}
    group_size: int = 8
    questions_per_step: int = 4
    drop_equal_groups: bool = False  # DAPO's dynamic sampling, as a filter: groups whose rewards all agree are dropped
    stop_when_answered: bool = True  # end a sample at the end of its answer's first line (all the rewards read)
    reward_correct: float = 1.0
    reward_format: float = 0.0
    reward_factuality: float = 0.0
    reward_overlong: float = 0.0
    reward_judge: float = 0.0
    overlong_buffer: int = 64  # DAPO's soft overlong punishment: the last this many tokens of sample.max_new_tokens
    judge_url: str | None = None  # an OpenAI-compatible endpoint, for reward_judge
    judge_model: str = "default"

    def weights(self) -> dict[str, float]:
        return {"correct": self.reward_correct, "format": self.reward_format, "factuality": self.reward_factuality,
                "overlong": self.reward_overlong, "judge": self.reward_judge}


@dataclass
class RunConfig:
    """Everything a training script reads; the stages differ only in defaults (see configs/); `rl` is stage 3's."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)


# -- loading -----------------------------------------------------------------------------------------------------

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, arg) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check(value: Any, tp: Any, where: str, key: str):
    float_key = tp is float or float in typing.get_args(tp)
    if float_key and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads `5e-5` (no dot) as a string; accept it (and ints) for float keys
            value = float(value)
        except ValueError:
            pass
    if not _type_ok(value, tp):
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        raise UserError(f"{where}: config key '{key}' expects {tname}, got {value!r}")
    return value


def _build(cls, data: dict, where: str, prefix: str = ""):
    """`cls(**data)` with every key and type checked; a dataclass with `extra_keys()` keeps those keys in `params`."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = cls.extra_keys() if hasattr(cls, "extra_keys") else {}
    kwargs, params = {}, {}
    for key, value in data.items():
        if key == "params" and extra and isinstance(value, dict):  # to_dict's flat form, or a nested one
            params.update({k: _check(v, extra.get(k, float), where, f"{prefix}{k}") for k, v in value.items()})
        elif key in extra:
            params[key] = _check(value, extra[key], where, f"{prefix}{key}")
        elif key not in fields or key == "params":
            valid = sorted({*fields, *extra} - {"params"})
            raise UserError(f"{where}: unknown config key '{prefix}{key}' (valid: {', '.join(valid)})")
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _check(value, hints[key], where, f"{prefix}{key}")
            ok, accepts = getattr(cls, "RANGES", {}).get(key, (None, ""))
            if ok is not None and kwargs[key] is not None and not ok(kwargs[key]):
                raise UserError(f"{where}: config key '{prefix}{key}' must be {accepts}, got {kwargs[key]!r}")
    if extra:
        kwargs["params"] = params
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load `cls` (a dataclass of dataclasses) from a YAML file plus `key=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise UserError(f"override '{ov}' must look like key=value (e.g. train.lr=1e-4)")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return _build(cls, tree, where)


def to_dict(cfg) -> dict:
    """The config as plain data, a section's `params` written beside its other keys (as in the YAML)."""
    out = dataclasses.asdict(cfg)
    for sec in (out, *(v for v in out.values() if isinstance(v, dict))):
        if isinstance(sec.get("params"), dict):
            sec.update(sec.pop("params"))
    return out


def from_dict(cls, data: dict, where: str = "config"):
    """Inverse of `to_dict` for a saved run config (config.json): keys this version does not know (git, stage, a
    removed option) are left out, at every level."""
    return _build(cls, _known(cls, data), where)


def _known(cls, data: dict) -> dict:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} | set(cls.extra_keys() if hasattr(cls, "extra_keys") else ())
    return {k: _known(hints[k], v) if k in hints and dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) else v
            for k, v in (data or {}).items() if k in names}
