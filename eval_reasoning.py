"""The reasoning evaluation (issue 19): does the model answer better with its thinking, and does the answer follow
the thinking? On the fixed held-out set of `tasks.answer_set` (the same questions for every run: held-out
concepts, gold answers computed from the knowledge graph), for each model given:

- exact accuracy of greedy answers with a bootstrap 95% interval; format, opens-thinking and truncated rates;
  factuality of the thinking (stated is-a relations true in the graph); a model saved by a training run with the
  same set and budget (`train.eval_answers`) has this part read from the evaluation the run kept;
- the probe (`metrics.thinking_probe`): the answer with the correct thinking pre-filled vs with a decoy that follows
  a wrong path: how often it follows each;
- with `--recursive N`: accuracy against N = 1..N answers with the grounded critic (`reasoning.GraphCritic`), with
  and without its integration.

    python eval_reasoning.py base runs/stage1 runs/stage2 [--n 200] [--probe 200] [--recursive 3] --out DIR

Writes DIR/reasoning.json (everything, samples included) and DIR/reasoning.md (the table).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from preflexor import fast
from preflexor.checkpoint import DEFAULT_MODEL, load_model_and_tokenizer, read_run_config
from preflexor.datagen import DatagenConfig, build_sources
from preflexor.errors import UserError, exit_on_user_error
from preflexor.metrics import graded_accuracy, load_answer_eval, paired_delta, recursion_accuracy, thinking_probe
from preflexor.reasoning import GraphCritic
from preflexor.runtime import setup_runtime
from preflexor.tasks import EVAL_SEED, RelationChecker, answer_set
from preflexor.utils import atomic_write_json, atomic_write_text, git_hash, machine_info


def model_path(run: str) -> str:
    """`base` -> the default base model; a run directory -> its final/model; anything else as given."""
    if run == "base":
        return DEFAULT_MODEL
    p = Path(run)
    if (p / "final" / "model").is_dir():
        return str(p / "final" / "model")
    if p.is_dir() or run == DEFAULT_MODEL:
        return run
    raise UserError(f"{run}: not a run directory, model directory or 'base'")


def evaluate(run: str, examples: list[dict], checker: RelationChecker, max_new_tokens: int, probe: int,
             recursive: int, device: str = "auto", batch_size: int = 16) -> dict:
    rt = setup_runtime(device, "auto")
    data = read_run_config(Path(run)).get("data", {}) if run != "base" and (Path(run) / "config.json").is_file() \
        else {}
    system = data.get("system_prompt")
    model, tok = load_model_and_tokenizer(model_path(run), dtype=rt.dtype, device=rt.device,
                                          add_reasoning_tokens=True)
    model = fast.install(model, True).eval()
    t0 = time.perf_counter()
    acc = graded_accuracy(model, tok, examples, max_new_tokens, system, None, checker, model_path(run), batch_size)
    out = {"run": run, "model": model_path(run), "answers": acc, "answers_kept_from_training":
           load_answer_eval(model_path(run), acc["key"]) is not None}
    if probe:  # the pre-filled thinking laid out as this run's training data (with or without the KG section)
        kg = data.get("kg_triples", DatagenConfig.kg_triples) > 0
        shown = examples if kg else answer_set(checker.h.graph, probe, kg_section=False)
        out["probe"] = thinking_probe(model, tok, shown[:probe], system=system, batch_size=batch_size)
    if recursive > 1:
        out["recursion"] = recursion_accuracy(model, tok, examples, GraphCritic(checker), recursive, max_new_tokens,
                                              system=system, batch_size=batch_size,
                                              first=[s["response"] for s in acc["samples"]])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _ci(x) -> str:
    return f"[{x[0]:.3f}, {x[1]:.3f}]"


def markdown(result: dict) -> str:
    lines = [f"# Reasoning evaluation ({result['n']} held-out questions, tasks.answer_set seed {EVAL_SEED}, "
             f"budget {result['max_new_tokens']} tokens)", "", f"Command: `{result['command']}` at {result['git']}.",
             "", f"| model | exact accuracy (95% CI) | difference to {result['models'][0]['run']} (paired 95% CI) | "
             "format | opens thinking | truncated | factuality |", "|---|---|---|---|---|---|---|"]
    first = result["models"][0]["answers"]
    for r in result["models"]:
        a = r["answers"]
        fact = "-" if a["factuality"] is None else f"{a['factuality']:.3f}"
        d = paired_delta(first, a)
        lines.append(f"| {r['run']} | {a['exact_accuracy']:.3f} {_ci(a['ci95'])} | {d['delta']:+.3f} {_ci(d['ci95'])} "
                     f"| {a['format_rate']:.2f} | {a['opens_thinking_rate']:.2f} | {a['truncated_rate']:.2f} | {fact} |")
    if any("probe" in r for r in result["models"]):
        lines += ["", "Probe: the answer after a pre-filled correct thinking vs a decoy thinking that follows a "
                  "wrong path.", "", "| model | n | gold answer under correct thinking | decoy answer under decoy | "
                  "gold answer under decoy |", "|---|---|---|---|---|"]
        for r in result["models"]:
            if "probe" in r:
                p = r["probe"]
                lines.append(f"| {r['run']} | {p['n']} | {p['follows_correct']:.3f} {_ci(p['follows_correct_ci95'])} "
                             f"| {p['follows_decoy']:.3f} {_ci(p['follows_decoy_ci95'])} | "
                             f"{p['gold_under_decoy']:.3f} {_ci(p['gold_under_decoy_ci95'])} |")
    if any("recursion" in r for r in result["models"]):
        lines += ["", "Recursive reasoning with the grounded critic (reasoning.GraphCritic), accuracy against N "
                  "answers:", "", "| model | N | last answer (95% CI) | against N = 1 (paired 95% CI) | integrated (95% CI) "
                  "| thinking factuality |", "|---|---|---|---|---|---|"]
        for r in result["models"]:
            for row in r.get("recursion", {}).get("rounds", []):
                fact = "-" if row["factuality"] is None else f"{row['factuality']:.3f}"
                gain = f"{row['vs_first']:+.3f} {_ci(row['vs_first_ci95'])}" if "vs_first" in row else "-"
                lines.append(f"| {r['run']} | {row['N']} | {row['accuracy']:.3f} {_ci(row['ci95'])} | {gain} | "
                             f"{row['integrated']:.3f} {_ci(row['integrated_ci95'])} | {fact} |")
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories, model directories or 'base'")
    ap.add_argument("--n", type=int, default=200, help="questions of the fixed held-out set (default 200)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="budget per answer (fits every chosen thinking and "
                    "answer; the training configs' train.eval_answer_tokens)")
    ap.add_argument("--probe", type=int, default=200, help="questions for the probe (0 = none)")
    ap.add_argument("--recursive", type=int, default=0, help="N >= 2: accuracy against N with the graph critic")
    ap.add_argument("--corpus", default="ontology")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", required=True, help="output directory (reasoning.json, reasoning.md)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 1 or args.probe < 0:
        raise UserError(f"--n and --max-new-tokens must be >= 1, --probe >= 0 (got {args.n}, "
                        f"{args.max_new_tokens}, {args.probe})")
    for run in args.runs:
        model_path(run)  # a typo fails before any model is loaded
    graph = build_sources(DatagenConfig(corpus=args.corpus, retrieval="none"))[2]
    examples, checker = answer_set(graph, args.n), RelationChecker(graph)
    models = []
    for run in tqdm(args.runs, desc="models", unit="model"):
        models.append(evaluate(run, examples, checker, args.max_new_tokens, min(args.probe, args.n), args.recursive,
                               args.device, args.batch_size))
        print(markdown({"n": args.n, "max_new_tokens": args.max_new_tokens, "command": "", "git": "",
                        "models": models[-1:]}).split("\n\n", 2)[-1])
    result = {"n": args.n, "max_new_tokens": args.max_new_tokens, "corpus": args.corpus, "eval_seed": EVAL_SEED,
              "command": "python " + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "git": git_hash(), "machine": machine_info(), "models": models}
    out = Path(args.out)
    atomic_write_text(out / "reasoning.md", markdown(result))
    atomic_write_json(out / "reasoning.json", result)
    return result


if __name__ == "__main__":
    main()
