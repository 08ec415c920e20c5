"""Local commands: train or measure on this machine, no service involved."""

from __future__ import annotations

from pathlib import Path

import typer


def pretrain(
    spec_file: Path = typer.Argument(..., help="pretrain spec (YAML or JSON)"),
) -> None:
    """Train locally with a progress bar and print per-epoch metrics."""
    raise typer.Exit(code=2)


def lid(
    embeddings: Path = typer.Argument(..., help=".npy file of shape (N, D)"),
) -> None:
    """Report LID and effective rank of an embedding matrix."""
    raise typer.Exit(code=2)
