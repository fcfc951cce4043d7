"""Sample grids saved while a run trains on: a driver, since it resumes a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ppl_vae import pipeline, runs
from ppl_vae.analysis.generation import EveryFewEpochs, SampleGridRecorder, check_images


def train_with_sample_grids(
    run_dir: Union[str, Path],
    epochs: int,
    *,
    every: int = 1,
    num_samples: int = 16,
    seed: int = 0,
    progress: bool = True,
):
    """Continue a run up to ``epochs`` epochs, saving a sample grid every ``every`` epochs.

    One :func:`ppl_vae.pipeline.resume` with the grids as an epoch callback, so it works for
    any registered model. Frames go to ``RUN/samples/epoch_NNNN.png``, the animation to
    ``RUN/samples.gif``; the grid of the run's current epoch is saved first. Returns the final
    :class:`ppl_vae.pipeline.Run`.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    run_dir = Path(run_dir)
    with runs.exclusive(run_dir):  # its first frame, too, waits for no other process's training
        return _train_with_sample_grids(run_dir, epochs, every, num_samples, seed, progress)


def _train_with_sample_grids(
    run_dir: Path, epochs: int, every: int, num_samples: int, seed: int, progress: bool
) -> "pipeline.Run":
    run = pipeline.load_run(run_dir)
    check_images(run.vae, f"sample grids of {run_dir}", "; use `ppl-vae text RUN` to decode samples")
    epoch = runs.checkpoint_epoch(run_dir)
    if epochs < epoch:
        raise ValueError(f"epochs must be >= the {epoch} the run has done, got {epochs}")
    # before the first frame: a link or a folder in the way refuses the run with nothing written
    runs.check_writable(run_dir, files=("samples.gif",), folders=("samples",))
    recorder = SampleGridRecorder(run_dir / "samples", num_samples=num_samples, seed=seed)
    recorder.check_frames()  # before any training: a damaged frame would fail the animation at the end
    recorder(epoch, run.vae)
    if epochs == epoch:
        return run
    return pipeline.resume(
        run_dir, epochs=epochs, progress=progress, callbacks=[EveryFewEpochs(recorder, every, epochs)]
    )
