"""Answer questions with a PRefLexOR model: plainly, or recursively with a critic (preflexor.md §5).

    python infer.py "How do biological materials fail gracefully?"            # one question
    python infer.py "..." --recursive 3                                       # critic rounds + integration
    python infer.py "..." --recursive 2 --reflect                             # the model's own reflection as feedback
    python infer.py                                                           # interactive (in a terminal)
    python infer.py --input questions.jsonl --output results.jsonl            # {"question"|"prompt": ...} per line
    python infer.py --serve --port 8000                                       # OpenAI-compatible server
    python infer.py "..." --config configs/infer.yaml max_new_tokens=128      # YAML + key=value overrides

The model defaults to the newest `runs/stage2*/final/model`, else `runs/stage1*/final/model`, else the embedded
SmolLM2; the critic to the base model that run was trained from (via the runs' `config.json`). Either may be an
http(s):// URL of any OpenAI-compatible endpoint; `--critic graph` (or `graph:<corpus>`) is the offline critic grounded
in the knowledge graph of the run's corpus (`reasoning.GraphCritic`). Every question ends with the thinking trigger
" Use <|thinking|>.".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from preflexor.config import at_least, load_config, within
from preflexor.errors import UserError, exit_on_user_error
from preflexor.utils import append_jsonl, json_line

ROOT = Path(__file__).resolve().parent
HISTORY = Path.home() / ".preflexor_history"
RULE = "──"


@dataclass
class InferConfig:
    RANGES: ClassVar[dict] = {"recursive": at_least(0), "max_new_tokens": at_least(1),
                              "critic_max_new_tokens": at_least(1), "temperature": at_least(0),
                              "critic_temperature": at_least(0), "top_k": at_least(1),
                              "top_p": within(0, 1, open_lo=True), "port": within(0, 65535)}
    model: str | None = None  # checkpoint dir | .gguf | default name | http(s) URL; None = newest run
    critic: str | None = None  # same kinds, or graph[:corpus]; None = the base model the reasoner was trained from
    http_model: str = "default"  # model name sent to an HTTP endpoint
    prefix_mode: str = "continue"  # HTTP reasoner: continue a pre-filled assistant turn, or "fold" it into the user's
    recursive: int = 0  # 0 = one plain answer; N >= 1 = N rounds (thinking: N answers; reflection: N iterations)
    reflect: bool = False  # the reflection variant (§5.2); with recursive 0 it runs one iteration
    integrate: bool = True  # the critic's final integration of all answers (False: ablation)
    max_new_tokens: int = 512
    critic_max_new_tokens: int | None = None  # None = max_new_tokens
    temperature: float = 0.1  # reference notebooks: 0.1 for reasoner and critic
    critic_temperature: float = 0.1
    top_k: int | None = 50
    top_p: float | None = 0.9
    seed: int = 0
    system: str | None = None  # reasoner system prompt; None = the chat format's default, as in training
    open_thinking: bool = False  # pre-fill "<|thinking|>" in the first answer
    device: str = "auto"  # auto | cpu | cuda (env PREFLEXOR_DEVICE overrides)
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    fast: bool = True  # the speed paths (preflexor/fast/); PREFLEXOR_FAST=0/1 overrides
    runs_dir: str = "runs"
    host: str = "127.0.0.1"
    port: int = 8000


# -- model discovery -----------------------------------------------------------------------------------------------

def newest_run_model(runs_dir: str | Path) -> tuple[str | None, str]:
    """The newest `<runs>/stage2*/final/model`, else `<runs>/stage1*/final/model` (the merged HF model the training
    scripts write; by modification time), and why."""
    runs = Path(runs_dir)
    for stage in ("stage2", "stage1"):
        finals = [p for p in runs.glob(f"{stage}*/final/model") if (p / "config.json").is_file()]
        if finals:
            return str(max(finals, key=lambda p: p.stat().st_mtime)), f"newest {stage} run in {runs}/"
    return None, f"no trained run in {runs}/"


def _run_config(path: Path) -> dict | None:
    """A training run's resolved config.json (it has a `model.source`; an HF config.json has not)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return cfg if isinstance(model, dict) and isinstance(model.get("source"), str) else None


def corpus_of(source: str) -> str | None:
    """The `data.corpus` of the run a checkpoint belongs to (None when not inside a run)."""
    p = Path(source)
    cfg = next((c for d in (p.parent, p.parent.parent) if (c := _run_config(d / "config.json"))), None)
    corpus = (cfg or {}).get("data", {}).get("corpus") if isinstance((cfg or {}).get("data"), dict) else None
    return corpus if isinstance(corpus, str) else None


