# The pipeline's DAG: one papermill run per notebook x condition (method 3, 9).
#   snakemake --cores 2 --config profile=params/smoke.yaml     (what `make reproduce` runs)
# Each rule's `params.h` is the hash of the profile sections it depends on: Snakemake re-runs a rule when it
# changes (rerun trigger "params"), and everything downstream through the inputs. Nothing else re-runs.
import os
import shutil
import sys

from persona_em.config import em_run_name, load_profile, parse_condition

PROFILE = config.get("profile", "params/smoke.yaml")
P = load_profile(PROFILE)
RUNS = f"runs/{P.name}"
KERNEL = config.get("kernel", "persona-em")
# The profile path reaches the notebooks through the environment, so that the rules' commands stay the same
# for every profile file (Snakemake would otherwise re-run everything when only the path differs).
os.environ["PERSONA_EM_PROFILE"] = PROFILE
# Torch threads per job: all cores for one job at a time by default (two 2-thread jobs on 2 cores run slower
# than one); small profiles run faster as parallel 1-thread jobs (`--config threads_per_job=1`).
# On a cluster (profiles/slurm sets `cluster: true`) every job gets the CPUs its rule asks for.
ON_CLUSTER = bool(config.get("cluster", False))
THREADS = int(config.get("threads_per_job", workflow.cores))
if not ON_CLUSTER:
    THREADS = min(THREADS, workflow.cores)

TRAINING_ONLY_HARDWARE = ("hardware.training_autocast", "hardware.num_processes", "hardware.distributed",
                          "hardware.gradient_checkpointing")

wildcard_constraints:
    cond=r"(?:(?!__)[^/])+",
    model=r"[^/]+",


def threads_for(rule_name, default):
    return getattr(P.cluster, rule_name).cpus if ON_CLUSTER else default


def cluster(rule_name):
    """The rule's cluster resources from the parameter profile (read by the SLURM executor; on one machine
    Snakemake only schedules by them when asked to with --resources)."""
    r = getattr(P.cluster, rule_name)
    return dict(gpu=r.gpus, cpus_per_task=r.cpus, mem_mb=r.mem_mb, runtime=r.runtime)


def papermill(notebook, out_dir, **params):
    """Execute a notebook into out_dir under a temporary name; rename it only when it completed. Papermill's
    report (cell by cell, with the cells' output streams) goes to the rule's log file (`make reproduce` prints
    a failed job's log)."""
    args = " ".join(f"-p {k} {v}" for k, v in params.items())
    name = notebook.split("/")[-1]
    return (f"mkdir -p {out_dir} && {sys.executable} -m papermill {notebook} {out_dir}/.tmp-{name} -k {KERNEL} "
            f'-p profile_path "$PERSONA_EM_PROFILE" -p root . {args} --log-output > {{log}} 2>&1 '
            f"&& mv {out_dir}/.tmp-{name} {out_dir}/{name}")


def log_file(stage, name=None):
    """runs/<profile>/logs/<stage>[/<name>].log: one file per job, beside the run folders, not in them."""
    return f"{RUNS}/logs/{stage}" + (f"/{name}.log" if name else ".log")


# The paper's PDF is the last target where TeX is installed; without it the run ends with chapter 5 (its numbers
# and figures) and `make reproduce` says how to get the PDF.
HAVE_TEX = shutil.which("latexmk") is not None
PAPER_PDF = f"paper/paper-{P.name}.pdf"

localrules: all, paper   # on a cluster, the PDF is built where the workflow runs, not as a queued job


rule all:
    input:
        f"{RUNS}/05_analyze/manifest.json",
        [PAPER_PDF] if HAVE_TEX else [],


rule generate:
    input:
        "notebooks/01_generate.ipynb",
        # the trait scorers' items (best-of-n pairs and the pairs' signal): editing one re-makes the pairs
        [str(P.scorer_items_file(n)) for n in P.constitutions() if P.scorer_items_file(n).is_file()],
    output:
        f"{RUNS}/01_generate/manifest.json",
    log:
        log_file("01_generate"),
    params:
        # the replicates' subset draws come from character.seeds; the teacher check reads the check items
        # the training-only hardware fields are left out: chapter 1 trains nothing
        h=P.section_hash("seed", "model", "embedder", "generate", "controls", "character.seeds",
                         "character.check_items", "hardware", exclude=TRAINING_ONLY_HARDWARE),
    threads: threads_for("generate", workflow.cores)   # the DAG's root: nothing else can run beside it
    resources:
        **cluster("generate"),
    shell:
        papermill("notebooks/01_generate.ipynb", f"{RUNS}/01_generate", threads="{threads}")


