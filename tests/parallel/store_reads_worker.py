"""One process of tests/parallel/test_multiprocess.py's token-store read check.

    python tests/parallel/store_reads_worker.py CONFIG STEPS [OVERRIDES...]

It builds the run of CONFIG (mode train: no teacher, nothing compiled) as one process of a
multi-process job (the overrides carry the `distributed.*` settings), takes the host batches of
steps 0 .. STEPS - 1 as the loop does, and prints one JSON line: the rows it asked for, how many
rows it read from the token store, and the hash of each row it got.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: `tests` and `kd_jax`

from kd_jax import config as config_lib  # noqa: E402 - after the path above
from kd_jax.data.packing import row_hashes  # noqa: E402
from kd_jax.train import builder  # noqa: E402


def main() -> None:
    config, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import jax

    run = builder.build(config_lib.load(config, overrides), "train")
    rows, hashes = [], []
    for step in range(steps):
        rows.append(run.batches.rows(step, run.placement.positions).tolist())
        batch = run.host_batch(step)
        hashes.append([str(h) for h in row_hashes(batch["tokens"], batch["segment_ids"],
                                                  batch["loss_mask"])])
    print(json.dumps({"process": jax.process_index(), "rows": rows, "hashes": hashes,
                      "rows_read": run.data.train.rows_read}))


if __name__ == "__main__":
    main()
