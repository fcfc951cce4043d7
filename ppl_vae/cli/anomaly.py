"""``ppl-vae anomaly``: score a dataset with a trained run; AUROC and AUPRC when labels exist."""

from __future__ import annotations

from pathlib import Path

import click

from ppl_vae.cli import options as opt


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--dataset",
    default=None,
    help="Dataset to score (default: the run's own), e.g. fashion-mnist-oneclass-3, timeseries-csv, or a path.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder (or, for timeseries-csv, the CSV file) holding the dataset.",
)
@opt.split_option()
@click.option(
    "--score",
    default="neg_elbo",
    show_default=True,
    help="neg_elbo (Kim et al. 2017) or reconstruction_probability (An & Cho 2015).",
)
@opt.num_samples_option(10, "Draws of z per datapoint.")
@click.option(
    "--normal-class",
    type=int,
    default=None,
    help="Treat class labels as anomaly labels: 1 for every class but this one.",
)
@click.option("--batch-size", type=int, default=500, show_default=True)
@opt.out_file_option("Write the scores to this netCDF file; missing folders are created.", "scores.nc", "netCDF file")
@opt.device_option()
@opt.seed_option()
@opt.progress_option()
def anomaly(run_dir: Path, **opts) -> None:
    """Score each datapoint of a dataset with a trained run (higher = more anomalous)."""
    from ppl_vae import io, pipeline
    from ppl_vae.analysis.anomaly import SCORES, are_anomaly_labels, score_dataset
    from ppl_vae.data.datasets import labels_are_anomalies
    from ppl_vae.models.vae import evidence_of

    out = opts["out"]
    if out is not None:  # before any work: a file, never a run's own, never through a link
        io.check_target(out)
        if Path(out).is_dir():
            raise ValueError(f"--out {out} is a folder; give the netCDF file to write (e.g. {Path(out) / 'scores.nc'})")
        io.make_folder(Path(out).parent)  # removed again if the command fails before writing
    pipeline.seed_everything(opts["seed"])
    run = pipeline.load_run(run_dir, device=opts["device"], history=False)
    evidence = evidence_of(run.vae)
    if evidence != "log p(x)":  # a conditional model scores x given its label
        raise ValueError(
            f"anomaly scores each datapoint by a bound on log p(x); {run_dir} holds model "
            f"{run.config.model.model!r}, whose ELBO bounds {evidence}: score a run of an unconditional model"
        )
    if opts["data_dir"] is not None:  # read only by datasets kept in a folder
        from ppl_vae.data.datasets import check_data_dir

        check_data_dir(opts["dataset"] or run.config.data.dataset, opts["data_dir"])
    source = pipeline.data_config(run.config, opts["dataset"], opts["data_dir"])
    own = source == run.config.data  # the run's own data: its recorded splits, not files replaced since
    if own:
        data = pipeline.load_run_data(run)  # the run's own: the splits it recorded, not files replaced since
    else:  # another dataset is prepared as the run's training data was (binarization, split, size)
        data = pipeline.load_data(run.config, dataset=opts["dataset"], data_dir=opts["data_dir"])
    if opts["normal_class"] is not None and labels_are_anomalies(data.name):
        raise ValueError(
            f"--normal-class turns class labels into anomaly labels, but {data.name} labels its points "
            "0 (normal) / 1 (anomaly) already: leave it out"
        )
    x = data.test if opts["split"] == "test" else data.train
    labels = data.test_labels if opts["split"] == "test" else data.train_labels
    if tuple(x.shape[1:]) != tuple(run.vae.event_shape):
        raise ValueError(
            f"--dataset {data.name} has datapoints of shape {tuple(x.shape[1:])}, but the run's model "
            f"expects {tuple(run.vae.event_shape)}"
        )
    run.vae.likelihood.check_support(x, what=f"the {opts['split']} data of {data.name}")
    class_labels = labels is not None and opts["normal_class"] is None and not are_anomaly_labels(labels)
    if class_labels:  # scores need no labels; AUROC and AUPRC need to know which class is normal
        labels = None
    device = next(run.vae.parameters()).device
    result = score_dataset(
        run.vae,
        x.to(device),
        labels,
        score=opts["score"],
        num_samples=opts["num_samples"],
        batch_size=opts["batch_size"],
        normal_class=opts["normal_class"],
        progress=opts["progress"],
    )
    result.attrs.update(  # which data these are: the run's own, or files the user named
        {
            "dataset": data.name,
            "data_dir": "" if source.data_dir is None else str(source.data_dir),
            "split": opts["split"],
            "run_dir": str(run_dir),
            "made_from": run.made_from,  # which weights: a resume moves the run on, not this file
            "data": "the run's own" if own else "other data than the run was trained on",
        }
    )
    where = "" if own or opts["data_dir"] is None else f" in {opts['data_dir']}"
    scores = result["score"]
    click.echo(
        f"{len(x)} datapoints of {data.name}{where} ({opts['split']}) scored by {opts['score']} "
        f"({SCORES.describe(opts['score'])}; higher = more anomalous): "
        f"median {float(scores.median()):.3f}, max {float(scores.max()):.3f}"
    )
    if "auroc" in result.attrs:
        click.echo(
            f"AUROC {result.attrs['auroc']:.4f} (chance 0.5), AUPRC {result.attrs['auprc']:.4f} (chance "
            f"{result.attrs['num_anomalies'] / len(x):.4f}, the share of anomalies: "
            f"{result.attrs['num_anomalies']} among {len(x)})"
        )
    elif "label" in result:
        click.echo(f"the labels hold one class only ({result.attrs['num_anomalies']} anomalies): no AUROC or AUPRC")
    elif class_labels:
        click.echo(
            f"{data.name} has class labels: --normal-class C gives AUROC and AUPRC with every other class "
            "as the anomalies"
        )
    else:
        click.echo("no labels: AUROC and AUPRC need 0/1 labels (or class labels with --normal-class)")
    if opts["out"] is not None:
        io.write_netcdf(result, opts["out"])
        click.echo(f"scores written to {opts['out']}")
