"""Controlled comparisons that reproduce the paper's findings in miniature (``transfusion experiment``).

- ``definitions``: the experiments, their arms (one knob each), the findings they test;
- ``runner``: shared assets, the FLOP-sized plan, every point (arm x budget x seed), resume;
- ``page``: results.json, plots, experiment.html and the verdicts.
"""

from transfusion.experiments.definitions import EXPERIMENTS, Arm, Experiment, Finding
from transfusion.experiments.runner import Settings, run_experiment

__all__ = ["EXPERIMENTS", "Arm", "Experiment", "Finding", "Settings", "run_experiment"]