def base_model_of(source: str) -> str | None:
    """The model a checkpoint was trained from: the `model.source` of its run's resolved config.json (in the dir
    above `final/` or `checkpoints/`), followed back (stage 2 → stage 1 → base); None when not inside a run."""
    seen, cur, found = set(), source, None
    while cur not in seen and not cur.startswith(("http://", "https://")):
        seen.add(cur)
        p = Path(cur)
        cfg = next((c for d in (p.parent, p.parent.parent) if (c := _run_config(d / "config.json"))), None)
        if cfg is None:
            break
        found = cur = cfg["model"]["source"]
    return found


# -- building the generators ---------------------------------------------------------------------------------------

def _load(cfg: InferConfig, source: str, add_reasoning_tokens: bool = True):
    """A model and tokenizer on the config's device and dtype, with the speed paths unless `fast: false`."""
    from preflexor import fast
    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.runtime import resolve_device

    device, dtype, _ = resolve_device(cfg.device, cfg.dtype, key="device")
    model, tok = load_model_and_tokenizer(source, dtype=dtype, device=device, add_reasoning_tokens=add_reasoning_tokens)
    return fast.install(model, cfg.fast), tok


def _check_source(source: str, what: str) -> None:
    from preflexor.checkpoint import DEFAULT_MODEL

    if source == DEFAULT_MODEL or source.startswith(("http://", "https://")) or Path(source).expanduser().exists():
        return
    raise UserError(f"{source}: {what} not found (an HF checkpoint dir, a .gguf file, {DEFAULT_MODEL!r} or an "
                    f"http(s):// URL)")


@dataclass
class Loaded:
    source: str  # what the reasoner was loaded from
    reasoner: object
    critic: object | None
    model: object | None  # the reasoner's Transformer (None for an HTTP reasoner)
    tok: object | None


def build_generators(cfg: InferConfig, need_critic: bool, log=print) -> Loaded:
    """The reasoner (and critic) generators for the config; logs what was chosen and why."""
    from preflexor.checkpoint import DEFAULT_MODEL
    from preflexor.reasoning import HTTPGenerator, ModelGenerator

    source, why = cfg.model, "given"
    if source is None:
        source, why = newest_run_model(cfg.runs_dir)
        source = source or DEFAULT_MODEL
    _check_source(source, "model")
    critic_src, cwhy = cfg.critic, "given"
    if need_critic and critic_src is None:
        base = base_model_of(source)
        critic_src, cwhy = (base, "base model of the run") if base else (source, "same as the model")
    graph_critic = need_critic and (critic_src == "graph" or critic_src.startswith("graph:"))
    if need_critic and not graph_critic:
        _check_source(critic_src, "critic model")
    log(f"model: {source} ({why})")
    model = tok = None
    if source.startswith(("http://", "https://")):
        reasoner = HTTPGenerator(source, cfg.http_model, prefix_mode=cfg.prefix_mode, name="reasoner")
    else:
        model, tok = _load(cfg, source)
        reasoner = ModelGenerator(model, tok, cfg.top_k, cfg.top_p, cfg.seed, name="reasoner")
    if not need_critic:
        return Loaded(source, reasoner, None, model, tok)
    if graph_critic:
        from preflexor.datagen import DatagenConfig, build_sources
        from preflexor.reasoning import GraphCritic

        corpus = critic_src.partition(":")[2] or corpus_of(source) or "ontology"
        log(f"critic: the knowledge graph of corpus {corpus!r} (offline, grounded)")
        return Loaded(source, reasoner, GraphCritic(build_sources(DatagenConfig(corpus=corpus, retrieval="none"))[2]),
                      model, tok)
    log(f"critic: {critic_src} ({cwhy})")
    if critic_src.startswith(("http://", "https://")):
        critic = HTTPGenerator(critic_src, cfg.http_model, name="critic")
    else:
        # a separately loaded critic keeps its own vocabulary: reasoning tags in its prompts stay plain text
        shared = critic_src == source and model is not None
        cmodel, ctok = (model, tok) if shared else _load(cfg, critic_src, add_reasoning_tokens=False)
        critic = ModelGenerator(cmodel, ctok, cfg.top_k, cfg.top_p, cfg.seed + 1_000_003, name="critic")
    return Loaded(source, reasoner, critic, model, tok)


