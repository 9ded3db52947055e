"""Resume and checkpoint faults (issue 20): a damaged state.json is one line naming the checkpoint and the key; a
resume with changed settings is refused unless asked; a refused command leaves the run directory byte-identical;
what a kill during a checkpoint write leaves behind (an incomplete newest checkpoint, atomic_dir's temporaries, the
steps logged after the last complete checkpoint, a torn log line) is skipped, cleaned or cut, and the resumed run is
still bit-identical. Kills are simulated by building their leftovers on disk from a real run's files.

One tiny run (3 steps, a checkpoint after each) is trained once; each test resumes a copy of it in process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import train_orpo
from preflexor.errors import UserError
from preflexor.metrics import MetricsLog
from preflexor.resume import FREE_KEYS, changed_settings, read_checkpoint, rng_states, save_checkpoint, tidy_run_dir
from preflexor.resume import snapshot as ckpt_snapshot
from preflexor.runtime import Runtime
from test_train import adapter_tensors, tiny_args, write_pairs


def fails(capsys, argv, needle: str) -> str:
    """`train_orpo.main(argv)` must exit 2 with one stderr line, `error: ...` containing `needle`, no traceback."""
    with pytest.raises(SystemExit) as e:
        train_orpo.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path: what a refused command must leave as it was."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """A finished 3-step run (checkpoints step_1..3) and `argv(out, *extra)`, the command that trained it."""
    root = tmp_path_factory.mktemp("resume_faults")
    pairs = write_pairs(root / "pairs.jsonl")

    def argv(out: Path, *extra: str) -> list[str]:
        return ["--config", "configs/stage1_grounded.yaml", *tiny_args(
            tiny_llama_dir, pairs, out, "train.iterations=1", "train.eval_generations=0", "train.keep_last=3",
            "train.save_merged=false", *extra)]

    train_orpo.main(argv(root / "run"))
    return root / "run", argv


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, to damage."""
    src, argv = trained
    out = tmp_path / "run"
    shutil.copytree(src, out)
    return out, argv


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# -- state.json ----------------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt_dir(tmp_path) -> Path:
    """A real checkpoint of a tiny module (no training script)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    state = {"iteration": 0, "step_in_iteration": 1, "global_step": 1, "position": 2}
    rng = rng_states(Runtime(torch.device("cpu"), torch.float32, None))
    return save_checkpoint(tmp_path / "checkpoints", 1, ckpt_snapshot(model, opt), state, keep_last=2, rng=rng, config={})


@pytest.mark.parametrize("edit, needle", [
    (lambda s: {}, "missing keys 'step', 'iteration', 'step_in_iteration', 'global_step', 'position', "
                   "'python_random'"),
    (lambda s: {k: v for k, v in s.items() if k != "python_random"}, "missing key 'python_random'"),
    (lambda s: [], "expected a JSON object, got list"),
    (lambda s: {**s, "global_step": "1"}, "'global_step' must be an integer >= 0, got '1'"),
    (lambda s: {**s, "position": -4}, "'position' must be an integer >= 0, got -4"),
    (lambda s: {**s, "python_random": {}}, "'python_random' must be a JSON array, got dict"),
    (lambda s: {**s, "python_random": []}, "RNG states do not match (1 torch, 0 Python)"),
    (lambda s: {**s, "python_random": [[3, [1, 2], None]]}, "corrupt RNG state"),
    (lambda s: {**s, "config": "x"}, "'config' must be a JSON object, got str"),
])
def test_a_damaged_state_json_is_one_line_naming_the_key(ckpt_dir, edit, needle):
    read_checkpoint(ckpt_dir)  # the good one reads
    state = json.loads((ckpt_dir / "state.json").read_text())
    (ckpt_dir / "state.json").write_text(json.dumps(edit(state)))
    with pytest.raises(UserError) as e:
        read_checkpoint(ckpt_dir)
    assert str(e.value).startswith(f"{ckpt_dir / 'state.json'}: ") or str(e.value).startswith(f"{ckpt_dir}: ")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_empty_state_json_through_the_script(run, capsys):
    out, argv = run
    ckpt = out / "checkpoints" / "step_3"
    (ckpt / "state.json").write_text("{}")
    before = snapshot(out)
    fails(capsys, argv(out, f"train.resume={ckpt}"), f"{ckpt / 'state.json'}: missing keys 'step'")
    assert snapshot(out) == before  # the explicit checkpoint is an error, not a fallback; nothing written


# -- changed settings ------------------------------------------------------------------------------------------------

def test_changed_settings_names_what_changes_the_optimisation():
    old = {"train": {"lr": 1e-3, "schedule": "constant", "iterations": 1, "out_dir": "a", "eval_every": 0},
           "loss": {"name": "orpo", "beta": 0.1}, "git": "abc", "stage": 1}
    same = {**old, "train": {**old["train"], "out_dir": "b", "eval_every": 2, "iterations": 5}, "git": "def"}
    assert changed_settings(old, same) == []  # where it writes, how often it evaluates, a longer constant run
    new = {"train": {**old["train"], "lr": 2e-3}, "loss": {"name": "sigmoid", "gamma": 0.5}}
    assert changed_settings(old, new) == ['train.lr 0.001 -> 0.002', 'loss.name "orpo" -> "sigmoid"',
                                          "loss.gamma unset -> 0.5", "loss.beta 0.1 -> unset"]
    cosine = {**old, "train": {**old["train"], "schedule": "cosine"}}
    assert changed_settings(cosine, {**cosine, "train": {**cosine["train"], "iterations": 2}}) == [
        "train.iterations 1 -> 2"]  # the total sets every step's rate under cosine
    assert {"train.allow_resume_changes", "train.resume"} <= FREE_KEYS


def test_a_changed_learning_rate_or_loss_is_refused_unless_allowed(run, capsys):
    out, argv = run
    before = snapshot(out)
    fails(capsys, argv(out, "train.lr=2e-3", "loss.beta=0.5"),
          "step_3: trained with other settings (loss.beta 0.1 -> 0.5, train.lr 0.001 -> 0.002); rerun with the same")
    assert snapshot(out) == before
    train_orpo.main(argv(out, "train.lr=2e-3", "loss.beta=0.5", "train.allow_resume_changes=true"))
    stdout = capsys.readouterr().out
    assert "resume: continuing with changed settings (train.allow_resume_changes): loss.beta 0.1 -> 0.5, " \
           "train.lr 0.001 -> 0.002" in stdout and "resumed from" in stdout
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 2e-3  # the run now follows the new one


def test_a_refused_lora_rank_leaves_config_json_as_it_was(run, capsys):
    """The resume is checked before config.json (which infer.py follows) is written: a refused command leaves the
    run's files byte-identical, whichever check refuses it."""
    out, argv = run
    before = snapshot(out)
    fails(capsys, argv(out, "lora.r=8"), "lora.r 4 -> 8")
    fails(capsys, argv(out, "lora.r=8", "train.allow_resume_changes=true"), "shape mismatch for")
    assert snapshot(out) == before


