"""Evaluate a trained run (or the base model) on held-out questions and pairs; writes eval.json, eval.md, eval.png.

    python evaluate.py RUN_DIR|base [--n 16] [--max-new-tokens 192] [--questions FILE] [--heldout FILE]
        [--judge-url URL --judge-model M] [--baseline RUN_DIR|base] [--out DIR]

The original PRefLexOR has no evaluation code (preflexor.md §6: its notebooks print a few generations, its trainers
log reward curves; Graph-PRefLexOR grades answers with an LLM judge). Here, for one model (definitions in metrics.py):
- preference metrics on the held-out pairs with the run's own loss (reference = the model the run started from,
  for stage 2 its `model.source`; ORPO and the base model need none), named as in training's held-out log;
- greedy answers to held-out questions: thinking-format compliance, quality against the grounded ground truth
  (token F1, ROUGE-L, recall of the knowledge graph's key concepts), answer length, tokens per second;
- optionally an LLM judge (any OpenAI-compatible endpoint): a 1-10 rubric and a pairwise win rate against a
  baseline's answers, asked in both orders to cancel position bias.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from preflexor import fast
from preflexor.checkpoint import DEFAULT_MODEL, load_model_and_tokenizer, read_run_config, run_model_source
from preflexor.config import DataConfig, LossConfig, RunConfig, from_dict
from preflexor.data import heldout_pairs, load_pairs, tokenize_for
from preflexor.errors import UserError, exit_on_user_error
from preflexor.losses import get_loss
from preflexor.metrics import (METRIC_DOC, RUBRIC_KEYS, Judge, _mean, corpus_graph, generate_responses, judge_answers,
                               score_answers, summarize_answers)
from preflexor.preference import evaluate_pairs, precompute_ref
from preflexor.runtime import setup_runtime
from preflexor.utils import atomic_write_json, atomic_write_text, git_hash, machine_info, save_png


def evaluate_run(run_dir: str | Path, n_questions: int = 16, max_new_tokens: int = 192, judge_url: str | None = None,
                 baseline_run: str | Path | None = None, out_dir: str | Path | None = None,
                 heldout: str | Path | None = None, questions: str | Path | None = None, judge_model: str = "default",
                 base_model: str | None = None, device: str = "auto", batch_size: int = 8,
                 command: str | None = None) -> dict:
    """Evaluate a run directory (or "base": the base model) and write eval.json, eval.md and eval.png.

    Args:
        run_dir: a run of train_orpo.py / train_dpo.py (its final/model is evaluated), or "base".
        n_questions: held-out questions answered greedily (the first n of the questions file).
        max_new_tokens: generation limit per answer.
        judge_url / judge_model: an OpenAI-compatible endpoint for the rubric (and pairwise) judge; None = no judge.
        baseline_run: a run dir or "base" whose answers the pairwise judge compares against (needs judge_url).
        out_dir: where to write (default: the run dir; required for "base").
        heldout: preference pairs for the reward metrics (default: the run's own held-out pairs; required for base).
        questions: the pairs whose questions are answered (default: the held-out pairs); share one to compare runs.
        base_model: the base model for "base" (default: smollm2-135m-instruct).
    """
    t_start = time.perf_counter()
    base_model = base_model or DEFAULT_MODEL
    is_base = str(run_dir) == "base"
    if is_base:
        if heldout is None and questions is None:
            raise UserError("evaluating 'base' needs --heldout FILE (held-out pairs, e.g. "
                            "runs/stage1/data/heldout.jsonl)")
        if out_dir is None:
            raise UserError("evaluating 'base' needs --out DIR")
        cfg = {"model": {"source": base_model}, "stage": 0}
    else:
        cfg = read_run_config(Path(run_dir))
    run_cfg = from_dict(RunConfig, cfg, where=f"{run_dir}/config.json")
    loss_cfg, data_cfg = (LossConfig(name="orpo"), DataConfig()) if is_base else (run_cfg.loss, run_cfg.data)
    if n_questions < 1 or max_new_tokens < 1:
        raise UserError(f"--n and --max-new-tokens must be >= 1 (got {n_questions}, {max_new_tokens})")
    if baseline_run is not None and judge_url is None:
        raise UserError("--baseline needs --judge-url (the pairwise comparison is made by the judge)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    if heldout is not None or is_base:
        held_desc = str(heldout if heldout is not None else questions)
        pairs = load_pairs(held_desc)
    else:
        pairs = heldout_pairs(Path(run_dir), cfg)
        held_desc = f"the run's held-out pairs ({cfg.get('data', {}).get('pairs') or 'data/heldout.jsonl'})"
    qrecords = (load_pairs(questions) if questions is not None else pairs)[:n_questions]
    rt = setup_runtime(device, "auto", verbose=False)

    # --- held-out pairs with the run's loss; the reference (stage 2: the model the run started from) first -----
    spec = get_loss(loss_cfg.name, key="loss.name")
    ref_source = cfg["model"]["source"] if spec.needs_ref else None
    source = run_model_source(run_dir, base_model)
    t0 = time.perf_counter()
    ref_cache = None
    if spec.needs_ref:
        ref_model, tok = _load(ref_source, rt, "reference model (the run's model.source)", run_cfg.model.fast)
        ref_cache = precompute_ref(ref_model, _examples(tok, pairs, data_cfg, loss_cfg), tok.pad_id, spec, rt, 4)
        del ref_model
    model, tok = _load(source, rt, "model", run_cfg.model.fast)
    examples = _examples(tok, pairs, data_cfg, loss_cfg)
    pm = evaluate_pairs(model, examples, tok.pad_id, loss_cfg, rt, ref_cache=ref_cache)
    t_pairs = time.perf_counter() - t0

    # --- greedy generations on the held-out questions, scored against the grounded ground truth ---------------
    prompts = [r["prompt"] for r in qrecords]
    gens = generate_responses(model, tok, prompts, max_new_tokens, data_cfg.system_prompt, batch_size)
    graph = corpus_graph(data_cfg.corpus) if data_cfg.corpus == "ontology" or Path(data_cfg.corpus).exists() else None
    rows = score_answers([g["response"] for g in gens["rows"]], qrecords, graph)
    for r, g in zip(rows, gens["rows"]):
        r["response_tokens"] = g["n_tokens"]
    gm = summarize_answers(rows)
    gm.update(tokens_per_s=gens["tokens_per_s"], response_tokens=_mean([g["n_tokens"] for g in gens["rows"]]),
              truncated_rate=_mean([float(g["n_tokens"] >= max_new_tokens) for g in gens["rows"]]))

    # --- optional LLM judge ------------------------------------------------------------------------------------
    jm = None
    if judge_url is not None:
        judge = Judge(judge_url, judge_model)  # before the baseline's generations: a bad URL fails fast
        baseline = None
        if baseline_run is not None:
            del model
            bmodel, btok = _load(run_model_source(baseline_run, base_model), rt, "baseline model", run_cfg.model.fast)
            bgen = generate_responses(bmodel, btok, prompts, max_new_tokens, data_cfg.system_prompt, batch_size)
            baseline = [g["response"] for g in bgen["rows"]]
            for r, b in zip(rows, baseline):
                r["baseline_response"] = b
            del bmodel
        jm = judge_answers(judge, rows, baseline)
        jm["baseline"] = None if baseline_run is None else str(baseline_run)

    metrics = {**{k: v for k, v in pm.items() if k not in ("margins", "n_pairs")}, **gm}
    if jm is not None:
        metrics.update({f"judge_{k}": jm[k] for k in (*RUBRIC_KEYS, "win_rate") if k in jm})
    result = {
        "run": str(run_dir), "model": source, "stage": cfg.get("stage"), "loss": loss_cfg.name,
        "reference": ref_source, "heldout": held_desc, "questions": str(questions) if questions else held_desc,
        "n_questions": len(rows), "max_new_tokens": max_new_tokens, "metrics": metrics,
        "pairs": {"n": pm["n_pairs"], "dropped": len(pairs) - pm["n_pairs"], "margins": pm["margins"]},
        "judge": jm, "samples": rows,
        "timing": {"pairs_s": round(t_pairs, 2), "generation_s": round(gens["seconds"], 2),
                   "total_s": round(time.perf_counter() - t_start, 2)},
        "git": git_hash(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
        "command": command or "python evaluate.py " + " ".join(sys.argv[1:]),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_eval(result, out / "eval.png")
    atomic_write_text(out / "eval.md", eval_markdown(result))
    atomic_write_json(out / "eval.json", result)  # last: its presence means the evaluation is complete
    return result


def _load(source: str | Path, rt, what: str, use_fast: bool):
    if str(source) != DEFAULT_MODEL and not Path(source).exists():
        raise UserError(f"{source}: {what} not found")
    model, tok = load_model_and_tokenizer(source, dtype=rt.dtype, device=rt.device, add_reasoning_tokens=True)
    return fast.install(model, use_fast).eval(), tok


def _examples(tok, pairs: list[dict], data_cfg, loss_cfg) -> list[dict]:
    """The held-out pairs tokenized and masked exactly as training's held-out evaluation does (mask seed 0)."""
    examples, dropped = tokenize_for(tok, pairs, data_cfg, loss_cfg, seed=0)
    if not examples:
        raise UserError(f"no usable held-out pairs ({dropped} dropped by truncation; raise data.max_length)")
    return examples


# -- Report: markdown and plots ----------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _clip(text: str, n: int = 300) -> str:
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= n else text[:n] + " …"


def eval_markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# Evaluation of `{result['run']}`", "",
             f"- model: `{result['model']}` (stage {result['stage']}, loss `{result['loss']}`"
             + (f", reference `{result['reference']}`)" if result["reference"] else ")"),
             f"- held-out pairs: {result['heldout']} ({result['pairs']['n']} pairs); questions: {result['questions']} "
             f"({result['n_questions']} answered greedily, max {result['max_new_tokens']} new tokens)",
             f"- command: `{result['command']}`", f"- commit {result['git']}, {result['date']}, "
             f"{result['machine']['cpu']} ({result['machine']['cores']} cores), torch {result['machine']['torch']}; "
             f"took {result['timing']['total_s']:.0f} s", "", "![plots](eval.png)", "",
             "| metric | value | meaning |", "|---|---|---|"]
    for k, v in m.items():
        lines.append(f"| {k} | {_fmt(v)} | {METRIC_DOC.get(k, 'LLM judge' if k.startswith('judge_') else '')} |")
    j = result.get("judge")
    if j:
        lines += ["", f"Judge: `{j['model']}` at {j['url']}; rubric 1-10 means: accuracy {_fmt(j['accuracy'])}, "
                  f"depth {_fmt(j['depth'])}, coherence {_fmt(j['coherence'])} ({j['unparsed_scores']} replies with a "
                  f"missing score)."]
        if j.get("baseline"):
            lines.append(f"Pairwise vs `{j['baseline']}` (both orders, ties = 1/2): win rate {_fmt(j['win_rate'])}, "
                         f"orders agreeing {_fmt(j['position_consistency'])}, unparsed {j['unparsed_pairs']}.")
    lines += ["", "## Answers", ""]
    for i, r in enumerate(result["samples"], 1):
        lines += [f"**{i}. {_clip(r['question'], 200)}**", "",
                  f"- scores: F1 {r['token_f1']:.3f}, ROUGE-L {r['rouge_l']:.3f}, concept recall "
                  f"{_fmt(r['concept_recall'])} of {r['key_concepts']}, well formed: {r['well_formed']}"
                  + (f" ({r['issue']})" if r["issue"] else ""),
                  f"- reference: {_clip(r['reference'])}", f"- answer: {_clip(r['answer'])}",
                  f"- response: {_clip(r['response'], 400)}", ""]
    return "\n".join(lines) + "\n"


