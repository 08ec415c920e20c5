"""What a file-based dataset must look like on disk, checked without loading it.

Torch-free, so the API can refuse a spec whose dataset path is missing or laid out
wrongly at submit (422 naming the path) instead of after a wait in the queue; the
worker's loaders (``ldreg.data``) check the same layout again when they read it,
since files can change in between. The layouts are documented in docs/api.md,
"Datasets on disk".
"""

from __future__ import annotations

from pathlib import Path

# name → (torchvision's folder name, training files, test files, label key, classes)
CIFAR_FILES: dict[str, tuple[str, list[str], list[str], str, int]] = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def layout_problem(name: str, path: Path, shown: str) -> str | None:
    """Why the dataset ``name`` cannot be at ``path`` (``shown`` is how the user wrote
    it), or None when its layout looks right."""
    if name in CIFAR_FILES:
        folder, train_files, test_files, _, _ = CIFAR_FILES[name]
        if not path.is_dir():
            return (
                f"{name} expects a folder '{shown}' under the data root holding"
                f" torchvision's '{folder}' files"
            )
        directory = path / folder if (path / folder).is_dir() else path
        expected = train_files + test_files
        missing = [f for f in expected if not (directory / f).is_file()]
        if missing:
            listing = (
                f"{expected[0]}..{expected[-2][-1]} and {expected[-1]}"
                if len(expected) > 2
                else " and ".join(expected)
            )
            return (
                f"{name} expects {listing} (torchvision's python format) under"
                f" '{shown}' or '{shown}/{folder}'; missing: {', '.join(missing)}"
            )
        return None
    if name == "npz":
        if not path.is_file():
            return f"npz expects a .npz file at '{shown}' under the data root; there is none"
        return None
    if name == "image_folder":
        if not path.is_dir():
            return f"image_folder expects a folder '{shown}' under the data root; there is none"
        if not any(child.is_dir() for child in path.iterdir()):
            return (
                f"image_folder found no class sub-folders in '{shown}': expected"
                " <class>/<image> files (or train/ and val/ holding them)"
            )
        return None
    return None
