"""`python -m pipeline.experiments`: the experiments runner's command line (pipeline.experiments.runner),
and `table`, the experiments of HEAD within 100 columns (pipeline.experiments.table)."""

import sys

from pipeline.experiments.runner import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        from pipeline.experiments import table

        table.main(sys.argv[2:])
    else:
        main()
