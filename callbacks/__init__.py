"""Lightning callbacks of lvm, one concern per module: ramp, step statistics, skip count, rollback guard, mini-5CAT, dashboard, checkpoints, resume, CPU sharing, gradient spikes, the device-resident data path."""

from callbacks.checkpoint import FiniteModelCheckpoint
from callbacks.dashboard import RunTensorBoard, TensorBoardDashboard
from callbacks.device_data import DeviceData, keeps_data_on_device
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
    "DeviceData",
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
    "keeps_data_on_device",
]
