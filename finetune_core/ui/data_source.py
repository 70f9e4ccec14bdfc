"""Where the data file comes from: an upload, a built-in example, or a Hub dataset cached as Parquet.

    from finetune_core.ui.data_source import read_frame, resolve_data
    path = resolve_data(ctx, data_file, example, hub_dataset, hub_split)    # a file on this machine
    df = read_frame(path)                                                   # within the upload limit

Shared by the Data tab (preview, audit) and the Train tab (Start, Show command).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import settings
from ..data import read_table
from ..errors import DataError
from .common import EXAMPLES, AppContext, example_path, is_offline, upload_limit_mb



def hub_dataset_file(ctx: AppContext, hub_dataset: str, split: str = "train") -> Path:
    """Download a Hub dataset split once into FINETUNE_HOME/datasets/ as Parquet (cached: works offline later).

    `hub_dataset` is `name`, `org/name`, or `name:config` (e.g. glue:sst2).
    """
    hub_dataset = (hub_dataset or "").strip()
    split = (split or "train").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?(:[A-Za-z0-9_.-]+)?", hub_dataset):
        raise DataError(f"'{hub_dataset}' is not a Hub dataset id.", "Write it as name or org/name "
                        "(add :config for datasets with several configurations, e.g. glue:sst2).")
    if not re.fullmatch(r"[A-Za-z0-9_.\[\]:%+-]+", split):
        raise DataError(f"'{split}' is not a split name.", "Use train, validation, test or a slice like train[:2000].")
    name, _, config = hub_dataset.partition(":")
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{name}-{config or 'default'}-{split}")
    target = ctx.home / "datasets" / f"{slug}.parquet"
    if target.exists():
        return target
    if is_offline():
        raise DataError(f"The app is offline (HF_HUB_OFFLINE=1) and '{hub_dataset}' has not been downloaded before.",
                        "Upload a file or pick a built-in example, or run the app online once to fetch the dataset.")
    try:
        from datasets import load_dataset      # heavy, and only this source needs it

        ds = load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown id...
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise DataError(f"Could not load the Hub dataset '{hub_dataset}' ({split}): {first}",
                        "Check the id on huggingface.co/datasets and your network, or upload a file.") from None
    max_rows = settings.max_hub_rows()
    if len(ds) > max_rows:
        ds = ds.shuffle(seed=42).select(range(max_rows))
    df = ds.to_pandas()
    # class labels stored as integers with names: write the names, they read better everywhere
    for col, feat in ds.features.items():
        names = getattr(feat, "names", None)
        if names and col in df:
            df[col] = df[col].map(lambda i, n=names: n[i] if isinstance(i, (int,)) and 0 <= i < len(n) else i)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.parquet")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, target)
    return target


def resolve_data(ctx: AppContext, data_file=None, example: str | None = None, hub_dataset: str | None = None,
                 hub_split: str = "train") -> Path:
    """The data file to use: an uploaded file, else a Hub dataset, else a built-in example."""
    if data_file:
        path = Path(data_file if isinstance(data_file, str) else getattr(data_file, "name", data_file))
        if not path.is_file():
            raise DataError("The uploaded file is no longer on the server.", "Upload it again.")
        return path
    if hub_dataset and str(hub_dataset).strip():
        return hub_dataset_file(ctx, hub_dataset, hub_split)
    if example:
        if example not in EXAMPLES:
            raise DataError(f"Unknown built-in example '{example}'.", f"Pick one of: {', '.join(EXAMPLES)}.")
        return example_path(example)
    raise DataError("No data selected.", "Upload a CSV/TSV/JSON/JSONL/Parquet file, or pick a built-in example.")


def read_frame(path: Path):
    return read_table(path, max_bytes=int(upload_limit_mb() * 1e6))
