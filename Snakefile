# The pipeline's DAG: one papermill run per notebook x condition (method 3, 9).
#   snakemake --cores 2 --config profile=params/smoke.yaml     (what `make reproduce` runs)
# Each rule's `params.h` is the hash of the profile sections it depends on: Snakemake re-runs a rule when it
# changes (rerun trigger "params"), and everything downstream through the inputs. Nothing else re-runs.
import os
import shutil
import sys
import tempfile

from persona_em import grid, paths
from persona_em.config import load_profile
from persona_em.grid import em_run_name, parse_condition
from persona_em.paths import ANALYZE, EVALUATE, GENERATE, INDUCE_EM, TRAIN_CHARACTER

PROFILE = config.get("profile", "params/smoke.yaml")
P = load_profile(PROFILE)
RUNS = str(paths.run_root(P, "."))   # runs/<profile>: folder and file names from persona_em.paths, run names from grid
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

# Warm kernels (persona_em.kernels): on one machine each job's papermill run and kernel are forked from a server,
# one per thread count, that has imported papermill and the chapters' libraries once, instead of importing them
# itself (9-16 s a job). CPU runs of the project's kernel only (a GPU run's kernels start cold: CUDA is not to be
# forked); `--config warm_kernels=false` starts every kernel cold; the results are the same either way.
WARM_KERNELS = (not ON_CLUSTER and P.hardware.device == "cpu" and KERNEL == "persona-em"
                and str(config.get("warm_kernels", True)).lower() not in ("false", "0", "no"))
kernel_servers = []

onstart:
    if WARM_KERNELS:
        from persona_em.kernels import Servers

        # the jobs' tmpdir: Snakemake's default resource, the system's temporary folder
        kernel_servers.append(Servers([THREADS, threads_for("generate", workflow.cores)], tempfile.gettempdir()))
        if kernel_servers[0].note:
            print(f"persona_em.kernels: {kernel_servers[0].note}", file=sys.stderr)

onsuccess:
    for s in kernel_servers:
        s.stop()

onerror:
    for s in kernel_servers:
        s.stop()

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


def notebook(stage):
    """notebooks/<stage>.ipynb: the chapter a stage's jobs execute."""
    return f"notebooks/{paths.notebook_name(stage)}"


def run_folder(stage, name=None):
    """runs/<profile>/<stage>[/<name>], where `name` may hold wildcards (paths.run_dir checks real names)."""
    return f"{RUNS}/{stage}" + (f"/{name}" if name else "")


def manifest(stage, name=None):
    """A run folder's manifest, written last: every rule's output."""
    return f"{run_folder(stage, name)}/{paths.MANIFEST}"


def papermill(stage, out_dir, **params):
    """Execute a stage's notebook into out_dir under a temporary name; rename it only when it completed.
    Papermill's report (cell by cell, with the cells' output streams) goes to the rule's log file (`make
    reproduce` prints a failed job's log). `persona_em.kernels --papermill` is `python -m papermill`, forked from
    the run's warm server where there is one (its imports cost 1-1.5 s a job), else started as a new Python."""
    args = " ".join(f"-p {k} {v}" for k, v in params.items())
    name = paths.notebook_name(stage)
    return (f"mkdir -p {out_dir} && {sys.executable} -m persona_em.kernels --papermill {notebook(stage)} "
            f"{out_dir}/.tmp-{name} "
            f"-k {KERNEL} "
            f'-p profile_path "$PERSONA_EM_PROFILE" -p root . {args} --log-output > {{log}} 2>&1 '
            f"&& mv {out_dir}/.tmp-{name} {out_dir}/{name}")


def log_file(stage, name=None):
    """runs/<profile>/logs/<stage>[/<name>].log: one file per job, beside the run folders, not in them."""
    return f"{RUNS}/logs/{stage}" + (f"/{name}.log" if name else ".log")


# The paper's PDF is the last target where TeX is installed; without it the run ends with chapter 5 (its numbers
# and figures) and `make reproduce` says how to get the PDF.
HAVE_TEX = shutil.which("latexmk") is not None
PAPER_PDF = str(paths.paper_pdf(P.name, "."))

localrules: all, paper   # on a cluster, the PDF is built where the workflow runs, not as a queued job


rule all:
    input:
        manifest(ANALYZE),
        [PAPER_PDF] if HAVE_TEX else [],