# -- what a kill during a checkpoint write leaves ----------------------------------------------------------------------

def test_kill_leftovers_are_skipped_cleaned_and_cut_and_the_resume_is_bit_identical(run, trained, capsys):
    out, argv = run
    ckpts = out / "checkpoints"
    (ckpts / "step_3" / "optimizer.pt").unlink()  # the newest checkpoint incomplete
    (ckpts / ".step_3.k2j4_x.tmp").mkdir()  # atomic_dir's temporary, the kill inside the `with`
    shutil.copytree(ckpts / "step_2", ckpts / ".step_4.old")  # a kill between atomic_dir's two renames
    (out / ".metrics.jsonl.ab12cd.tmp").write_text("{")  # atomic_write's temporary
    mine = [ckpts / ".step_3.keep", out / "notes.tmp", out / ".my.json.x.tmp"]  # not ours: left alone
    for p in mine:
        p.write_text("user")
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"loss": 1.0, "st')  # a line torn by the kill
    train_orpo.main(argv(out))
    stdout = capsys.readouterr().out
    assert f"resume: skipped {ckpts / 'step_3'}: not a complete checkpoint (missing optimizer.pt)" in stdout
    assert f"resumed from {ckpts / 'step_2'} (step 2)" in stdout
    assert f"{ckpts}: removed step_3 (after the resume point, step 2)" in stdout
    assert f"{out / 'metrics.jsonl'}: dropped 3 lines written after step 2 (logged again)" in stdout
    assert sorted(p.name for p in ckpts.iterdir()) == [".step_3.keep", "step_1", "step_2", "step_3"]
    assert not (out / ".metrics.jsonl.ab12cd.tmp").exists() and all(p.read_text() == "user" for p in mine)
    read_checkpoint(ckpts / "step_3")  # whole again
    recs = records(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]  # every step once
    assert [r["step"] for r in recs if "eval/loss" in r] == [0, 3]
    ref = adapter_tensors(trained[0])
    got = adapter_tensors(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_an_explicit_incomplete_checkpoint_is_an_error(run, capsys):
    out, argv = run
    ckpt = out / "checkpoints" / "step_3"
    (ckpt / "rng.safetensors").unlink()
    before = snapshot(out)
    fails(capsys, argv(out, f"train.resume={ckpt}"), f"{ckpt}: not a complete checkpoint (missing rng.safetensors)")
    assert snapshot(out) == before


def test_rerunning_a_finished_run_logs_no_step_twice(run, trained, capsys):
    """Resumed at its last step, the run trains nothing and takes its last evaluation from the checkpoint instead
    of evaluating (and logging) step 3 again."""
    out, argv = run
    log = (out / "metrics.jsonl").read_bytes()
    train_orpo.main(argv(out))
    assert "resumed from" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_bytes() == log
    assert json.loads((out / "summary.json").read_text())["eval"] == json.loads(
        (trained[0] / "summary.json").read_text())["eval"]


def test_metrics_truncate_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(5):
        log.log({"step": step, "loss": 1.0 / (step + 1)})
    log.log({"note": "no step"})
    assert log.truncate(9) == 0  # nothing after step 9: the file is not rewritten
    with open(log.path, "ab") as f:
        f.write(b'{"step": 5, "lo')
    assert log.truncate(2) == 3
    assert [r.get("step") for r in log.read()] == [0, 1, 2, None]
    log.log({"step": 3})
    assert [r.get("step") for r in log.read()] == [0, 1, 2, None, 3]


def test_a_fresh_start_tidies_only_our_files(tmp_path):
    """A fresh start (`train.resume=never`, or no complete checkpoint) in a used run directory: our temporaries,
    the earlier attempt's checkpoints and its log go; nothing else."""
    out = tmp_path / "run"
    gone = [out / "checkpoints" / ".step_12.abc_9.tmp", out / "checkpoints" / ".step_3.old",
            out / "checkpoints" / "step_3", out / "final" / ".model.k3_a.tmp", out / "final" / ".adapter.old",
            out / ".config.json.u7_x.tmp", out / ".summary.json.q1.tmp"]
    kept = [out / "checkpoints" / "step_x", out / "checkpoints" / ".step_x.old", out / "final" / "adapter",
            out / "final" / ".model.old",  # the only copy of final/model (a kill between the renames)
            out / ".step_3.old", out / ".other.json.q1.tmp", out / "data" / ".iter_000.jsonl.ab.tmp"]
    for p in gone[:5] + kept[:4]:
        p.mkdir(parents=True)
    for p in gone[5:] + kept[4:]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    log = MetricsLog(out / "metrics.jsonl")
    log.log({"step": 1})
    tidy_run_dir(out, None, log)  # a fresh start: the log goes too
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept) and not log.path.exists()
