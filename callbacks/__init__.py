"""Lightning callbacks of lvm, one concern per module: ramp, step statistics, skip count, rollback guard, mini-5CAT, dashboard, checkpoints, resume, CPU sharing, gradient spikes."""

from callbacks.checkpoint import FiniteModelCheckpoint
from callbacks.dashboard import RunTensorBoard, TensorBoardDashboard
from callbacks.fault import FaultInjection
from callbacks.mini5cat import Mini5CAT
from callbacks.ramp import RampSchedule, RampStage
from callbacks.resume import ExactResume, LastSave
from callbacks.rollback import RollbackGuard
from callbacks.skip import SkipReport
from callbacks.spike import SPIKE_STATS, SpikeCheck
from callbacks.stats import StepStatistics
from callbacks.threads import ShareCPUs

__all__ = [
    "LastSave",
    "ExactResume",
    "FaultInjection",
    "FiniteModelCheckpoint",
    "Mini5CAT",
    "RampSchedule",
    "RampStage",
    "RollbackGuard",
    "RunTensorBoard",
    "SPIKE_STATS",
    "ShareCPUs",
    "SkipReport",
    "SpikeCheck",
    "StepStatistics",
    "TensorBoardDashboard",
]