rule generate:
    input:
        notebook(GENERATE),
        # the trait scorers' items (best-of-n pairs and the pairs' signal): editing one re-makes the pairs
        [str(f) for f in (paths.scorer_items_file(P, n) for n in grid.constitutions(P)) if f.is_file()],
    output:
        manifest(GENERATE),
    log:
        log_file(GENERATE),
    params:
        # the replicates' subset draws come from character.seeds; the teacher check reads the check items
        # the training-only hardware fields are left out: chapter 1 trains nothing
        h=P.section_hash("seed", "model", "embedder", "generate", "controls", "character.seeds",
                         "character.check_items", "hardware", exclude=TRAINING_ONLY_HARDWARE),
    threads: threads_for("generate", workflow.cores)   # the DAG's root: nothing else can run beside it
    resources:
        **cluster("generate"),
    shell:
        papermill(GENERATE, run_folder(GENERATE), threads="{threads}")


def character_inputs(wildcards):
    """A trained persona needs chapter 1's pairs; the random-LoRA control needs the persona whose norm it
    matches."""
    inputs = [notebook(TRAIN_CHARACTER), manifest(GENERATE)]
    cond = parse_condition(wildcards.cond)
    if cond["constitution"] == "random":
        inputs.append(manifest(TRAIN_CHARACTER, grid.random_reference(P, cond["char_seed"])))
    return inputs


rule train_character:
    input:
        character_inputs,
    output:
        manifest(TRAIN_CHARACTER, "{cond}"),
    log:
        log_file(TRAIN_CHARACTER, "{cond}"),
    params:
        h=P.section_hash("seed", "model", "character", "hardware"),
    threads: threads_for("train_character", THREADS)
    resources:
        **cluster("train_character"),
    shell:
        papermill(TRAIN_CHARACTER, run_folder(TRAIN_CHARACTER, "{wildcards.cond}"),
                  condition="{wildcards.cond}", threads="{threads}")


rule induce_em:
    input:
        notebook(INDUCE_EM),
        manifest(TRAIN_CHARACTER, "{cond}"),
    output:
        manifest(INDUCE_EM, em_run_name("{cond}", "{dataset}", "{seed}")),
    log:
        log_file(INDUCE_EM, em_run_name("{cond}", "{dataset}", "{seed}")),
    params:
        h=P.section_hash("seed", "model", "em", "hardware"),
    threads: threads_for("induce_em", THREADS)
    resources:
        **cluster("induce_em"),
    shell:
        papermill(INDUCE_EM,
                  run_folder(INDUCE_EM, em_run_name("{wildcards.cond}", "{wildcards.dataset}", "{wildcards.seed}")),
                  condition="{wildcards.cond}", dataset="{wildcards.dataset}", em_seed="{wildcards.seed}",
                  threads="{threads}")


def trained_model(wildcards):
    """A model before EM is a character condition; after EM, an EM run over one. Every evaluated model is read
    out on the misalignment direction, so it waits for the direction runs' activations (chapter 4 of those)."""
    if "__" in wildcards.model:
        inputs = [manifest(INDUCE_EM, wildcards.model)]
    else:
        inputs = [manifest(TRAIN_CHARACTER, wildcards.model)]
    if wildcards.model not in grid.direction_runs(P):
        inputs += [manifest(EVALUATE, r) for r in grid.direction_runs(P)]
    return inputs


rule evaluate:
    input:
        notebook(EVALUATE),
        trained_model,
    output:
        manifest(EVALUATE, "{model}"),
    log:
        log_file(EVALUATE, "{model}"),
    params:
        # em.domains choose the contrast items; the direction's seeds and items what every readout reads (its
        # validation settings are chapter 5's alone)
        h=P.section_hash("seed", "model", "evaluate", "em", "direction", "hardware",
                         exclude=("direction.steer_scales", "direction.random_directions")),
    threads: threads_for("evaluate", THREADS)
    resources:
        **cluster("evaluate"),
    shell:
        papermill(EVALUATE, run_folder(EVALUATE, "{wildcards.model}"),
                  model="{wildcards.model}", threads="{threads}")


rule analyze:
    input:
        notebook(ANALYZE),
        "PREREGISTRATION.md",           # the registered analysis chapter 5 follows and compares with
        str(paths.profile_file(grid.PAPER_SCALE, ".")),   # the cost table of the paper-scale profile
        manifest(GENERATE),
        [manifest(EVALUATE, m) for m in grid.eval_models(P) + grid.direction_runs(P)],
    params:
        h=P.section_hash("analysis", "direction"),
    output:
        manifest(ANALYZE),
    log:
        log_file(ANALYZE),
    threads: threads_for("analyze", workflow.cores)   # the last job: nothing else runs beside it
    resources:
        **cluster("analyze"),
    shell:
        papermill(ANALYZE, run_folder(ANALYZE), threads="{threads}")


rule paper:
    input:
        str(paths.paper_source(".")),
        "paper/build.sh",
        manifest(ANALYZE),   # chapter 5 writes the numbers and the figures the paper reads
    output:
        PAPER_PDF,
    log:
        log_file("paper"),
    shell:
        f"bash paper/build.sh {P.name} > {{log}} 2>&1"
