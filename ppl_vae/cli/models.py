"""``ppl-vae models``: list the registered models, priors, likelihoods, datasets, objectives."""

from __future__ import annotations

import click


@click.command()
def models() -> None:
    """List the names accepted by --model, --prior, --likelihood, --dataset, --method, --objective, --elbo,
    --optimizer,
    and the guide families of the config's model.guide."""
    from ppl_vae.data.datasets import DATASETS
    from ppl_vae.inference.training import ELBOS, METHODS, OBJECTIVES, OPTIMIZERS
    from ppl_vae.models import GUIDES, LIKELIHOODS, MODELS, PRIORS

    for title, registry in (
        ("models", MODELS),
        ("priors", PRIORS),
        ("likelihoods", LIKELIHOODS),
        ("guides", GUIDES),
        ("datasets", DATASETS),
        ("methods", METHODS),
        ("objectives", OBJECTIVES),
        ("elbos", ELBOS),
        ("optimizers", OPTIMIZERS),
    ):
        click.echo(f"{title}:")
        width = max(len(n) for n in registry.names())
        for name in registry.names():
            click.echo(f"  {name:<{width}}  {registry.describe(name)}")
