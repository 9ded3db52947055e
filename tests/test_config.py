import pytest

from preflexor.config import RunConfig, load_config
from preflexor.errors import UserError


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-4\n  out_dir: runs/x\nlora:\n  r: 8\n")
    cfg = load_config(RunConfig, p, ["train.lr=3e-5", "lora.targets=[q_proj,v_proj]", "data.pairs=null", "loss.beta=1"])
    assert cfg.train.lr == 3e-5 and cfg.train.out_dir == "runs/x"
    assert cfg.lora.r == 8 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.data.pairs is None
    beta = cfg.loss.params["beta"]  # a loss hyperparameter (losses.LOSSES[...].hparams), kept beside the others
    assert isinstance(beta, float) and beta == 1.0 and cfg.loss.hparams() == {"beta": 1.0}  # an int is accepted
    assert cfg.model.source == "smollm2-135m-instruct"  # untouched defaults stay


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "unknown config key 'train.lrr' (valid: "),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("lora.r=abc", "config key 'lora.r' expects int, got 'abc'"),
    ("loss.epsilonn=0.1", "unknown config key 'loss.epsilonn' (valid: beta, eps_high, eps_low, epsilon, keep_delimiter, label_smoothing"),
    ("loss.beta=abc", "config key 'loss.beta' expects float, got 'abc'"),
    ("train.lr", "must look like key=value"),
    ("train.batch_size=0", "config key 'train.batch_size' must be >= 1, got 0"),
    ("train.grad_accum=0", "config key 'train.grad_accum' must be >= 1, got 0"),
    ("train.lr=-1", "config key 'train.lr' must be > 0, got -1.0"),
    ("train.iterations=-3", "config key 'train.iterations' must be >= 1, got -3"),
    ("lora.dropout=1", "config key 'lora.dropout' must be in [0, 1), got 1.0"),
    ("sample.top_p=0", "config key 'sample.top_p' must be in (0, 1], got 0.0"),
    ("data.kg_triples=-1", "config key 'data.kg_triples' must be >= 0, got -1"),
])
def test_bad_keys_and_types_are_one_line_errors(override, needle):
    with pytest.raises(UserError) as e:
        load_config(RunConfig, None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(RunConfig, bad)


def test_every_range_holds_for_the_defaults_and_the_shipped_configs():
    """The ranges admit every default and every shipped config (a range that rejects them would be a bug)."""
    from pathlib import Path

    from infer import InferConfig
    from preflexor.datagen import DatagenConfig

    root = Path(__file__).resolve().parent.parent
    for cls in (RunConfig, InferConfig, DatagenConfig):
        load_config(cls, None, [])
    for path in sorted((root / "configs").glob("*.yaml")):
        cls = InferConfig if path.name.startswith("infer") else DatagenConfig if path.name.startswith("data") \
            else None if path.name.startswith("ablations") else RunConfig
        if cls is not None:
            load_config(cls, path, [])
