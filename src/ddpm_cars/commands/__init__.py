"""What each ``ddpm-cars`` command does, as a function of one typed request.

The command line parses its options into the request and calls the function; from
Python the same call is ``sample(SampleRequest(checkpoint=Path("runs/demo"), out=Path("s")))``.
Each command opens its run once, refuses a bad combination before any expensive work,
then generates or measures, and writes; the closing lines it prints say what went where.
"""

from ddpm_cars.commands.bench import BenchRequest, bench
from ddpm_cars.commands.distilling import DistillRequest, distill_run
from ddpm_cars.commands.edits import ImageEdit, Interpolation
from ddpm_cars.commands.exchange import ExportRequest, ImportRequest, export, import_run
from ddpm_cars.commands.figures import ForwardRequest, ReportRequest, forward, report
from ddpm_cars.commands.sampling import ClassesRequest, SampleRequest, classes, sample
from ddpm_cars.commands.scoring import EvalRequest, GuidanceRequest, evaluate, guidance
from ddpm_cars.commands.training import DemoRequest, TrainRequest, demo, train

__all__ = [
    "BenchRequest",
    "ClassesRequest",
    "DemoRequest",
    "DistillRequest",
    "EvalRequest",
    "ExportRequest",
    "ForwardRequest",
    "GuidanceRequest",
    "ImageEdit",
    "ImportRequest",
    "Interpolation",
    "ReportRequest",
    "SampleRequest",
    "TrainRequest",
    "bench",
    "classes",
    "demo",
    "distill_run",
    "evaluate",
    "export",
    "forward",
    "guidance",
    "import_run",
    "report",
    "sample",
    "train",
]
