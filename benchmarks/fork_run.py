"""Continue a run's saved state under changed settings: a paired comparison for a change that only acts late.

A run's `last.pt` after epoch E holds its weights, optimiser, schedule and random streams. Continued with
other settings that agree with the run up to epoch E (e.g. `clean_epochs=0` for a run trained with
`--clean-epochs 2`, copied after epoch epochs - 2), the rest is exactly what a run with those settings
from the start would compute from there: the same seed and first E epochs, so the two differ by the
change alone. Checked: a --clean-epochs 2 run's epoch-16 state continued with clean_epochs=0 gave the
plain run's epochs 17 and 18 digit for digit (docs/benchmarks.md). OUT is a run folder like any other
(config.json, environment.json, metrics.csv, last.pt, best.pt): if the fork is interrupted, or to add the
test predictions, summary and figures, `kmnist train --resume OUT` finishes it.

    PYTHONPATH=src python3 benchmarks/fork_run.py RUN/last.pt OUT --set clean_epochs=0 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kmnist import runs
from kmnist.checkpoint import atomic_torch_save, load_checkpoint
from kmnist.cli import BALANCED_EPOCH_COLUMNS, EPOCH_COLUMNS, format_header, format_row
from kmnist.config import TrainConfig, coerce
from kmnist.data import is_balanced, load_dataset
from kmnist.errors import KmnistError
from kmnist.runner import record_environment
from kmnist.train import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", type=Path, help="a last.pt saved after the epoch to continue from")
    parser.add_argument("out", type=Path, help="new run folder for the continued run (must not exist)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field to change (repeatable)")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    try:
        payload = load_checkpoint(args.state)
        if "training_state" not in payload:
            raise KmnistError(f"{args.state} holds no training state (use a last.pt)")
        config = dict(payload["config"])
        for item in args.set:
            name, _, value = item.partition("=")
            config[name] = coerce(name, value)
        forked = TrainConfig(**config)
        if args.out.exists():
            raise KmnistError(f"{args.out} exists; name a new folder")
        dataset = load_dataset(forked.dataset, args.data_dir, download=False)  # before OUT: a bad folder leaves none
        args.out.mkdir(parents=True)
        runs.write_json(args.out / runs.CONFIG, forked.to_dict())  # OUT records what it ran, as a run folder does
        record_environment(args.out, resumed=False)
        atomic_torch_save({**payload, "config": config}, args.out / runs.LAST)  # what fit(resume=True) reads
        columns = BALANCED_EPOCH_COLUMNS if is_balanced(forked.dataset) else EPOCH_COLUMNS
        print(format_header(columns), flush=True)
        fit(forked, dataset, args.out, resume=True,
            on_epoch=lambda row: print(format_row(row, columns), flush=True))  # each epoch as it ends
    except KmnistError as error:
        sys.exit(f"fork_run: error: {error}")


if __name__ == "__main__":
    main()