def plot_eval(result: dict, path: Path) -> None:
    """Rates in [0, 1], held-out reward margins, and per-question answer quality against answer length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, rows = result["metrics"], result["samples"]
    rates = [k for k in ("format_rate", "opens_thinking_rate", "token_f1", "rouge_l", "concept_recall",
                         "rewards/accuracies", "logps/accuracies") if m.get(k) is not None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].barh(rates, [m[k] for k in rates], color="tab:blue")
    axes[0].set_xlim(0, 1)
    axes[0].set_title("rates (0-1)", fontsize=9)
    axes[0].tick_params(labelsize=8)
    margins = result["pairs"]["margins"]
    axes[1].hist(margins, bins=min(20, max(5, len(margins))), color="tab:green")
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set_title(f"held-out reward margins ({result['loss']})", fontsize=9)
    axes[2].scatter([r["answer_words"] for r in rows], [r["token_f1"] for r in rows], label="token F1", s=14)
    axes[2].scatter([r["answer_words"] for r in rows], [r["rouge_l"] for r in rows], label="ROUGE-L", s=14, marker="x")
    axes[2].set_xlabel("answer words", fontsize=8)
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=7)
    axes[2].set_title("per-question answer quality", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['run']}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


# -- CLI ---------------------------------------------------------------------------------------------------------------

@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Evaluate a PRefLexOR run (or the base model) on held-out data.")
    ap.add_argument("run", help="a run directory (runs/stage1, runs/stage2, ...) or 'base'")
    ap.add_argument("--n", type=int, default=16, help="held-out questions answered greedily (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--questions", help="JSONL of pairs whose questions are answered (default: the held-out pairs)")
    ap.add_argument("--heldout", help="JSONL of held-out pairs for the reward metrics (default: the run's own)")
    ap.add_argument("--judge-url", help="OpenAI-compatible endpoint of an LLM judge (e.g. http://127.0.0.1:8000/v1)")
    ap.add_argument("--judge-model", default="default")
    ap.add_argument("--baseline", help="run dir or 'base': pairwise win rate against its answers (needs --judge-url)")
    ap.add_argument("--base-model", default=None, help="the base model of 'base' (default smollm2-135m-instruct)")
    ap.add_argument("--out", help="output directory (default: the run directory)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    cmd = "python evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = evaluate_run(args.run, args.n, args.max_new_tokens, args.judge_url, args.baseline, args.out, args.heldout,
                       args.questions, args.judge_model, args.base_model, args.device, args.batch_size, cmd)
    out = Path(args.out or args.run)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res["metrics"].items()}))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return res


if __name__ == "__main__":
    main()