def make_answer_fn(cfg: InferConfig, reasoner, critic):
    """question -> ReasoningResult, with the config's variant, rounds and sampling (keyword overrides allowed)."""
    from preflexor.reasoning import recursive_reflection, recursive_thinking

    def answer(question: str, on_step=None, **over):
        c = dataclasses.replace(cfg, **over)
        kw = dict(integrate=c.integrate, temperature=c.temperature, critic_temperature=c.critic_temperature,
                  max_new_tokens=c.max_new_tokens, critic_max_new_tokens=c.critic_max_new_tokens, system=c.system,
                  open_thinking=c.open_thinking, on_step=on_step)
        if c.reflect:
            return recursive_reflection(question, reasoner, critic, max(c.recursive, 1), **kw)
        if c.recursive <= 0:  # one plain answer: round 0 only, no critic
            return recursive_thinking(question, reasoner, None, 1, **{**kw, "integrate": False})
        return recursive_thinking(question, reasoner, critic, c.recursive, **kw)

    return answer


# -- output --------------------------------------------------------------------------------------------------------

def block_printer(recursive: bool, out=sys.stdout):
    """An `on_step` that prints each step as a headed block as soon as it is done."""
    def show(what: str, rnd: int, text: str) -> None:
        head = what if (not recursive or what == "integrated answer") else f"round {rnd} · {what}"
        print(f"{RULE} {head} {RULE}\n{text.strip() or '(empty)'}\n", file=out, flush=True)
    return show


def summary_line(result) -> str:
    d = result.to_dict()
    return (f"{d['n_calls']} model call(s), {d['prompt_tokens']} prompt + {d['completion_tokens']} completion "
            f"tokens, {d['seconds']:.1f}s")


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def answer_and_print(answer, question: str, cfg: InferConfig, as_json: bool) -> None:
    recursive = cfg.recursive > 0 or cfg.reflect
    result = answer(question, on_step=None if as_json else block_printer(recursive))
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    for i in result.issues:
        print(f"note: round {i['round']} {i['step']}: {i['issue']}", file=sys.stderr)
    print(summary_line(result), file=sys.stderr)


# -- modes ---------------------------------------------------------------------------------------------------------

def read_questions(path: Path) -> list[tuple[int, str]]:
    """(line number, question) for every non-blank line; each line is {"question": str} or {"prompt": str}."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json_line(line)
            except ValueError as e:
                raise UserError(f"{path}:{n}: {e}") from None
            q = rec.get("question", rec.get("prompt")) if isinstance(rec, dict) else None
            if not isinstance(q, str) or not q.strip():
                raise UserError(f"{path}:{n}: expected an object with a non-empty string 'question' or 'prompt'")
            out.append((n, q))
    return out


def _done_lines(path: Path) -> dict[int, str]:
    """Input lines already answered in an existing output file (resume). Every line must be a row this program
    wrote; a torn last line (an interrupted append) is cut away once an earlier row shows the file is ours, and a
    file that is not ours is refused, never changed."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    done: dict[int, str] = {}
    pos = 0
    for n, line in enumerate(data.split(b"\n"), 1):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json_line(line)
            done[int(rec["line"])] = rec["question"]
        except (ValueError, KeyError, TypeError) as e:
            if pos <= len(data):  # a complete line: not a row of ours
                raise UserError(f"{path}:{n}: not an infer.py results row ({str(e) or type(e).__name__}); use "
                                f"another --output") from None
            if not done:
                raise UserError(f"{path}:{n}: not an infer.py results file (refusing to change it); use another "
                                f"--output") from None
            with open(path, "r+b") as f:
                f.truncate(start)
            print(f"removed a torn last line from {path} (line {n})", file=sys.stderr)
    return done


