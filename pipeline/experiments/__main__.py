"""`python -m pipeline.experiments`: the experiments runner's command line (pipeline.experiments.runner)."""

from pipeline.experiments.runner import main

if __name__ == "__main__":
    main()