def character_inputs(wildcards):
    """A trained persona needs chapter 1's pairs; the random-LoRA control needs the persona whose norm it
    matches."""
    inputs = ["notebooks/02_train_character.ipynb", f"{RUNS}/01_generate/manifest.json"]
    cond = parse_condition(wildcards.cond)
    if cond["constitution"] == "random":
        inputs.append(f"{RUNS}/02_train_character/{P.random_reference(cond['char_seed'])}/manifest.json")
    return inputs


rule train_character:
    input:
        character_inputs,
    output:
        f"{RUNS}/02_train_character/{{cond}}/manifest.json",
    log:
        log_file("02_train_character", "{cond}"),
    params:
        h=P.section_hash("seed", "model", "character", "hardware"),
    threads: threads_for("train_character", THREADS)
    resources:
        **cluster("train_character"),
    shell:
        papermill("notebooks/02_train_character.ipynb", f"{RUNS}/02_train_character/{{wildcards.cond}}",
                  condition="{wildcards.cond}", threads="{threads}")


rule induce_em:
    input:
        "notebooks/03_induce_em.ipynb",
        f"{RUNS}/02_train_character/{{cond}}/manifest.json",
    output:
        f"{RUNS}/03_induce_em/{em_run_name('{cond}', '{dataset}', '{seed}')}/manifest.json",
    log:
        log_file("03_induce_em", em_run_name("{cond}", "{dataset}", "{seed}")),
    params:
        h=P.section_hash("seed", "model", "em", "hardware"),
    threads: threads_for("induce_em", THREADS)
    resources:
        **cluster("induce_em"),
    shell:
        papermill("notebooks/03_induce_em.ipynb",
                  f"{RUNS}/03_induce_em/{em_run_name('{wildcards.cond}', '{wildcards.dataset}', '{wildcards.seed}')}",
                  condition="{wildcards.cond}", dataset="{wildcards.dataset}", em_seed="{wildcards.seed}",
                  threads="{threads}")


def trained_model(wildcards):
    """A model before EM is a character condition; after EM, an EM run over one. Every evaluated model is read
    out on the misalignment direction, so it waits for the direction runs' activations (chapter 4 of those)."""
    if "__" in wildcards.model:
        inputs = [f"{RUNS}/03_induce_em/{wildcards.model}/manifest.json"]
    else:
        inputs = [f"{RUNS}/02_train_character/{wildcards.model}/manifest.json"]
    if wildcards.model not in P.direction_runs():
        inputs += [f"{RUNS}/04_evaluate/{r}/manifest.json" for r in P.direction_runs()]
    return inputs


rule evaluate:
    input:
        "notebooks/04_evaluate.ipynb",
        trained_model,
    output:
        f"{RUNS}/04_evaluate/{{model}}/manifest.json",
    log:
        log_file("04_evaluate", "{model}"),
    params:
        # em.domains choose the contrast items; the direction's seeds and items what every readout reads (its
        # validation settings are chapter 5's alone)
        h=P.section_hash("seed", "model", "evaluate", "em", "direction", "hardware",
                         exclude=("direction.steer_scales", "direction.random_directions")),
    threads: threads_for("evaluate", THREADS)
    resources:
        **cluster("evaluate"),
    shell:
        papermill("notebooks/04_evaluate.ipynb", f"{RUNS}/04_evaluate/{{wildcards.model}}",
                  model="{wildcards.model}", threads="{threads}")


rule analyze:
    input:
        "notebooks/05_analyze.ipynb",
        "PREREGISTRATION.md",           # the registered analysis chapter 5 follows and compares with
        "params/gpu.yaml",              # the cost table of the paper-scale profile
        f"{RUNS}/01_generate/manifest.json",
        expand(f"{RUNS}/04_evaluate/{{model}}/manifest.json", model=P.eval_models() + P.direction_runs()),
    params:
        h=P.section_hash("analysis", "direction"),
    output:
        f"{RUNS}/05_analyze/manifest.json",
    log:
        log_file("05_analyze"),
    threads: threads_for("analyze", workflow.cores)   # the last job: nothing else runs beside it
    resources:
        **cluster("analyze"),
    shell:
        papermill("notebooks/05_analyze.ipynb", f"{RUNS}/05_analyze", threads="{threads}")


rule paper:
    input:
        "paper/paper.tex",
        "paper/build.sh",
        f"{RUNS}/05_analyze/manifest.json",   # chapter 5 writes the numbers and the figures the paper reads
    output:
        PAPER_PDF,
    log:
        log_file("paper"),
    shell:
        f"bash paper/build.sh {P.name} > {{log}} 2>&1"