def run_batch(answer, input_path: Path, output_path: Path) -> int:
    """Answer every question of the input JSONL, appending one row per question (fsync'd) to the output; a failing
    question gives `{"line", "question", "error"}`. Rows already in the output are skipped. Returns #errors."""
    questions = read_questions(input_path)
    done = _done_lines(output_path)
    todo = [(n, q) for n, q in questions if done.get(n) != q]
    if len(todo) < len(questions):
        print(f"resuming: {len(questions) - len(todo)} of {len(questions)} already in {output_path}", file=sys.stderr)
    errors = 0
    for k, (n, q) in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            row = {"line": n, "question": q, **answer(q).to_dict()}
            status = "ok"
        except Exception as e:  # noqa: BLE001 — one failing question must not end the batch
            row = {"line": n, "question": q, "error": f"{type(e).__name__}: {_one_line(e)}"}
            status, errors = f"error: {row['error']}", errors + 1
        append_jsonl(output_path, row)
        print(f"[{k}/{len(todo)}] line {n}: {status} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    print(f"wrote {len(todo)} result(s) to {output_path} ({errors} error(s))", file=sys.stderr)
    return errors


def run_interactive(answer, cfg: InferConfig, as_json: bool) -> None:
    import readline

    try:
        readline.read_history_file(HISTORY)
    except (FileNotFoundError, OSError):
        pass
    readline.set_history_length(1000)
    print("Ask a question (empty line skips; Ctrl-D or 'exit' quits).", file=sys.stderr)
    try:
        while True:
            try:
                q = input("\n> ").strip()
            except EOFError:
                print(file=sys.stderr)
                break
            if q in ("exit", "quit"):
                break
            if not q:
                continue
            try:
                answer_and_print(answer, q, cfg, as_json)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            except KeyboardInterrupt:
                print("\n(interrupted)", file=sys.stderr)
    finally:
        try:
            readline.write_history_file(HISTORY)
        except OSError:
            pass


def recursive_fn_for(answer):
    """The server's `recursive: N` hook: the last user message is the question (a system message is kept), N the
    rounds; the variant (thinking or reflection) is the one infer.py was started with. The reply's content is the
    final answer, its `preflexor_trace` the whole `ReasoningResult`."""
    def recursive_fn(messages: list[dict], rounds: int, temperature: float = 0.1, max_tokens: int = 512) -> dict:
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise UserError("a recursive request needs a user message")
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        res = answer(users[-1], recursive=rounds, temperature=temperature, critic_temperature=temperature,
                     max_new_tokens=max_tokens, system=system)
        d = res.to_dict()
        return {"content": res.final_answer, "prompt_tokens": d["prompt_tokens"],
                "completion_tokens": d["completion_tokens"], "finish_reason": "stop", "trace": d}

    return recursive_fn


def run_server(cfg: InferConfig, model, tok, answer, name: str) -> None:
    from preflexor import server

    if model is None:
        raise UserError("--serve needs a local model, not an http(s):// URL")
    server.serve(model, tok, host=cfg.host, port=cfg.port, model_name=name, recursive_fn=recursive_fn_for(answer))


# -- command line --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, InferConfig, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Positional words form the question; words like key=value (an InferConfig "
                                       "key) are config overrides.")
    p.add_argument("words", nargs="*", help="the question, and/or key=value overrides")
    p.add_argument("--config", default=None, help="YAML config (default: configs/infer.yaml)")
    p.add_argument("--model", help="reasoning model: checkpoint dir, .gguf, default name or http(s) URL")
    p.add_argument("--critic", help="critic: checkpoint dir, .gguf, default name, http(s) URL, or graph[:corpus] "
                   "(offline, grounded in the knowledge graph)")
    p.add_argument("--recursive", type=int, metavar="N", help="N rounds of critique and re-answering")
    p.add_argument("--reflect", action="store_const", const=True, help="use the model's own reflection as feedback")
    p.add_argument("--no-integrate", dest="integrate", action="store_const", const=False,
                   help="skip the final integration (ablation)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--input", type=Path, help="JSONL of {\"question\": ...} (or \"prompt\") per line")
    p.add_argument("--output", type=Path, help="JSONL of results (appended; default: <input>.results.jsonl)")
    p.add_argument("--json", action="store_true", help="print each result as one JSON line")
    p.add_argument("--serve", action="store_true", help="run the OpenAI-compatible server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    args = p.parse_intermixed_args(argv)

    keys = {f.name for f in dataclasses.fields(InferConfig)}
    overrides = [w for w in args.words if "=" in w and w.split("=", 1)[0].strip() in keys]
    question = " ".join(w for w in args.words if w not in overrides).strip()
    for flag in ("model", "critic", "recursive", "reflect", "integrate", "max_new_tokens", "temperature", "seed",
                 "host", "port"):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{flag}={json.dumps(v)}")  # JSON is YAML: strings stay strings
    config = args.config
    if config is None and (ROOT / "configs" / "infer.yaml").is_file():
        config = ROOT / "configs" / "infer.yaml"
    cfg = load_config(InferConfig, config, overrides)  # ranges: InferConfig.RANGES
    return args, cfg, question


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args, cfg, question = parse_args(argv)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731 — status lines go to stderr, answers to stdout
    if args.input is not None:
        read_questions(args.input)  # fail on a bad file before loading any model
    elif args.output is not None:
        raise UserError("--output needs --input")
    if not (question or args.input or args.serve) and not sys.stdin.isatty():
        question = sys.stdin.read().strip()
        if not question:
            raise UserError("no question: pass one as an argument, use --input FILE, or run in a terminal")
    need_critic = cfg.recursive > 0 or cfg.reflect or args.serve
    g = build_generators(cfg, need_critic, log)
    answer = make_answer_fn(cfg, g.reasoner, g.critic)
    if args.serve:
        run_server(cfg, g.model, g.tok, answer, g.source)
    elif args.input is not None:
        run_batch(answer, args.input, args.output or args.input.with_suffix(".results.jsonl"))
    elif question:
        answer_and_print(answer, question, cfg, args.json)
    else:
        run_interactive(answer, cfg, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
