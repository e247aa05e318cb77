"""Experiments as a library: presets (arms x seeds x override sets), the grid of runs with one YAML config file
each, the runners (local launchers, or Slurm through submitit) and the report (quality with paired intervals and
TOST, compute, steps to a target).  ``tools/sweep.py`` is its command line (`cli.main`)."""
from .grid import Grid, RunSpec, build_grid, check_grid, check_out, grid_from_record
from .presets import PRESETS, Group, Preset, Scaled, SweepError
from .report import ReportOptions, comparisons_for, report, write_reports
from .results import collect, compute_of, steps_to_target
from .runner import LAUNCHERS, Runner, RunJob, SlurmRunner
from .settings import DriverSettings

__all__ = ["PRESETS", "Preset", "Group", "Scaled", "SweepError", "DriverSettings", "Grid", "RunSpec", "build_grid",
           "check_grid", "check_out", "grid_from_record", "Runner", "SlurmRunner", "RunJob", "LAUNCHERS", "collect",
           "compute_of", "steps_to_target", "ReportOptions", "comparisons_for", "report", "write_reports"]
