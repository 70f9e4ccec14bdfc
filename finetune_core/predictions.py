"""predictions.csv: the validation rows with true and predicted label, confidence and class probabilities.

    write_predictions(rundir.predictions_path(out), texts, y_true, y_pred, probs, label_names)
    safe_csv_cell("=HYPERLINK(...)")      # "'=HYPERLINK(...)": a spreadsheet shows it, never runs it

Every text cell a user can open in a spreadsheet goes through `safe_csv_cell`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def safe_csv_cell(value):
    """Neutralise spreadsheet formulas (=, +, -, @, tab, CR at the start) so exports never execute code.

    A plain number such as "-1" or "+0.5" is no formula and stays as it is.
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value
    return value


def write_predictions(path: str | Path, texts, y_true, y_pred, probs: np.ndarray, names) -> None:
    """One row per validation text, in the validation data's order; `probs` has one column per name."""
    df = pd.DataFrame({
        "text": [safe_csv_cell(t) for t in texts],
        "true_label": [safe_csv_cell(names[i]) for i in y_true],
        "predicted_label": [safe_csv_cell(names[i]) for i in y_pred],
        "confidence": [float(probs[i, p]) for i, p in enumerate(y_pred)],
        "correct": [bool(a == b) for a, b in zip(y_true, y_pred)],
    })
    for j, n in enumerate(names):
        df[f"p_{n}"] = probs[:, j].round(6)
    df.to_csv(path, index=False)
